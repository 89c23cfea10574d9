"""`engine export --format monai-bundle` on a model fine-tuned on real lung CT: the bundle's files and metadata,
MONAI's own verifiers, MONAI's own runner segmenting a held-out CT like `engine infer` does, label values that are
not channel indices, and clear refusals.

MONAI's metadata schema is downloaded from GitHub by `verify_metadata`, which this machine cannot reach: the test
verifies against MONAI_META_SCHEMA (a local copy of meta_schema_20240725.json) when set, and otherwise against the
keys and types that schema requires, written out here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from engine_testing import REPO, crop_ct
from monai.bundle import ConfigParser
from monai.transforms import Compose

from engine.cli import main
from engine.config.finetune import build_finetune_config
from engine.errors import UserError
from engine.export.agreement import run_bundle
from engine.export.bundle_config import REQUIRED_KEYS, missing_metadata
from engine.export.run import ExportRequest, run_export
from engine.finetuning.model_card import model_card
from engine.inference.run import InferenceSettings, ModelSpec, SegmentationPredictor
from engine.models.segmenter import build_segmenter
from engine.runtime.checkpoint import load_checkpoint, save_checkpoint

MIN_AGREEMENT = 0.999  # Dice per label, bundle vs engine (float32) on a held-out CT
MAX_DIFFERING = 1e-3  # share of voxels whose label differs


@pytest.fixture(scope="module")
def bundle(lung_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "lungs"
    assert main(["export", "--checkpoint", str(lung_run / "model.pt"), "--format", "monai-bundle",
                 "--out", str(out)]) == 0
    return out


def test_bundle_holds_the_files_of_the_monai_layout(bundle, lung_run):
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == ["LICENSE", "configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.pt"]
    ckpt = load_checkpoint(lung_run / "model.pt")
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)  # plain tensors only
    assert weights.keys() == ckpt["model"].keys()
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)
    readme = (bundle / "docs" / "README.md").read_text()
    assert readme.startswith(model_card(ckpt)) and "python -m monai.bundle run" in readme
    licence = (bundle / "LICENSE").read_text()
    assert "CC BY-NC 3.0 (TCIA NSCLC-Radiomics)" in licence and "Apache License" in licence


def test_metadata_says_labels_versions_data_and_metrics(bundle, lung_run):
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    ckpt = load_checkpoint(lung_run / "model.pt")
    assert missing_metadata(metadata) == []
    assert (metadata["pytorch_version"], metadata["monai_version"]) == \
        (ckpt["versions"]["torch"], ckpt["versions"]["monai"])
    assert metadata["required_packages_version"]["mimslicer-engine"] == ckpt["versions"]["engine"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "lung_right", "2": "lung_left"}
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    assert metadata["eval_metrics"]["val_mean_dice"] == pytest.approx(ckpt["metrics"]["val_mean_dice"])
    assert metadata["eval_metrics"]["held_out"] is True
    assert metadata["eval_metrics"]["evaluated_on"] == [c["name"] for c in ckpt["provenance"]["validation"]]
    for case in ckpt["provenance"]["training"]:
        assert f"{case['name']} ({case['licence']}" in metadata["data_source"]
    assert "Not a medical device" in metadata["intended_use"]


def _schema() -> dict:
    """MONAI's schema when a local copy is given; else its required keys and the tensor fields, transcribed."""
    if os.environ.get("MONAI_META_SCHEMA"):
        return json.loads(Path(os.environ["MONAI_META_SCHEMA"]).read_text())
    tensor = {"type": "object", "required": ["type", "format", "num_channels", "spatial_shape", "dtype",
                                             "value_range"]}
    io = {"type": "object", "required": ["inputs", "outputs"],
          "properties": {part: {"type": "object", "additionalProperties": tensor} for part in ("inputs", "outputs")}}
    strings = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
               "authors", "copyright")
    return {"type": "object", "required": list(REQUIRED_KEYS),
            "properties": {**{key: {"type": "string"} for key in strings},
                           "required_packages_version": {"type": "object"}, "network_data_format": io}}


def test_monai_verify_metadata_accepts_it_offline_and_refuses_a_broken_one(bundle, tmp_path):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata
    schema = tmp_path / "meta_schema.json"
    schema.write_text(json.dumps(_schema()))
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))  # no download
    broken = json.loads((bundle / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]["outputs"]["pred"]["num_channels"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))
    assert missing_metadata(broken) == ["network_data_format.outputs.pred lacks 'num_channels'"]


def test_monai_verify_net_in_out_builds_the_network_from_the_config(bundle):
    from monai.bundle import verify_net_in_out
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu")


