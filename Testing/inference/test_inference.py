"""Inference: sliding-window machinery against an analytic predictor, exact geometry restoration on anisotropic,
oblique and left-handed inputs, DICOM series input, label names surviving to the written labelmap, and the
largest-component post-processing that model.pt chooses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn
from engine_testing import write_dicom_series

from engine.cli import main
from engine.config.finetune import build_finetune_config
from engine.imageio.terminology import colour_for, terminology_entry
from engine.imageio.volumes import read_input
from engine.inference.postprocess import keep_largest_component, never_hurts
from engine.inference.preflight import count_windows
from engine.inference.run import InferenceSettings, ModelSpec, SegmentationPredictor, sliding_window_probabilities
from engine.models.segmenter import build_segmenter
from engine.runtime.checkpoint import save_checkpoint

WINDOW = (-1000.0, 1000.0)
THRESHOLD_HU = 150.0


class Threshold(nn.Module):
    """Analytic 'network': per-voxel logits (-a, +a) with a = 40 * (x - t); softmax is a sigmoid step at t."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = 40.0 * (x - self.level)
        return torch.cat([-a, a], dim=1)


def _level() -> float:
    return (THRESHOLD_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def test_sliding_window_reproduces_a_pointwise_predictor_exactly():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 37, 20, 9)  # not a multiple of the window, and smaller than it along z
    expected = torch.sigmoid(torch.cat([-80.0 * (x - 0.5), 80.0 * (x - 0.5)], 1))[0]
    model = Threshold(0.5)
    for tta in (False, True):
        forwards = []  # windows per forward, as reported for progress
        probs = sliding_window_probabilities(model, x, roi=16, overlap=0.5, sw_batch_size=3, tta=tta,
                                             on_windows=forwards.append)
        assert probs.shape == (2, 37, 20, 9)
        assert torch.allclose(probs, expected, atol=1e-5)
        assert sum(forwards) == count_windows((37, 20, 9), 16, 0.5) * (4 if tta else 1) and max(forwards) <= 3


def _two_blobs(spacing=(2.0, 2.0, 2.0)) -> sitk.Image:
    """Soft tissue with a large bright blob and a small one apart from it."""
    hu = np.full((24, 24, 24), 0, np.int16)  # [z, y, x]
    hu[4:14, 4:14, 4:14] = 400
    hu[18:21, 18:21, 18:21] = 400
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    return image


def test_only_the_largest_component_is_kept_where_the_model_says():
    labelmap = np.zeros((8, 8, 8), np.uint8)
    labelmap[0:3, 0:3, 0:3], labelmap[6:8, 6:8, 6:8], labelmap[0, 7, 7] = 1, 1, 2
    kept = keep_largest_component(labelmap, 1)
    assert (kept == 1).sum() == 27 and kept[7, 7, 7] == 0 and kept[0, 7, 7] == 2 and (labelmap == 1).sum() == 35
    before = np.array([[0.90, 0.80, np.nan, 0.7], [0.92, 0.85, np.nan, np.nan]])  # [cases, labels]
    after = np.array([[0.95, 0.80, np.nan, 0.7], [0.92, 0.84, np.nan, np.nan]])
    assert never_hurts(before, after) == [True, False, False, True]  # ties count; one worse case rules it out
    image = _two_blobs()
    for largest, small_blob in ((("blob",), 0), ((), 1)):
        spec = ModelSpec({"background": 0, "blob": 1}, (2.0, 2.0, 2.0), WINDOW, roi=16, largest_component=largest)
        out = sitk.GetArrayFromImage(SegmentationPredictor(Threshold(_level()), spec).predict(image).labelmap)
        assert out[5:13, 5:13, 5:13].all() and out[19, 19, 19] == small_blob
    settings = InferenceSettings(postprocess=False)
    spec = ModelSpec({"background": 0, "blob": 1}, (2.0, 2.0, 2.0), WINDOW, roi=16, largest_component=("blob",))
    assert sitk.GetArrayFromImage(SegmentationPredictor(Threshold(_level()), spec, settings).predict(image).labelmap)[
        19, 19, 19] == 1


