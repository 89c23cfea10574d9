"""`engine export --format onnx`: the segmentation network for one window, image [B, 1, R, R, R] (windowed CT in
[0, 1], nearest-RAS axes, model spacing) -> logits [B, K, R, R, R], as ONNX with a dynamic batch axis.

The folder holds model.onnx, model.json (what a window must be: spacing, HU window, orientation, ROI, labels; and
the check below) and MODEL_CARD.md. Sliding the window over a CT and resampling back stay with the caller.

PyTorch's TorchScript-based exporter is used (`dynamo=False`): the torch.export-based one needs onnxscript, which
the engine does not depend on. The network exports in eval mode: its decoder is contiguous there (`train()`
switches to channels-last only for training) and the encoder's depth-wise convolution takes the plain path (the
custom CPU backward is only for gradients), so nothing custom reaches the exporter.

Every export is checked with onnxruntime, when installed, against torch on one window (a window of --check-image,
or a synthetic one): the largest logit difference must stay within TOLERANCE of the largest logit."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.errors import UserError
from engine.finetuning.model_card import MODEL_CARD, model_card
from engine.imageio.volumes import read_input
from engine.inference.run import InferenceSettings, ModelSpec, SegmentationPredictor, segmenter_and_spec
from engine.runtime.atomic import write_atomic, write_json, write_text

log = logging.getLogger(__name__)
OPSET = 17
INPUT, OUTPUT = "image", "logits"
TOLERANCE = 1e-4  # max |onnxruntime - torch| relative to max |torch| (float32 kernels differ in summation order)


def export_onnx(ckpt: dict, out: Path, check_image: Path | None = None) -> tuple[list[Path], dict]:
    """model.onnx, model.json and MODEL_CARD.md in `out`, and the check; raises if onnxruntime disagrees with torch."""
    model, spec = segmenter_and_spec(ckpt)
    model.eval()
    window, source = check_window(model, spec, check_image)
    path = write_atomic(out / "model.onnx", lambda tmp: save_onnx(model, window, tmp))
    check = {"window": source, **compare_with_torch(model, path, window)}
    files = [path, write_json(_model_json(ckpt, spec, check), out / "model.json"),
             write_text(model_card(ckpt), out / MODEL_CARD)]
    if check.get("relative_difference") is not None and check["relative_difference"] > TOLERANCE:
        raise UserError(f"onnxruntime's logits differ from torch's by {check['max_abs_difference']:.3g} "
                        f"({check['relative_difference']:.3g} of the largest logit, tolerance {TOLERANCE}); "
                        f"{path} is not trustworthy")
    return files, check


def save_onnx(model: nn.Module, window: torch.Tensor, path: Path) -> None:
    """The eval-mode network traced on `window` [1, C, R, R, R], batch axis dynamic."""
    with warnings.catch_warnings(), torch.no_grad():
        # shape checks and the position-embedding choice become constants: right for windows of side R
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*instance_norm.*")  # MONAI's InstanceNorm uses input statistics
        torch.onnx.export(model, (window,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def compare_with_torch(model: nn.Module, path: Path, window: torch.Tensor) -> dict:
    """Logits of onnxruntime and torch on `window`: largest absolute difference, that relative to the largest
    logit, and the share of voxels whose argmax label agrees."""
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: %s was not checked (pip install onnxruntime)", path)
        return {"checked": False, "reason": "onnxruntime not installed"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: window.numpy()})[0]
    with torch.no_grad():
        expected = model(window).numpy()
    difference = float(np.abs(got - expected).max())
    return {"checked": True, "onnxruntime": onnxruntime.__version__, "tolerance": TOLERANCE,
            "max_abs_difference": difference, "max_abs_logit": float(np.abs(expected).max()),
            "relative_difference": difference / max(float(np.abs(expected).max()), 1e-12),
            "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).mean())}


def check_window(model: nn.Module, spec: ModelSpec, image_path: Path | None) -> tuple[torch.Tensor, str]:
    """One window [1, 1, R, R, R]: the centre of the body of `image_path` on the model grid, or a synthetic one."""
    roi = spec.roi
    if image_path is None:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(1, spec.in_channels, roi, roi, roi, generator=generator), "synthetic (uniform noise, seed 0)"
    image, _ = read_input(image_path)
    prepared = SegmentationPredictor(model, spec, InferenceSettings(device="cpu")).model_grid(image)
    return torch.from_numpy(centre_window(prepared.volume, prepared.box, roi))[None, None], \
        f"{image_path}: the {roi}^3 window at the centre of the body, on the model grid"


def centre_window(volume: np.ndarray, box: tuple[slice, ...], roi: int) -> np.ndarray:
    """The roi^3 window of `volume` [X, Y, Z] centred on `box`, inside the volume; zero-padded where it is smaller."""
    window = np.zeros((roi,) * 3, dtype=np.float32)
    src, dst = [], []
    for side, cut in zip(volume.shape, box):
        start = min(max((cut.start + cut.stop) // 2 - roi // 2, 0), max(side - roi, 0))
        length = min(roi, side)
        src.append(slice(start, start + length))
        dst.append(slice(0, length))
    window[tuple(dst)] = volume[tuple(src)]
    return window


def _model_json(ckpt: dict, spec: ModelSpec, check: dict) -> dict:
    ordered = sorted(spec.labels.items(), key=lambda kv: kv[1])
    return {
        "format": "onnx", "opset": OPSET, "file": "model.onnx",
        "input": {"name": INPUT, "shape": ["batch", spec.in_channels, spec.roi, spec.roi, spec.roi],
                  "dtype": "float32", "meaning": f"CT in the nearest-RAS orientation (axes x, y, z towards R, A, S), "
                                                 f"resampled to {list(spec.spacing)} mm, clipped to "
                                                 f"{list(spec.hu_window)} HU and scaled to [0, 1]"},
        "output": {"name": OUTPUT, "shape": ["batch", len(ordered), spec.roi, spec.roi, spec.roi], "dtype": "float32",
                   "meaning": "logits per channel; softmax over channels, then channel k is the k-th label value",
                   "channels": [{"channel": k, "label": name, "value": value} for k, (name, value) in
                                enumerate(ordered)]},
        "spacing": list(spec.spacing), "hu_window": list(spec.hu_window), "roi": spec.roi,
        "labels": dict(spec.labels), "step": ckpt.get("step"), "versions": ckpt.get("versions"),
        "check": check,
    }