GEOMETRIES = {  # voxels, spacing (mm) and direction of the CT: finer and coarser than the model's 3 mm, axes permuted
    # 46 slices of 5 mm: the engine's last model slice lies more than half a slice past the last one (air there)
    "fine-in-plane-thick-slices": ((64, 64, 46), (0.8, 1.3, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "permuted-and-flipped": ((64, 64, 48), (2.0, 3.5, 1.1), (0, 1, 0, 0, 0, -1, -1, 0, 0)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_bundle_preprocessing_gives_the_engines_model_grid(bundle, held_out_case, tmp_path, name):
    """MONAI's Orientationd + Spacingd + EngineGridd + window land on the grid `engine infer` uses, value for value."""
    size, spacing, direction = GEOMETRIES[name]
    image = sitk.ReadImage(str(crop_ct(Path(held_out_case["image"]), tmp_path / "crop.nii.gz", size)))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))  # as NIfTI stores the geometry
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    steps = parser.get_parsed_content("preprocessing").transforms
    names = [type(t).__name__ for t in steps]
    ours = Compose(steps[: names.index("ScaleIntensityRanged") + 1])({"image": str(tmp_path / "ct.nii.gz")})["image"]
    spec = ModelSpec({"background": 0, "lung": 1}, (3.0, 3.0, 3.0), (-1000.0, 1000.0), 32)
    grid = SegmentationPredictor(torch.nn.Identity(), spec).model_grid(image)
    assert tuple(ours.shape[1:]) == grid.volume.shape
    assert np.abs(ours[0].numpy() - grid.volume).max() < 1e-4


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_monai_runner_segments_a_held_out_ct_as_engine_infer_does(bundle, lung_run, held_out_case, tmp_path):
    """Two CTs: the held-out crop, and a smaller crop of it whose sizes (62, 61, 47 voxels of 2 mm) leave the last
    voxel along x and z more than half a model voxel past the model grid (where the engine reads background)."""
    pytest.importorskip("fire")  # `python -m monai.bundle` is a fire CLI
    data = tmp_path / "data"
    data.mkdir()
    (data / "case.nii.gz").symlink_to(held_out_case["image"])
    crop_ct(Path(held_out_case["image"]), data / "odd.nii.gz", (62, 61, 47))
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out")],
                            cwd=bundle, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    predictor = SegmentationPredictor.from_checkpoint(lung_run / "model.pt", InferenceSettings(amp="off"))
    for name in ("case", "odd"):
        image = sitk.ReadImage(str(data / f"{name}.nii.gz"))
        written = sitk.ReadImage(str(tmp_path / "out" / f"{name}_seg.nii.gz"))
        assert written.GetSize() == image.GetSize()
        for what in ("GetOrigin", "GetSpacing", "GetDirection"):
            assert np.allclose(getattr(written, what)(), getattr(image, what)(), atol=1e-4), what
        ours = sitk.GetArrayFromImage(written)
        engine_map = sitk.GetArrayFromImage(predictor.predict(image).labelmap)
        assert set(np.unique(ours)) <= {0, 1, 2}
        for value in (1, 2):
            assert (engine_map == value).sum() > 100  # the model finds both lungs: the comparison means something
            assert _dice(ours == value, engine_map == value) >= MIN_AGREEMENT, name
        assert (ours != engine_map).mean() <= MAX_DIFFERING, name


def test_check_image_measures_the_agreement_into_the_readme(lung_run, held_out_case, tmp_path):
    result = run_export(ExportRequest(str(lung_run / "model.pt"), "monai-bundle", str(tmp_path / "b"),
                                      check_image=held_out_case["image"]))
    assert set(result.check["dice"]) == {"lung_right", "lung_left"}
    for scores in result.check["dice"].values():  # bf16 (`engine infer` on this CPU, if it has fast bf16) differs more
        assert scores["float32"] >= MIN_AGREEMENT and scores["default"] >= 0.97
    assert result.check["differing_voxels"]["float32"] <= MAX_DIFFERING * result.check["voxels"]
    readme = (tmp_path / "b" / "docs" / "README.md").read_text()
    assert f"Measured at export on `{held_out_case['image']}`" in readme
    assert f"{result.check['dice']['lung_left']['float32']:.4f}" in readme
    metadata = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert metadata["mimslicer"]["agreement_with_engine_infer"] == json.loads(json.dumps(result.check))


def test_label_values_that_are_not_channel_indices_reach_the_written_labelmap(held_out_case, tmp_path):
    """A network that answers its last channel everywhere; that channel is label value 5 ('spleen')."""
    cfg = build_finetune_config("tiny", overrides={"model.feature_size": 4})
    labels = {"background": 0, "liver": 1, "spleen": 5}
    model = build_segmenter("hybrid", cfg.encoder, cfg.model.roi, len(labels), cfg.model.feature_size)
    with torch.no_grad():
        model.out.conv.conv.weight.zero_()
        model.out.conv.conv.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    save_checkpoint(tmp_path / "model.pt", kind="segmentation", config=cfg.to_dict(), model=model, step=1,
                    extra={"labels": labels, "spacing": [3.0, 3.0, 3.0], "hu_window": [-1000, 1000], "roi": 32})
    run_export(ExportRequest(str(tmp_path / "model.pt"), "monai-bundle", str(tmp_path / "b")))
    written = run_bundle(tmp_path / "b", [Path(held_out_case["image"])], tmp_path / "out")[0]
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    assert 5 in values and set(np.unique(values)) <= {0, 5}  # channel 2 -> value 5; background outside the body


def test_bad_exports_fail_clearly(lung_run, tmp_path, capsys):
    with pytest.raises(UserError, match="Did you mean 'onnx'"):
        run_export(ExportRequest(str(lung_run / "model.pt"), "onxx", str(tmp_path / "x")))
    with pytest.raises(UserError, match="not empty"):
        run_export(ExportRequest(str(lung_run / "model.pt"), "monai-bundle", str(lung_run)))
    with pytest.raises(UserError, match="export the run's model.pt"):
        run_export(ExportRequest(str(lung_run / "checkpoint.pt"), "monai-bundle", str(tmp_path / "y")))
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "z")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
