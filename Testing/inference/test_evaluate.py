"""evaluate: Dice and HD95 against hand-computed values; label names; grid checks; the CLI table and JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from engine.cli import main
from engine.errors import UserError
from engine.inference.evaluate import hausdorff95, run_evaluate


def _labelmap(array_zyx: np.ndarray, path, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def pair(tmp_path):
    ref = np.zeros((20, 20, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[2:6, 2:6, 4:8] = 1  # shifted by 2 along x: overlap 32
    ref[10:15, 10:12, 10:12] = 2  # 20 voxels; label 2 not predicted at all
    pred[0, 0, 19] = 3  # a false positive of a label absent from the reference
    spacing = (0.5, 1.0, 3.0)  # x, y, z
    return _labelmap(pred, tmp_path / "case_seg.nii.gz", spacing), _labelmap(ref, tmp_path / "case_label.nii.gz", spacing)


def test_dice_and_hd95_match_hand_computed_values(pair, tmp_path):
    pred, ref = pair
    (tmp_path / "case_seg.json").write_text(json.dumps({"labels": {"liver": 1, "spleen": 2, "kidney": 3, "gone": 4}}))
    result = run_evaluate(pred, ref)
    scores = result["cases"]["case"]
    assert scores["liver"]["dice"] == pytest.approx(2 * 32 / (64 + 64))
    assert scores["liver"]["hd95"] == pytest.approx(2 * 0.5)  # 2 voxels along x, 0.5 mm each
    assert scores["spleen"] == {"pred_voxels": 0, "ref_voxels": 20, "dice": 0.0, "hd95": None}
    assert scores["kidney"]["dice"] == 0.0 and scores["kidney"]["ref_voxels"] == 0
    assert scores["gone"]["dice"] is None  # absent from both: no score, not 1
    assert result["mean"]["liver"]["dice"] == pytest.approx(0.5)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    plate = np.zeros((20, 30, 30), bool)
    plate[5, 5:25, 5:25] = True  # 400 voxels, all on the surface
    lifted = np.roll(plate, 3, axis=0)  # every voxel 3 slices away
    spacing = (2.0, 0.7, 0.7)  # per array axis (z, y, x)
    assert hausdorff95(plate, plate, spacing) == 0.0
    assert hausdorff95(plate, lifted, spacing) == pytest.approx(6.0)
    outlier = lifted.copy()
    outlier[18, 5, 5] = True  # 1 of 401 voxels, 13 slices from the plate: the maximum, not the 95th percentile
    assert hausdorff95(plate, outlier, spacing) == pytest.approx(6.0)


def test_cli_table_json_and_dataset_labels(pair, tmp_path, capsys):
    pred, ref = pair
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}, "training": []}))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", str(labels), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "liver" in table and "0.5000" in table and "spleen" in table
    saved = json.loads(out.read_text())
    assert set(saved["cases"]["case"]) == {"liver", "spleen"}
    assert saved["cases"]["case"]["spleen"]["hd95"] is None


def test_folders_are_matched_by_case_name(pair, tmp_path):
    pred, ref = pair
    (tmp_path / "p").mkdir(), (tmp_path / "r").mkdir()
    pred.rename(tmp_path / "p" / pred.name), ref.rename(tmp_path / "r" / ref.name)
    result = run_evaluate(tmp_path / "p", tmp_path / "r")
    assert list(result["cases"]) == ["case"]
    assert set(result["labels"]) == {"label_1", "label_2", "label_3"}


def test_mismatched_grids_are_refused(tmp_path):
    a = _labelmap(np.zeros((4, 4, 4)), tmp_path / "a.nii.gz")
    b = _labelmap(np.zeros((4, 4, 4)), tmp_path / "b.nii.gz", spacing=(1.0, 1.0, 2.0))
    with pytest.raises(UserError, match="spacing"):
        run_evaluate(a, b)
    assert main(["evaluate", "--pred", str(a), "--ref", str(tmp_path / "nope.nii.gz")]) == 2
