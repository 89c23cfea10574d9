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


def run_engine(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m engine ...` in a subprocess, as users and the Slicer module run it."""
    result = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"engine {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
