"""Shared fixtures: real CT from ../shared/data (never copied into the repo), cropped small for speed."""
from __future__ import annotations

import json
from pathlib import Path

try:  # PySide6's first `__feature__` import scans every loaded module and trips over torch.classes (a RuntimeError
    import PySide6.QtCore  # noqa: F401  from inspect); done here, before any engine test imports torch, the Slicer
    from __feature__ import true_property  # noqa: F401  tests can follow the engine's in any collection order
except ImportError:
    pass
import pytest
from engine_testing import CT_2MM, SHARED_DATA, TRAIN, crop_ct, require_shared_data, run_engine  # noqa: F401


@pytest.fixture(scope="session")
def ct_dir(tmp_path_factory) -> Path:
    """Two real CTs (an abdomen and a lung case), cropped small, in a folder with one label file to skip."""
    data = require_shared_data()
    folder = tmp_path_factory.mktemp("ct")
    crop_ct(data / "ts_abdomen_ct.nii.gz", folder / "abdomen_ct.nii.gz")
    crop_ct(data / "pyradiomics_lung1_ct.nii.gz", folder / "lung_ct.nii.gz")
    crop_ct(data / "ts_abdomen_label.nii.gz", folder / "abdomen_label.nii.gz")
    return folder


@pytest.fixture(scope="session")
def tiny_pretrain_run(ct_dir, tmp_path_factory) -> Path:
    """A tiny MiM pre-training run (2 steps) on real CT; its checkpoint.pt serves other tests."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "2", "--out", str(out),
               "--progress", "none")
    return out


# A tiny lung model fine-tuned once on crops of real chest CT, for the model card and the exports. The crops keep their
# cases' names, and a manifest.json beside them records licence, source and label kind as ../shared/data does.
LUNG_CASES = ("mirp_lung1_001", "pyradiomics_lung1", "ctanalyser_lungdx_a0001")
CROP = (64, 64, 48)  # 2 mm voxels: 12.8 x 12.8 x 9.6 cm around the middle of the chest, both lungs in it


@pytest.fixture(scope="session")
def lung_data(tmp_path_factory) -> Path:
    """dataset.json over three lung crops (right lung 1, left lung 2; 3 folds) with a manifest.json beside them."""
    data = require_shared_data()
    folder = tmp_path_factory.mktemp("lungs")
    ct_manifest = {e["case"]: e for e in json.loads((data / "manifest.json").read_text())}
    lung_manifest = {e["case"]: e for e in json.loads((SHARED_DATA / "lungs-2mm" / "manifest.json").read_text())}
    manifest = []
    for case in LUNG_CASES:
        crop_ct(data / f"{case}_ct.nii.gz", folder / f"{case}_ct.nii.gz", CROP)
        crop_ct(SHARED_DATA / "lungs-2mm" / f"{case}_lungs.nii.gz", folder / f"{case}_label.nii.gz", CROP)
        manifest.append({"case": case, "ct": f"{case}_ct.nii.gz", "label": f"{case}_label.nii.gz",
                         "licence": ct_manifest[case]["licence"], "source": ct_manifest[case]["source"],
                         "label_kind": lung_manifest[case]["kind"]})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    dataset = folder / "dataset.json"
    run_engine("data", "index", str(folder), "-o", str(dataset), "--labels", "lung_right=1", "lung_left=2",
               "--folds", "3")
    return dataset


@pytest.fixture(scope="session")
def lung_run(lung_data, tmp_path_factory) -> Path:
    """A tiny segmentation run (4 steps, fold 0 held out): its folder holds model.pt and MODEL_CARD.md."""
    out = tmp_path_factory.mktemp("lung-run") / "run"
    sets = [arg for key, value in TRAIN.items() for arg in ("--set", f"{key}={value}")]
    run_engine("finetune", "--data", str(lung_data), "--preset", "tiny", "--steps", "4", "--fold", "0",
               "--out", str(out), "--progress", "none", *sets)
    return out


@pytest.fixture(scope="session")
def held_out_case(lung_run) -> dict:
    """The validation case of `lung_run` (not trained on): {"image", "label", "name", ...}."""
    return json.loads((lung_run / "cases.json").read_text())["validation"][0]
