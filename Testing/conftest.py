"""Shared fixtures: real CT from ../shared/data (never copied into the repo), cropped small for speed."""
from __future__ import annotations

from pathlib import Path

try:  # PySide6's first `__feature__` import scans every loaded module and trips over torch.classes (a RuntimeError
    import PySide6.QtCore  # noqa: F401  from inspect); done here, before any engine test imports torch, the Slicer
    from __feature__ import true_property  # noqa: F401  tests can follow the engine's in any collection order
except ImportError:
    pass
import pytest
from engine_testing import CT_2MM, crop_ct, require_shared_data, run_engine  # noqa: F401


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