def _phantom(size, spacing, direction, origin=(-40.0, 25.0, 300.0)) -> tuple[sitk.Image, np.ndarray]:
    """Air, a body block of water, and an asymmetric dense blob (an ellipsoid with a bar along +i)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in size), indexing="ij")
    n = np.array(size)
    c = n * np.array([0.35, 0.38, 0.35])  # off-centre along every axis
    r = n * np.array([0.14, 0.15, 0.2])
    blob = ((i - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((k - c[2]) / r[2]) ** 2 < 1
    blob |= (i > c[0]) & (i < n[0] * 0.85) & (abs(j - c[1]) < n[1] * 0.06) & (abs(k - c[2]) < max(1.5, n[2] * 0.08))
    hu = np.full(size, -1000, np.int16)
    hu[2:-2, 2:-2, 1:-1] = 0
    hu[blob] = 400
    image = sitk.GetImageFromArray(hu.transpose(2, 1, 0))
    image.SetSpacing(spacing), image.SetDirection(direction), image.SetOrigin(origin)
    return image, blob.transpose(2, 1, 0)  # [z, y, x] like SimpleITK arrays


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


GEOMETRIES = {
    "anisotropic": ((48, 40, 16), (0.9, 1.3, 3.5), np.eye(3)),
    "oblique": ((40, 40, 24), (1.2, 1.0, 2.0), _rotation((1, 1, 0.3), 25)),
    "left-handed": ((40, 36, 20), (1.1, 1.4, 2.5), np.diag([1.0, -1.0, 1.0]) @ _rotation((0, 0, 1), 90)),
    "oblique-left-handed": ((36, 44, 18), (1.3, 0.8, 3.0), _rotation((0.2, 1, 1), 40) @ np.diag([-1.0, 1.0, 1.0])),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_output_lies_exactly_on_the_input_grid(name):
    size, spacing, direction = GEOMETRIES[name]
    image, blob = _phantom(size, spacing, tuple(direction.ravel()))
    spec = ModelSpec({"background": 0, "blob": 7}, (1.5, 1.5, 1.5), WINDOW, roi=16)
    result = SegmentationPredictor(Threshold(_level()), spec, InferenceSettings(overlap=0.25)).predict(image)
    out = result.labelmap
    assert out.GetSize() == image.GetSize()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetDirection() == image.GetDirection()
    found = sitk.GetArrayFromImage(out)
    assert set(np.unique(found)) <= {0, 7}
    assert _dice(found == 7, blob) > 0.85
    for axis in range(3):  # a flipped or transposed answer would not match
        assert _dice(found == 7, np.flip(blob, axis)) < 0.6


def test_dicom_folder_restores_its_grid_and_several_series_are_refused(constant_model, tmp_path, capsys):
    big, blob = _phantom((40, 36, 14), (0.8, 0.8, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1), origin=(-20.0, 10.0, -60.0))
    small, _ = _phantom((40, 36, 6), (0.8, 0.8, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(big, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.2", "a")
    image, dicom = read_input(tmp_path / "dicom")
    assert image.GetSize() == big.GetSize()
    assert "14 slices" in dicom.note and dicom.geometry.kinds == ("regular",)
    assert np.allclose(image.GetOrigin(), big.GetOrigin(), atol=1e-4)
    assert np.allclose(image.GetSpacing(), big.GetSpacing(), atol=1e-4)
    spec = ModelSpec({"background": 0, "blob": 1}, (1.5, 1.5, 1.5), WINDOW, roi=16)
    out = SegmentationPredictor(Threshold(_level()), spec).predict(image).labelmap
    assert (out.GetSize(), out.GetOrigin(), out.GetSpacing(), out.GetDirection()) == \
        (image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    assert _dice(sitk.GetArrayFromImage(out) == 1, blob) > 0.85
    write_dicom_series(small, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.3", "b")
    out = tmp_path / "seg.nii.gz"  # a second series joins the folder
    assert main(["infer", "--checkpoint", str(constant_model), "--input", str(tmp_path / "dicom"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 DICOM series" in err and "(14 slices)" in err and "(6 slices)" in err
    assert "Traceback" not in err and not out.exists()


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory):
    """A tiny model.pt whose network answers the last channel everywhere (label value 5, 'spleen')."""
    cfg = build_finetune_config("tiny", overrides={"model.feature_size": 4})
    labels = {"background": 0, "liver": 1, "spleen": 5}
    model = build_segmenter("hybrid", cfg.encoder, cfg.model.roi, len(labels), cfg.model.feature_size)
    with torch.no_grad():
        model.out.conv.conv.weight.zero_()
        model.out.conv.conv.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, kind="segmentation", config=cfg.to_dict(), model=model, step=1,
                    extra={"labels": labels, "spacing": [4.0, 4.0, 4.0], "hu_window": list(WINDOW), "roi": 32})
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".seg.nrrd"])
def test_label_names_and_values_survive_to_the_output(constant_model, tmp_path, suffix, capsys):
    phantom, _ = _phantom((30, 28, 12), (1.2, 1.2, 3.0), tuple(_rotation((0, 0, 1), 15).ravel()))
    source = tmp_path / ("case_ct.nrrd" if suffix.endswith("nrrd") else "case_ct.nii.gz")
    sitk.WriteImage(phantom, str(source))
    image = sitk.ReadImage(str(source))  # the geometry as the file stores it (NIfTI: float32 quaternion)
    out = tmp_path / "pred" / f"case{suffix}"
    assert main(["infer", "--checkpoint", str(constant_model), "--input", str(source),
                 "--output", str(out), "--progress", "json", "--probabilities"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["path"] == str(out)
    windows = [e for e in events if e["event"] == "windows"]  # progress inside the volume, before its step event
    assert windows and [e["done"] for e in windows] == sorted({e["done"] for e in windows})
    assert windows[-1]["done"] == windows[-1]["windows"] and windows[-1]["path"] == str(source)
    assert events.index(windows[-1]) < next(i for i, e in enumerate(events) if e["event"] == "step")
    sidecar = json.loads((tmp_path / "pred" / "case.json").read_text())
    assert sidecar["labels"] == {"liver": 1, "spleen": 5}
    assert set(sidecar["probabilities"]) == {"liver", "spleen"}
    written = sitk.ReadImage(str(out))
    values = sitk.GetArrayFromImage(written)
    assert set(np.unique(values)) == {0, 5}  # body -> the last channel -> its value; air outside the body -> 0
    assert written.GetSize() == image.GetSize()
    for what in ("GetOrigin", "GetSpacing", "GetDirection"):  # exact in memory; files round-trip to the last ulp
        assert np.allclose(getattr(written, what)(), getattr(image, what)(), rtol=0, atol=1e-9), what
    if suffix == ".seg.nrrd":
        segments = {written.GetMetaData(f"Segment{n}_Name"): written.GetMetaData(f"Segment{n}_LabelValue")
                    for n in range(2)}
        assert segments == {"liver": "1", "spleen": "5"}
        assert written.GetMetaData("Segment0_Extent") == "0 -1 0 -1 0 -1"  # liver: empty
        for n, name in enumerate(["liver", "spleen"]):  # the shared table's colour and SNOMED code (terminology.py)
            colour = [float(c) for c in written.GetMetaData(f"Segment{n}_Color").split()]
            assert np.allclose(colour, colour_for(name, n), atol=1e-6)
            assert f"TerminologyEntry:{terminology_entry(name)}|" in written.GetMetaData(f"Segment{n}_Tags")
        assert "^10200004^Liver" in written.GetMetaData("Segment0_Tags")


def test_infer_on_a_dicom_folder_and_clear_errors(constant_model, tmp_path):
    image, _ = _phantom((24, 24, 8), (1.0, 1.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.1.9", "s")
    out = tmp_path / "series_seg.nii.gz"
    assert main(["infer", "--checkpoint", str(constant_model), "--input", str(tmp_path / "series"),
                 "--output", str(out), "--progress", "none"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == image.GetSize()
    assert main(["infer", "--checkpoint", str(constant_model), "--input", str(tmp_path / "nothing"),
                 "--output", str(out)]) == 2
    assert main(["infer", "--checkpoint", str(tmp_path / "series_seg.json"), "--input", str(tmp_path / "series"),
                 "--output", str(out)]) == 2


def test_model_grid_is_ras_aligned_and_keeps_physical_positions():
    """Training and inference both see volumes through to_model_grid: axes towards R, A, S, same anatomy."""
    from engine.imageio.geometry import to_model_grid
    size, spacing, direction = GEOMETRIES["left-handed"]
    image, _ = _phantom(size, spacing, tuple(direction.ravel()))
    marker = (30, 9, 14)
    image[marker] = 3000
    grid = to_model_grid(image, (1.5, 1.5, 1.5))
    assert np.allclose(np.array(grid.GetDirection()).reshape(3, 3), np.diag([-1.0, -1.0, 1.0]), atol=1e-9)  # LPS
    hottest = np.unravel_index(np.argmax(sitk.GetArrayFromImage(grid)), grid.GetSize()[::-1])[::-1]
    moved = np.subtract(grid.TransformIndexToPhysicalPoint(tuple(int(i) for i in hottest)),
                        image.TransformIndexToPhysicalPoint(marker))
    assert np.linalg.norm(moved) < 1.5 * np.sqrt(3)


def test_back_to_input_is_the_argmax_of_the_resampled_channels_first_channel_on_ties():
    """Many channels with ties: the labelmap is numpy's argmax (the first of equal channels wins) of each channel
    resampled onto the input grid, with 0 where the input lies outside the model grid."""
    from engine.imageio.geometry import back_to_input, resample_channel
    rng = np.random.default_rng(0)
    probs = (rng.integers(0, 4, size=(7, 9, 8, 6)) / 4).astype(np.float32)  # [K, X, Y, Z]: many exact ties
    grid = sitk.Image([9, 8, 6], sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 3.0))
    same = back_to_input(probs, grid, grid)
    assert np.array_equal(sitk.GetArrayFromImage(same), np.argmax(probs, axis=0).transpose(2, 1, 0))
    finer = sitk.Image([23, 13, 11], sitk.sitkFloat32)  # reaches past the grid on every axis
    finer.SetSpacing((0.9, 1.4, 1.9))
    finer.SetOrigin((-1.0, 0.5, -2.0))
    resampled = np.stack([sitk.GetArrayFromImage(resample_channel(p, grid, finer)) for p in probs])
    got = sitk.GetArrayFromImage(back_to_input(probs, grid, finer))
    assert np.array_equal(got, np.argmax(resampled, axis=0)) and (got[resampled.max(0) == 0] == 0).all()
    assert got.dtype == np.uint8 and len(np.unique(got)) > 3
