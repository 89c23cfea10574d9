"""evaluate: Dice and HD95 against hand-computed values, HD95 and NSD against MONAI's own functions on real organ
labels (isotropic and anisotropic spacing), the miss rule; label names; grid checks; the CLI table and JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from engine_testing import require_shared_data

from engine.cli import main
from engine.errors import UserError
from engine.inference.evaluate import hausdorff95, label_scores, run_evaluate


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
    diagonal = float(np.linalg.norm([20 * 3.0, 20 * 1.0, 20 * 0.5]))  # size x spacing per axis (z, y, x)
    assert scores["spleen"] == {"pred_voxels": 0, "ref_voxels": 20, "dice": 0.0, "hd95": pytest.approx(diagonal),
                                "nsd": 0.0, "missed": True}  # missed entirely: the stated maximum, not dropped
    assert scores["kidney"]["dice"] == 0.0 and scores["kidney"]["ref_voxels"] == 0 and scores["kidney"]["missed"]
    assert scores["gone"]["dice"] is None  # absent from both: no score, not 1
    assert result["mean"]["liver"]["dice"] == pytest.approx(0.5)
    assert result["mean"]["spleen"]["hd95"] == pytest.approx(diagonal) and result["mean"]["spleen"]["missed"] == 1


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
    assert saved["cases"]["case"]["spleen"]["missed"] and saved["mean"]["liver"]["missed"] == 0


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
    assert main(["evaluate", "--pred", str(a), "--ref", str(a), "--tolerance", "-1"]) == 2


ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}  # TotalSegmentator v2 values in ts_abdomen


@pytest.fixture(scope="module")
def organ_pair():
    """Real organ labels of ts_abdomen (2 mm) around the kidneys, and a 'prediction' made from them the way models
    err: the liver eroded, the spleen dilated with a stray island, one kidney shifted by two voxels ([z, y, x])."""
    from scipy import ndimage
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(require_shared_data() / "ts_abdomen_label.nii.gz")))
    box = tuple(slice(max(0, a - 2), b + 2) for a, b in zip(*(np.argwhere(np.isin(ref, [2, 3])).min(0),
                                                             np.argwhere(np.isin(ref, [2, 3])).max(0))))
    ref = np.where(np.isin(ref[box], list(ORGANS.values())), ref[box], 0).astype(np.uint8)
    pred = ref.copy()
    pred[(ref == 5) & ~ndimage.binary_erosion(ref == 5)] = 0
    pred[ndimage.binary_dilation(ref == 1) & (pred == 0)] = 1
    pred[2:5, 2:5, 2:5] = 1
    pred[ref == 2] = 0
    pred[np.roll(ref == 2, 2, axis=1) & (pred == 0)] = 2
    return pred, ref


def _monai_scores(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float) -> dict[str, tuple[float, float]]:
    """(HD95, NSD) per organ from MONAI's own functions (scipy's erosion and KD-tree), one-hot [1, C, z, y, x]."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    one_hot = [torch.from_numpy(np.stack([a == v for v in ORGANS.values()]))[None].float() for a in (pred, ref)]
    hd = compute_hausdorff_distance(*one_hot, include_background=True, percentile=95, spacing=list(spacing))[0]
    nsd = compute_surface_dice(*one_hot, [tolerance] * len(ORGANS), include_background=True, spacing=list(spacing))[0]
    return {name: (float(hd[i]), float(nsd[i])) for i, name in enumerate(ORGANS)}


@pytest.mark.parametrize("spacing, tolerance", [((2.0, 2.0, 2.0), 2.0),  # ties: surface distances of exactly 2 mm
                                                ((2.5, 0.8, 0.8), 2.0),  # anisotropic (z, y, x), as a thick-slice CT
                                                ((2.5, 0.8, 0.8), 1.0)])
def test_hd95_and_nsd_agree_with_monai_on_real_organ_labels(organ_pair, spacing, tolerance):
    """Same surface rule and exact Euclidean distances: SimpleITK's Maurer map (float32) against MONAI's KD-tree
    (float64), both 95th percentiles interpolated linearly. HD95 agrees to float32 rounding (1e-4 relative); NSD
    counts voxels, so it agrees exactly unless a distance within float32 rounding of the tolerance falls on the
    other side of it, which these grids' distances (sqrt of sums of squared multiples of the spacing) do not do."""
    pred, ref = organ_pair
    theirs = _monai_scores(pred, ref, spacing, tolerance)
    for name, value in ORGANS.items():
        ours = label_scores(pred, ref, value, spacing, tolerance)
        assert ours["hd95"] == pytest.approx(theirs[name][0], rel=1e-4), name
        assert ours["nsd"] == pytest.approx(theirs[name][1], abs=1e-6), name
        assert not ours["missed"]
    assert 0 < theirs["liver"][0] and theirs["kidney_right"][0] >= 2 * spacing[1] - 1e-6  # the errors are seen
    assert min(nsd for _, nsd in theirs.values()) < 1.0


def test_a_missed_structure_scores_the_image_diagonal_and_is_counted(organ_pair, tmp_path, capsys):
    pred, ref = organ_pair
    pred = np.where(pred == 3, 0, pred)  # the left kidney missed entirely
    spacing = (2.5, 0.8, 0.8)  # z, y, x
    scores = label_scores(pred, ref, 3, spacing)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(ref.shape, spacing))))
    assert scores["missed"] and scores["hd95"] == pytest.approx(diagonal)
    assert scores["dice"] == 0.0 and scores["nsd"] == 0.0
    p = _labelmap(pred, tmp_path / "case_seg.nii.gz", spacing[::-1])
    r = _labelmap(ref, tmp_path / "case_label.nii.gz", spacing[::-1])
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": ORGANS}))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(p), "--ref", str(r), "--labels", str(labels), "--out", str(out),
                 "--tolerance", "1.5"]) == 0
    table = capsys.readouterr().out
    assert "NSD@1.5mm" in table and f"{diagonal:.4f}*" in table and "1/1" in table and "image diagonal" in table
    saved = json.loads(out.read_text())
    assert saved["tolerance_mm"] == 1.5
    assert saved["mean"]["kidney_left"] == {"dice": 0.0, "hd95": pytest.approx(diagonal), "nsd": 0.0, "cases": 1,
                                            "missed": 1}
    assert saved["mean"]["liver"]["missed"] == 0 and 0 < saved["mean"]["liver"]["nsd"] < 1
