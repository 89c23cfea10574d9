"""infer --uncertainty: the normalised entropy against hand-computed values; on real chest CT, a model whose
probabilities we control (a soft -400 HU threshold) is more uncertain where it disagrees with the manual lung
contours than where it agrees, with and without flip test-time augmentation; the CLI writes the volume beside the
labelmap on exactly the input's grid, from a model fine-tuned on real CT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn
from engine_testing import CT_2MM, SHARED_DATA, crop_ct, require_shared_data

from engine.cli import main
from engine.inference.run import InferenceSettings, ModelSpec, SegmentationPredictor
from engine.inference.uncertainty import normalised_entropy

WINDOW = (-1000.0, 1000.0)


class SoftThreshold(nn.Module):
    """Analytic 'network': lung where darker than `level` (window units), logits (-a, +a), a = slope * (level - x),
    so the probabilities are known and soften near the level, as a real model's do near a boundary."""

    def __init__(self, level: float, slope: float):
        super().__init__()
        self.level, self.slope = level, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.slope * (self.level - x)
        return torch.cat([-a, a], dim=1)


def test_normalised_entropy_is_zero_when_sure_and_one_when_uniform():
    probs = np.array([[1.0, 0.5, 1 / 3, 0.9], [0.0, 0.5, 1 / 3, 0.1], [0.0, 0.0, 1 / 3, 0.0]], np.float32)  # [K, n]
    expected = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(3)
    assert normalised_entropy(probs) == pytest.approx([0.0, np.log(2) / np.log(3), 1.0, expected], abs=1e-6)
    assert normalised_entropy(probs[:2, :2] / probs[:2, :2].sum(0)) == pytest.approx([0.0, 1.0], abs=1e-6)


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """A 64 x 64 x 48 crop (2 mm) of a real chest CT and its manual lung contours (LUNG1-001), as one lung mask."""
    require_shared_data()
    folder = tmp_path_factory.mktemp("chest")
    ct = crop_ct(CT_2MM / "mirp_lung1_001_ct.nii.gz", folder / "chest_ct.nii.gz", (64, 64, 48))
    label = crop_ct(SHARED_DATA / "lungs-2mm" / "mirp_lung1_001_lungs.nii.gz", folder / "chest_label.nii.gz",
                    (64, 64, 48))
    return ct, label


@pytest.mark.parametrize("tta", [False, True])
def test_uncertainty_is_higher_where_the_prediction_is_wrong(chest, tta):
    ct, label = chest
    image = sitk.ReadImage(str(ct))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0
    level = (-400.0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    spec = ModelSpec({"background": 0, "lung": 1}, (1.5, 1.5, 1.5), WINDOW, roi=32)  # not the CT's own 2 mm grid
    result = SegmentationPredictor(SoftThreshold(level, 20.0), spec, InferenceSettings(tta=tta)).predict(
        image, uncertainty=True)
    uncertainty = result.uncertainty
    assert uncertainty.GetPixelID() == sitk.sitkFloat32
    assert (uncertainty.GetSize(), uncertainty.GetOrigin(), uncertainty.GetSpacing(), uncertainty.GetDirection()) == \
        (image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    u = sitk.GetArrayFromImage(uncertainty)
    assert 0.0 <= u.min() and u.max() <= 1.0 and u.max() > 0.9  # somewhere the model is torn between the classes
    wrong = (sitk.GetArrayFromImage(result.labelmap) > 0) != reference
    assert 100 < wrong.sum() < 0.2 * wrong.size
    assert u[wrong].mean() > 3 * u[~wrong].mean()


def test_cli_writes_the_uncertainty_beside_the_labelmap(lung_run, held_out_case, tmp_path, capsys):
    out = tmp_path / "pred" / "case.seg.nrrd"
    assert main(["infer", "--checkpoint", str(lung_run / "model.pt"), "--input", held_out_case["image"],
                 "--output", str(out), "--uncertainty", "--tta", "--progress", "none"]) == 0
    path = tmp_path / "pred" / "case_uncertainty.nii.gz"
    assert json.loads((tmp_path / "pred" / "case.json").read_text())["uncertainty"] == path.name
    image, uncertainty = sitk.ReadImage(held_out_case["image"]), sitk.ReadImage(str(path))
    assert uncertainty.GetPixelID() == sitk.sitkFloat32 and uncertainty.GetSize() == image.GetSize()
    for what in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(uncertainty, what)(), getattr(image, what)(), rtol=0, atol=1e-6), what
    u = sitk.GetArrayFromImage(uncertainty)
    assert 0.0 <= u.min() and u.max() <= 1.0
    capsys.readouterr()


def test_the_uncertainty_picture_and_its_means_where_wrong_and_right(tmp_path):
    """The demo's uncertainty.png: the means it prints are over the voxels where prediction and reference differ
    and where they agree; the picture is written with them."""
    from engine.inference.overlay import uncertainty_where_wrong, write_uncertainty_overlay
    ref = np.zeros((6, 20, 20), np.uint8)
    ref[:, 5:15, 5:15] = 1
    pred = ref.copy()
    pred[:, 5:15, 14] = 0  # one wrong column of voxels
    unc = np.full(ref.shape, 0.1, np.float32)
    unc[pred != ref] = 0.9
    means = uncertainty_where_wrong(pred, ref, unc)
    assert means["wrong_voxels"] == 60 and means["wrong"] == pytest.approx(0.9) and means["right"] == pytest.approx(0.1)
    paths = {}
    for name, array in (("ct", np.where(ref > 0, 50, -900).astype(np.int16)), ("pred", pred), ("ref", ref),
                        ("unc", unc)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(paths[name]))
    out = write_uncertainty_overlay(sitk.ReadImage(str(paths["ct"])), paths["pred"], paths["ref"], paths["unc"],
                                    {"organ": 1}, tmp_path / "uncertainty.png")
    assert out.stat().st_size > 5_000
