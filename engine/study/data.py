"""The study's data, derived into its own folder (STUDY/data; never into the repository or the shared data):

- each labelled case's label file reduced to the one label studied (its value -> 1, every other value -> 0);
- dataset.json whose `training` list is the training pool only: test cases are not in it, so no selection of
  training cases can reach them, and `check_held_out` asserts it again after every run;
- pretrain.json, the unlabelled volumes for pre-training: images only, label files are never listed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.data.datalist import resolve_datalist
from engine.errors import UserError
from engine.imageio.labelmap import write_image_atomic
from engine.imageio.volumes import read_image
from engine.runtime.atomic import write_json
from engine.study.config import StudyConfig

LABEL_VALUE = 1  # the studied label's value in every derived label file


class HeldOutViolation(RuntimeError):
    """A test case reached training: the study's results would be invalid. Never a user mistake."""


@dataclass(frozen=True)
class StudyData:
    dataset: Path  # dataset.json: labels {background: 0, <label>: 1}, training = the pool
    pretrain: Path  # pretrain.json: {"training": [{"image": ...}]}
    pool: list[dict]  # [{"name", "image", "label"}], label = the derived file
    test: list[dict]


def prepare_data(cfg: StudyConfig, folder: Path) -> StudyData:
    source = Path(cfg.data)
    if not source.is_dir():
        raise UserError(f"data: {source.resolve()} is not a folder (relative paths are taken from the current folder)")
    cases = {name: _derived_case(source, name, value, cfg.task.label, folder)
             for name, value in sorted(cfg.task.cases.items())}
    pool = [cases[name] for name in cfg.task.pool]
    test = [cases[name] for name in cfg.task.test]
    check_held_out(pool, test)
    dataset = write_json(_dataset_tree(cfg.task.label, pool), folder / "dataset.json")
    volumes = _pretrain_volumes(source, test, cfg.pretrain.include_test_images, list(cases.values()))
    pretrain = write_json({"training": [{"image": image} for image in volumes]}, folder / "pretrain.json")
    return StudyData(dataset, pretrain, pool, test)


def check_held_out(training: list[dict], test: list[dict]) -> None:
    """Raise HeldOutViolation if any test case, by name or by image file, is among `training`."""
    names = {case["name"] for case in test}
    files = {Path(case["image"]).resolve() for case in test}
    leaked = [item for item in training
              if item.get("name") in names or Path(item["image"]).resolve() in files]
    if leaked:
        raise HeldOutViolation(f"test case(s) {[item.get('name', item['image']) for item in leaked]} "
                               f"are among the training cases")


def _derived_case(source: Path, name: str, value: int, label: str, folder: Path) -> dict:
    image, original = source / f"{name}_ct.nii.gz", source / f"{name}_label.nii.gz"
    for path in (image, original):
        if not path.is_file():
            raise UserError(f"task.cases names '{name}', but {path} does not exist")
    derived = folder / "labels" / f"{name}_label.nii.gz"
    if not derived.exists():  # derived deterministically: a rerun reuses it
        _write_single_label(original, value, derived, f"{name}: {label}")
    return {"name": name, "image": str(image.resolve()), "label": str(derived.resolve())}


def _write_single_label(original: Path, value: int, target: Path, what: str) -> Path:
    labels = read_image(original)
    mask = (sitk.GetArrayViewFromImage(labels) == value).astype(np.uint8) * LABEL_VALUE
    if not mask.any():
        raise UserError(f"{what}: value {value} does not occur in {original}")
    derived = sitk.GetImageFromArray(mask)
    derived.CopyInformation(labels)
    return write_image_atomic(derived, target)


def _dataset_tree(label: str, pool: list[dict]) -> dict:
    return {"name": f"study-{label}", "labels": {"background": 0, label: LABEL_VALUE}, "channel_names": {"0": "CT"},
            "training": pool}


def _pretrain_volumes(source: Path, test: list[dict], include_test: bool, labelled: list[dict]) -> list[str]:
    """Every volume of the data folder that is not a label file; without the test images if so configured."""
    images = [str(Path(item["image"]).resolve()) for item in resolve_datalist(source)]
    if not include_test:
        held_out = {case["image"] for case in test}
        images = [image for image in images if image not in held_out]
    label_files = {str((source / f"{case['name']}_label.nii.gz").resolve()) for case in labelled}
    if label_files & set(images):
        raise HeldOutViolation(f"label files among the pre-training volumes: {sorted(label_files & set(images))}")
    return images
