"""Helpers for the engine tests (a module of its own: every conftest.py is imported as 'conftest')."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CT_2MM = SHARED_DATA / "ct-2mm"
CT_NATIVE = SHARED_DATA / "ct-native"
# a real chest CT at its own resolution (0.98 x 0.98 mm pixels, slices 3 mm apart), cropped through its tumour:
# 80 x 80 pixels, 24 slices (i, j, k ranges of mirp_lung1_001)
SERIES_CASE, SERIES_CROP = "mirp_lung1_001", (slice(290, 370), slice(225, 305), slice(62, 86))
STUDY_UID = "1.2.826.0.1.3680043.2.1125.1.1"


def require_shared_data() -> Path:
    if not CT_2MM.is_dir():
        pytest.skip(f"real CT test data not found at {CT_2MM} (the project's ../shared/data)")
    return CT_2MM


def crop_ct(source: Path, target: Path, size=(72, 72, 64)) -> Path:
    """A centred crop of a real CT that keeps its physical geometry (origin, spacing, direction)."""
    image = sitk.ReadImage(str(source))
    start = [max(0, (n - s) // 2) for n, s in zip(image.GetSize(), size)]
    stop = [min(n, b + s) for n, b, s in zip(image.GetSize(), start, size)]
    sitk.WriteImage(image[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]], str(target))
    return target


def real_ct_series(folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1.20") -> tuple[Path, Path]:
    """A real CT written as a DICOM series (one file per slice, as a scanner's export), and its label file on the
    series' grid (`<folder>_label.nii.gz`)."""
    if not CT_NATIVE.is_dir():
        pytest.skip(f"real CT test data not found at {CT_NATIVE} (the project's ../shared/data)")
    i, j, k = SERIES_CROP
    image = sitk.ReadImage(str(CT_NATIVE / f"{SERIES_CASE}_ct.nii.gz"))[i, j, k]
    label = sitk.ReadImage(str(CT_NATIVE / f"{SERIES_CASE}_label.nii.gz"))[i, j, k]
    write_dicom_series(image, folder, series_uid)
    label_path = folder.with_name(folder.name + "_label.nii.gz")
    sitk.WriteImage(label, str(label_path))
    return folder, label_path


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, prefix: str = "s") -> Path:
    """One CT slice file per k of `image` (int16 HU), with the tags that place it: Image Position and Orientation
    (Patient), frame of reference, acquisition and instance numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(image.GetDepth()):
        sl = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0010|0010": "Phantom^Test",
                "0010|0020": "TEST", "0020|000d": STUDY_UID, "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1), "0020|0012": "1",
                "0020|0052": STUDY_UID + ".9", "0020|0037": orientation, "0018|0050": f"{image.GetSpacing()[2]:.6f}",
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0028|1053": "1", "0028|1052": "0"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def run_engine(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m engine ...` in a subprocess, as users and the Slicer module run it."""
    result = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"engine {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# fine-tuning settings of the tiny lung model (conftest's lung_model) and of tests that train like it
TRAIN = {"augment.flip": 0.0, "augment.rotate90": 0.0, "augment.intensity": 0.0, "train.lr": 0.002,
         "val.every": 2}
