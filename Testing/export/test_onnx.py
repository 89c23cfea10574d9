"""`engine export --format onnx`: onnxruntime gives torch's logits on windows of a real held-out CT within the
stated tolerance, with a dynamic batch; the graph holds standard ONNX operators only; the encoder's custom CPU
depth-wise backward and the decoder's channels-last training format stay out of eval, so tracing exporters see
plain convolutions."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.export.onnx import INPUT, OUTPUT, TOLERANCE, centre_window, check_window, save_onnx
from engine.inference.run import segmenter_and_spec
from engine.models import hybrid_encoder
from engine.runtime.checkpoint import load_checkpoint

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(lung_run, held_out_case, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--checkpoint", str(lung_run / "model.pt"), "--format", "onnx", "--out", str(out),
                 "--check-image", held_out_case["image"]]) == 0
    return out


def test_the_folder_says_what_a_window_must_be_and_how_the_export_was_checked(exported, lung_run, held_out_case):
    assert sorted(p.name for p in exported.iterdir()) == ["MODEL_CARD.md", "model.json", "model.onnx"]
    spec = json.loads((exported / "model.json").read_text())
    assert (spec["spacing"], spec["hu_window"], spec["roi"]) == ([3.0, 3.0, 3.0], [-1000, 1000], 32)
    assert [c["label"] for c in spec["output"]["channels"]] == ["background", "lung_right", "lung_left"]
    check = spec["check"]
    assert check["checked"] and check["window"].startswith(held_out_case["image"])
    assert check["relative_difference"] <= TOLERANCE and check["argmax_agreement"] == 1.0


def test_onnxruntime_gives_torchs_logits_on_real_ct_windows(exported, lung_run, held_out_case):
    model, spec = segmenter_and_spec(load_checkpoint(lung_run / "model.pt"))
    model.eval()
    centre, _ = check_window(model, spec, Path(held_out_case["image"]))
    shifted = torch.roll(centre, shifts=(5, -3, 4), dims=(2, 3, 4))  # a second, different real-CT window
    windows = torch.cat([centre, shifted])  # batch 2: the batch axis is dynamic (exported with batch 1)
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: windows.numpy()})[0]
    with torch.no_grad():
        expected = model(windows).numpy()
    assert got.shape == expected.shape == (2, 3, 32, 32, 32)
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999
    assert np.abs(expected).max() > 0.5  # a trained network's logits, not a constant


def test_the_graph_is_valid_onnx_of_standard_operators(exported):
    graph = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(graph)
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert "Conv" in {node.op_type for node in graph.graph.node}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_eval_takes_the_plain_depthwise_path_and_training_the_fast_one(lung_run, monkeypatch, tmp_path):
    model, spec = segmenter_and_spec(load_checkpoint(lung_run / "model.pt"))
    calls = []
    original = hybrid_encoder._DepthwiseConv3d.apply
    monkeypatch.setattr(hybrid_encoder._DepthwiseConv3d, "apply", lambda *a: calls.append(1) or original(*a))
    window = torch.rand(1, 1, 32, 32, 32)
    model.train()
    model(window).float().mean().backward()  # channels-last decoder, custom backward
    assert calls
    calls.clear()
    model.eval()
    with torch.no_grad():
        expected = model(window)
    traced = torch.jit.trace(model, window, check_trace=False)  # tracing records no custom Python function...
    assert not calls
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)  # ...so it can be saved (a Python function call cannot)
    buffer.seek(0)
    assert torch.allclose(torch.jit.load(buffer)(window), expected, atol=1e-5)
    save_onnx(model, window, tmp_path / "m.onnx")  # after a training step: eval is contiguous again
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: window.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= TOLERANCE * float(expected.abs().max())


def test_centre_window_stays_inside_and_pads_what_is_smaller():
    volume = np.arange(40 * 20 * 10, dtype=np.float32).reshape(40, 20, 10)
    window = centre_window(volume, (slice(30, 40), slice(0, 20), slice(0, 10)), 16)
    assert window.shape == (16, 16, 16)
    assert np.array_equal(window[:, :16, :10], volume[24:40, 2:18, 0:10])  # clamped to the end along x
    assert not window[:, :, 10:].any()  # z is shorter than the window: zero-padded
