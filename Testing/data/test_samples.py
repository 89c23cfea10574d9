"""The sample CTs' named structures (what the 3D Slicer module's Sample Data button loads): TotalSegmentator's
117-class abdomen map restricted to the structures the shared terminology table knows, voxel for voxel; a folder
fetched before they existed gets them from its files, without downloading again. Needs the TotalSegmentator 2.18.0
source archive from pip (its cache or the index): skipped, saying why, without it."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from engine.data.samples import NAMED_LABELMAP, NAMED_LABELS, PACKAGE, fetch_sample_data
from engine.imageio.terminology import look_up, terminology_entry


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    archive_dir = tmp_path_factory.mktemp("sdist")
    done = subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", ":all:",
                           "-d", str(archive_dir), "-q"], capture_output=True, text=True)
    archives = list(archive_dir.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        pytest.skip(f"{PACKAGE} source archive not available from pip: "
                    + (done.stderr.strip().splitlines() or ["no archive"])[-1])
    out = tmp_path_factory.mktemp("samples")
    fetch_sample_data(out, sdist=archives[0])
    return out


def test_named_structures_are_the_known_ones_voxel_for_voxel(fetched):
    info = json.loads((fetched / NAMED_LABELS).read_text())
    classes = json.loads((fetched / "provenance.json").read_text())["labels"]
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(fetched / "abdomen_label.nii.gz")))
    named = sitk.GetArrayFromImage(sitk.ReadImage(str(fetched / NAMED_LABELMAP)))
    assert list(info["labels"].values()) == list(range(1, len(info["labels"]) + 1))
    assert info["totalsegmentator_names"]["left kidney"] == "kidney_left"
    for name, value in info["labels"].items():
        assert terminology_entry(name), name
        assert np.array_equal(named == value, original == classes[info["totalsegmentator_names"][name]]), name
    unknown = {v for n, v in classes.items() if v and not look_up(n)}
    present_unknown = set(np.unique(original).tolist()) & unknown
    assert present_unknown and not named[np.isin(original, list(present_unknown))].any()  # e.g. ribs, colon: out
    assert "Apache-2.0" in info["licence"] and "TotalSegmentator" in info["source"]


def test_an_older_fetch_gets_them_without_downloading(fetched):
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(fetched / NAMED_LABELMAP)))
    labels = json.loads((fetched / NAMED_LABELS).read_text())
    (fetched / NAMED_LABELMAP).unlink()
    (fetched / NAMED_LABELS).unlink()
    fetch_sample_data(fetched, sdist=fetched / "no such archive.tar.gz")  # would fail if it tried to extract
    assert json.loads((fetched / NAMED_LABELS).read_text()) == labels
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(fetched / NAMED_LABELMAP))), before)
