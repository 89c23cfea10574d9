"""The labelled-dataset descriptor `dataset.json`: MONAI decathlon lists (`training` / `validation` / `test`, an
optional per-item `fold`) plus nnU-Net-style `labels` ({"background": 0, "liver": 1}) and `channel_names`.

`index_folder` builds one from an nnU-Net `imagesTr`/`labelsTr` folder or from `*_ct` / `*_label` pairs;
`select_cases` makes label-efficiency runs reproducible (fold, number of training cases, seed);
`verify_cases` checks the data before a long run (nnU-Net's `verify_dataset_integrity`)."""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.errors import UserError
from engine.imageio.geometry import grid_difference
from engine.imageio.volumes import is_volume_file, read_image

NNUNET_CHANNEL = re.compile(r"_(\d{4})$")  # imagesTr/case_0000.nii.gz: channel 0 of case
IMAGE_SUFFIX = re.compile(r"_(ct|image|img)$", re.IGNORECASE)
LABEL_SUFFIX = re.compile(r"_(label|labels|seg|mask)$", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledDataset:
    """A parsed dataset.json; paths are absolute."""

    path: Path
    labels: dict[str, int]  # name -> value, background included
    channel_names: dict[str, str]
    training: list[dict]
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    @property
    def foreground(self) -> dict[str, int]:
        return {name: value for name, value in self.labels.items() if value != 0}


@dataclass(frozen=True)
class CaseSelection:
    """Which cases a run trains and validates on, and why (written to RUN_DIR/cases.json)."""

    training: list[dict]
    validation: list[dict]
    fold: int | None
    train_cases: int | None
    seed: int
    note: str = ""

    def to_dict(self) -> dict:
        return {"fold": self.fold, "train_cases": self.train_cases, "seed": self.seed, "note": self.note,
                "training": self.training, "validation": self.validation}


def case_name(path: str | os.PathLike) -> str:
    """File name without volume suffixes, nnU-Net channel or `_ct`/`_label` tags: the key that pairs files."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    name = NNUNET_CHANNEL.sub("", name)
    return IMAGE_SUFFIX.sub("", LABEL_SUFFIX.sub("", name))  # x_label, x_ct and x_ct_seg all name case x


def load_dataset(path: str | os.PathLike) -> LabelledDataset:
    """Read a dataset.json; relative paths are taken from the JSON's folder."""
    path = Path(path)
    tree = _read_json(path)
    labels = _parse_labels(tree.get("labels"), path)
    lists = {}
    for section in ("training", "validation", "test"):
        lists[section] = [_resolve_item(item, path, section) for item in tree.get(section) or []]
    if not lists["training"]:
        raise UserError(f"{path}: no 'training' list of {{\"image\": ..., \"label\": ...}} entries")
    unlabelled = [it["image"] for it in lists["training"] + lists["validation"] if "label" not in it]
    if unlabelled:
        raise UserError(f"{path}: {len(unlabelled)} training/validation item(s) lack a 'label', first: {unlabelled[0]}")
    channels = {str(k): str(v) for k, v in (tree.get("channel_names") or {"0": "CT"}).items()}
    return LabelledDataset(path, labels, channels, lists["training"], lists["validation"], lists["test"])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such dataset file (build one with `python -m engine data index DIR -o {path.name}`)")
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable dataset JSON ({err})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a JSON object with 'labels' and 'training'")
    return tree


def _parse_labels(labels, path: Path) -> dict[str, int]:
    """nnU-Net style {"background": 0, "liver": 1}; the decathlon's {"0": "background", "1": "liver"} also works."""
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path}: needs 'labels', e.g. {{\"background\": 0, \"liver\": 1}}")
    if all(str(k).isdigit() for k in labels):
        labels = {str(name): int(value) for value, name in labels.items()}
    try:
        parsed = {str(name): int(value) for name, value in labels.items()}
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'labels' values must be integers, got {labels}") from None
    if 0 not in parsed.values():
        parsed = {"background": 0, **parsed}
    if len(set(parsed.values())) != len(parsed):
        raise UserError(f"{path}: two label names share a value in {parsed}")
    return dict(sorted(parsed.items(), key=lambda kv: kv[1]))


def _resolve_item(item, path: Path, section: str, path_keys=("image", "label")) -> dict:
    item = {"image": item} if isinstance(item, str) else dict(item)
    if "image" not in item:
        raise UserError(f"{path}: an entry of '{section}' has no 'image': {item}")
    for key in path_keys:
        if isinstance(item.get(key), str):
            item[key] = str((path.parent / item[key]).resolve())
    missing = [item[k] for k in path_keys if isinstance(item.get(k), str) and not Path(item[k]).exists()]
    if missing:
        raise UserError(f"{path}: '{section}' lists a file that does not exist: {missing[0]}")
    item.setdefault("name", case_name(item["image"]))
    return item


def index_folder(folder: str | os.PathLike, out: str | os.PathLike, labels: dict[str, int] | None = None,
                 folds: int = 5, seed: int = 0) -> dict:
    """Build the dataset.json tree for a folder; paths are written relative to `out`'s folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    pairs, test = _find_pairs(folder)
    if not pairs:
        raise UserError(f"{folder}: found no image/label pairs (expected imagesTr/ + labelsTr/, or X_ct + X_label files)")
    names = labels if labels else _labels_from_values(_label_values([label for _, label in pairs]))
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    fold_of = {case: rank % max(1, folds) for rank, case in enumerate(order)}
    base = Path(out).resolve().parent
    rel = lambda p: os.path.relpath(Path(p).resolve(), base)  # noqa: E731
    training = [{"image": rel(img), "label": rel(lab), "fold": fold_of[i], "name": case_name(img)}
                for i, (img, lab) in enumerate(pairs)]
    return {"name": folder.name, "labels": dict(sorted(names.items(), key=lambda kv: kv[1])),
            "channel_names": {"0": "CT"}, "file_ending": _ending(pairs[0][0]), "numTraining": len(training),
            "folds": folds, "fold_seed": seed, "training": training,
            "test": [{"image": rel(img), "name": case_name(img)} for img in test]}


def _find_pairs(folder: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    if (folder / "imagesTr").is_dir():
        images = _volumes(folder / "imagesTr")
        labels = {case_name(p): p for p in _volumes(folder / "labelsTr")} if (folder / "labelsTr").is_dir() else {}
        test = _volumes(folder / "imagesTs") if (folder / "imagesTs").is_dir() else []
        multi = [p for p in images if NNUNET_CHANNEL.search(case_name_raw(p)) and not p.name.startswith(
            case_name(p) + "_0000")]
        if multi:
            raise UserError(f"{folder}: multi-channel cases ({multi[0].name}) are not supported yet; CT is one channel")
    else:
        files = _volumes(folder)
        images = [p for p in files if not LABEL_SUFFIX.search(case_name_raw(p))]
        labels = {case_name(p): p for p in files if LABEL_SUFFIX.search(case_name_raw(p))}
        test = []
    pairs = [(img, labels[case_name(img)]) for img in images if case_name(img) in labels]
    test += [img for img in images if case_name(img) not in labels]
    return pairs, test


def case_name_raw(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volumes(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p))


def _ending(path: Path) -> str:
    return next((s for s in (".nii.gz", ".nii", ".nrrd", ".mha") if path.name.lower().endswith(s)), path.suffix)


def _label_values(paths: list[Path]) -> list[int]:
    values: set[int] = set()
    for p in paths:
        values.update(int(v) for v in np.unique(sitk.GetArrayFromImage(read_image(p))))
    return sorted(values)


def _labels_from_values(values: list[int]) -> dict[str, int]:
    return {"background" if v == 0 else f"label_{v}": v for v in sorted(set(values) | {0})}


def parse_label_names(pairs: list[str]) -> dict[str, int]:
    """["heart=1", "aorta=2"] -> {"background": 0, "heart": 1, "aorta": 2}."""
    out = {"background": 0}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise UserError(f"--labels expects NAME=VALUE pairs such as heart=1, got '{pair}'")
        out[name.strip()] = int(value)
    if len(set(out.values())) != len(out):
        raise UserError(f"--labels: two names share a value in {out}")
    return out


def select_cases(ds: LabelledDataset, fold: int | None = None, train_cases: int | None = None,
                 seed: int = 0) -> CaseSelection:
    """Validation = the dataset's `validation` list, or the items of `fold`; training = the rest, of which
    `train_cases` are drawn with `seed` (the same seed and count always give the same cases)."""
    pool, validation, note = _split(ds, fold)
    if train_cases is not None:
        if not 1 <= train_cases <= len(pool):
            raise UserError(f"--train-cases {train_cases}: the training pool has {len(pool)} case(s)")
        pool = sorted(pool, key=lambda it: it["name"])
        pool = [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), train_cases))]
    if not validation:
        validation = list(pool)
        note = "no held-out validation cases: validation (and best-model choice) uses the training cases"
    return CaseSelection(pool, validation, fold, train_cases, seed, note)


def _split(ds: LabelledDataset, fold: int | None) -> tuple[list[dict], list[dict], str]:
    if fold is None:
        return list(ds.training), list(ds.validation), ""
    folds = sorted({it.get("fold") for it in ds.training if it.get("fold") is not None})
    if fold not in folds:
        raise UserError(f"--fold {fold}: {ds.path} has folds {folds or 'none'} (rebuild it with `data index --folds N`)")
    validation = [it for it in ds.training if it.get("fold") == fold]
    training = [it for it in ds.training if it.get("fold") != fold]
    if not training:
        raise UserError(f"--fold {fold} leaves no training case in {ds.path}")
    return training, validation, f"fold {fold} held out for validation"


def verify_cases(cases: list[dict], labels: dict[str, int]) -> None:
    """Every image readable, its label on the same grid, and only declared label values in it."""
    allowed = set(labels.values())
    for case in cases:
        image = read_image(case["image"])  # whole: a truncated file or NaN voxels must stop us before training
        label = read_image(case["label"])
        _same_grid(image, label, case)
        found = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(label))}
        if not found <= allowed:
            raise UserError(f"{case['label']}: label values {sorted(found - allowed)} are not declared in 'labels' "
                            f"{labels}; add them to dataset.json")


def _same_grid(image, label, case: dict) -> None:
    difference = grid_difference(image, label)
    if difference:
        what, a, b = difference
        raise UserError(f"{case['label']}: its {what} {b} differs from the image's {a} "
                        f"({Path(case['image']).name}); labels must lie on the image grid")


@dataclass(frozen=True)
class ClassificationDataset:
    """Volumes with one class each, from a CSV (`image,label[,fold]`) or a JSON (decathlon lists whose `label` is
    a class, and optional `classes` naming them in index order)."""

    path: Path
    classes: list[str]
    training: list[dict]
    validation: list[dict] = field(default_factory=list)


def load_classification_dataset(path: str | os.PathLike) -> ClassificationDataset:
    path = Path(path)
    if path.suffix.lower() == ".csv":
        tree = {"training": _csv_rows(path)}
    else:
        tree = _read_json(path)
    lists = {s: [_resolve_item(it, path, s, ("image",)) for it in tree.get(s) or []]
             for s in ("training", "validation")}
    items = lists["training"] + lists["validation"]
    if not lists["training"] or any("label" not in it for it in items):
        raise UserError(f"{path}: needs training items with an 'image' and a class 'label'")
    classes = [str(c) for c in tree.get("classes") or sorted({str(it["label"]) for it in items}, key=_class_order)]
    if len(classes) < 2:
        raise UserError(f"{path}: classification needs at least 2 classes, found {classes}")
    index = {name: i for i, name in enumerate(classes)}
    for it in items:
        if str(it["label"]) not in index:
            raise UserError(f"{path}: class '{it['label']}' of {Path(it['image']).name} is not in classes {classes}")
        it["label"] = index[str(it["label"])]
    return ClassificationDataset(path, classes, lists["training"], lists["validation"])


def _class_order(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _csv_rows(path: Path) -> list[dict]:
    import csv
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise UserError(f"{path}: a classification CSV needs 'image' and 'label' columns")
    return [{k: (int(v) if k == "fold" and v != "" else v) for k, v in row.items() if v != ""} for row in rows]
