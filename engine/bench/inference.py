"""Whole-CT segmentation timing: one contender (our segmenter, MONAI SwinUNETR or MONAI UNet) end to end through the
same pipeline `engine infer` uses (read -> model grid -> body box -> sliding window -> back to the input grid ->
write), with the same ROI, overlap, window batch and output channels. Only the network differs, so the ratio of
wall times is the ratio users would see. Random weights: timing does not depend on them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch
import torch.nn as nn
from monai.networks.nets import SwinUNETR, UNet

from engine.bench.flops import flop_counter
from engine.bench.machine import peak_rss_gb
from engine.config.finetune import FinetuneConfig, build_finetune_config
from engine.imageio.labelmap import write_labelmap
from engine.imageio.volumes import read_input
from engine.inference.run import InferenceSettings, ModelSpec, SegmentationPredictor
from engine.models.segmenter import build_segmenter
from engine.runtime.device import autocast

CONTENDERS = ("ours", "swinunetr", "unet")
# the manual contours of the benchmark CT (mirp_lung1_001): background + 4 labels = the output channels
LABELS = {"background": 0, "GTV-1": 1, "Spinal-Cord": 2, "Lung-Left": 3, "Lung-Right": 4}
UNET_CHANNELS = (16, 32, 64, 128, 256)  # MONAI's 3D UNet tutorial network (spleen segmentation)


@dataclass(frozen=True)
class InferenceJob:
    contender: str
    ct: str  # the volume to segment
    out_dir: str
    preset: str  # our segmentation preset: ROI, spacing, window, decoder width
    overrides: dict
    overlap: float = 0.5
    sw_batch_size: int = 2
    amp: str = "auto"
    swin_feature_size: int = 48


class TimedForward(nn.Module):
    """Wraps a network: counts the windows it sees and the seconds spent inside its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.windows, self.seconds = 0, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, R, R, R]
        t0 = time.perf_counter()
        y = self.model(x)
        if y.is_cuda:
            torch.cuda.synchronize(y.device)
        self.seconds += time.perf_counter() - t0
        self.windows += x.shape[0]
        return y


def segmentation_config(preset: str, overrides: dict) -> FinetuneConfig:
    return build_finetune_config(preset, "segmentation", None, overrides)


def build_contender(name: str, cfg: FinetuneConfig, out_channels: int, swin_feature_size: int) -> nn.Module:
    m, in_channels = cfg.model, cfg.encoder.in_channels
    if name == "ours":
        return build_segmenter(m.backbone, cfg.encoder, m.roi, out_channels, m.feature_size, m.decoder)
    if name == "swinunetr":
        return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=swin_feature_size)
    if name == "unet":
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=UNET_CHANNELS,
                    strides=(2, 2, 2, 2), num_res_units=2)
    raise ValueError(f"unknown contender '{name}'; choose one of {', '.join(CONTENDERS)}")


def window_flops(model: nn.Module, predictor: SegmentationPredictor, batch: int) -> float:
    """FLOPs of the network on one ROI window (torch.utils.flop_counter: matmuls, convolutions, attention), from a
    forward over `batch` windows, which also warms the network up before the timed run."""
    roi, device = predictor.spec.roi, predictor.device
    x = torch.rand(batch, 1, roi, roi, roi, device=device)
    with torch.inference_mode(), autocast(device, predictor.amp), flop_counter() as counter:
        model(x)
    return counter.get_total_flops() / batch


def measure_whole_ct(job: InferenceJob) -> dict:
    """Build the contender, warm it up (and count its FLOPs per window), then time one end-to-end segmentation."""
    cfg = segmentation_config(job.preset, job.overrides)
    torch.manual_seed(0)
    network = build_contender(job.contender, cfg, len(LABELS), job.swin_feature_size)
    spec = ModelSpec(LABELS, tuple(cfg.data.spacing), tuple(cfg.data.hu_window), cfg.model.roi)
    settings = InferenceSettings(overlap=job.overlap, sw_batch_size=job.sw_batch_size, amp=job.amp)
    timed = TimedForward(network)
    predictor = SegmentationPredictor(timed, spec, settings)
    t0 = time.perf_counter()
    flops = window_flops(network, predictor, job.sw_batch_size)
    warmup_s = time.perf_counter() - t0
    phases = _segment(predictor, Path(job.ct), Path(job.out_dir) / f"{job.contender}_seg.nii.gz")
    gflop = flops * timed.windows / 1e9
    return {
        **phases, "network_s": round(timed.seconds, 3), "windows": timed.windows, "warmup_s": round(warmup_s, 3),
        "gflop_per_window": round(flops / 1e9, 3), "gflop": round(gflop, 2),
        "gflops": round(gflop / max(timed.seconds, 1e-9), 2),  # achieved inside the network
        "gflops_end_to_end": round(gflop / max(phases["wall_s"], 1e-9), 2),
        "params_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3), "device": str(predictor.device),
        "amp": str(predictor.amp).replace("torch.", "") if predictor.amp else "off",
    }


def _segment(predictor: SegmentationPredictor, source: Path, target: Path) -> dict:
    """read -> predict (model grid, sliding window, back to the input grid) -> write, each phase timed."""
    t0 = time.perf_counter()
    image, _ = read_input(source)
    t1 = time.perf_counter()
    result = predictor.predict(image)
    t2 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_labelmap(result.labelmap, target, {k: v for k, v in LABELS.items() if v})
    t3 = time.perf_counter()
    return {"wall_s": round(t3 - t0, 3), "read_s": round(t1 - t0, 3), "predict_s": round(t2 - t1, 3),
            "write_s": round(t3 - t2, 3)}


def prepare_ct(source: Path, crop: tuple[int, int, int] | None, workdir: Path) -> tuple[Path, list[int]]:
    """The CT to segment: the file itself, or a central crop of `crop` voxels (x, y, z) that keeps its geometry."""
    image = sitk.ReadImage(str(source))
    if crop is None:
        return source, list(image.GetSize())
    start = [max(0, (n - c) // 2) for n, c in zip(image.GetSize(), crop)]
    stop = [min(n, s + c) for n, s, c in zip(image.GetSize(), start, crop)]
    cropped = image[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    target = workdir / f"cropped_{source.name}"
    sitk.WriteImage(cropped, str(target))
    return target, list(cropped.GetSize())
