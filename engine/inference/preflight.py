"""Inference pre-flight: the memory one volume's segmentation needs, the tile batch that fits, and how long it will
take. `engine infer` checks every volume before its big buffers exist; `engine infer --dry-run` prints the plan.

Memory is the larger of two things. The volume's buffers, phase by phase of `SegmentationPredictor.predict`
(model grid, sliding-window output and count, probabilities, the way back onto the input grid, the labelmap),
counted from their shapes. And the network's tile batch, measured by running it on the `meta` device under
`TensorMemoryTracker`, once per tile batch size. Time is
measured too: one real tile batch after a warm-up, times the number of batches; reading and resampling as they
happened; one probability channel resampled back onto the input grid, times the number of channels."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
from monai.data.utils import dense_patch_slices
from torch.func import functional_call

from engine.imageio.geometry import resample_channel
from engine.runtime.device import autocast
from engine.runtime.memory import (
    F32,
    GB,
    INT64,
    Activations,
    MemoryEstimate,
    module_bytes,
    require_fits,
    runtime_allowance,
    traced,
)


@dataclass(frozen=True)
class VolumeShape:
    """The sizes one volume's segmentation allocates by: input, model grid, and the body box windows run over."""

    input_size: tuple[int, ...]
    input_bytes: int  # per input voxel (its pixel type)
    grid_size: tuple[int, ...]
    box_size: tuple[int, ...]

    @classmethod
    def of(cls, image: sitk.Image, grid: sitk.Image, box: tuple[slice, ...]) -> "VolumeShape":
        pixel = image.GetSizeOfPixelComponent() * image.GetNumberOfComponentsPerPixel()
        return cls(tuple(image.GetSize()), pixel, tuple(grid.GetSize()), tuple(s.stop - s.start for s in box))

    @property
    def input_voxels(self) -> int:
        return math.prod(self.input_size)

    @property
    def grid_voxels(self) -> int:
        return math.prod(self.grid_size)

    @property
    def box_voxels(self) -> int:
        return math.prod(self.box_size)

    def padded_box_voxels(self, roi: int) -> int:
        """The window input: the box, padded up to the ROI along axes where it is smaller."""
        return math.prod(max(s, roi) for s in self.box_size)


def count_windows(box_size: tuple[int, ...], roi: int, overlap: float) -> int:
    """How many ROI windows MONAI's sliding window places over a box (padded up to the ROI first)."""
    size = [max(s, roi) for s in box_size]
    interval = [roi if s == roi else max(int(roi * (1 - overlap)), 1) for s in size]
    return len(dense_patch_slices(size, (roi,) * len(size), interval, return_slice=False))


def buffer_phases(v: VolumeShape, channels: int, roi: int, tta: bool, probabilities: bool,
                  uncertainty: bool = False) -> dict[str, int]:
    """Bytes the volume's buffers hold at the peak of each phase of `SegmentationPredictor.predict` (the tile
    batch's activations come on top during the sliding window). Read from the code, array by array."""
    k, n_in, n_grid, n_box = channels, v.input_voxels, v.grid_voxels, v.box_voxels
    padded = v.padded_box_voxels(roi)
    image = n_in * v.input_bytes
    kept = image + 2 * n_grid * F32  # the input, its model-grid image and the windowed volume live to the end
    probs = k * n_grid * F32
    window_in = n_box * F32 + (padded * F32 if padded > n_box else 0)  # the box's copy, its padded copy
    window_out = (k + 1) * padded * F32  # MONAI's output and count map
    flips = (padded + 2 * k * n_box) * F32 if tta else 0  # a flipped input, flipped output, running sum
    # a channel's two copies and image on the grid; on the input grid: the resampled image, its array, the best
    # so far, the previous channel (still bound while the next is made), the index and the comparison mask
    per_channel = 3 * n_grid * F32 + n_in * (4 * F32 + 2 + 1)
    prob_images = (k - 1) * n_in * F32 if probabilities else 0
    labelmap = n_in * (1 + 1 + INT64 + 1)  # index, values[index], uint8, image
    phases = {
        "resample": 2 * image + n_grid * F32,  # the input, its reoriented copy, the model grid
        "window": image + 5 * n_grid * F32,  # the grid, its array, a float copy and two temporaries
        "body box": kept + n_grid * (1 + 3 * INT64),  # a mask and the int64 coordinates of the body's voxels
        "sliding window": kept + probs + window_in + window_out + flips,
        "blend": kept + probs + window_in + window_out + k * n_box * F32 + flips,  # output / count, its copy
        "back to input": kept + probs + per_channel,
        "labelmap": kept + probs + prob_images + labelmap,
    }
    if uncertainty:  # after the labelmap (uint8 image kept): the running entropy; per channel its image on the input
        # grid, the array, the clipped copy and two temporaries; at the end the normalised copy, clipped, as an image
        phases["uncertainty"] = kept + probs + prob_images + n_in + 6 * n_in * F32
    return phases


def tile_peak(model: nn.Module, roi: int, batch: int, in_channels: int = 1) -> Activations:
    """What one tile batch holds at its peak in the sliding window (input, activations, probabilities and their
    blending weights), measured on the meta device with the model's own code and shapes."""
    def blend(logits: torch.Tensor) -> torch.Tensor:  # [b, K, R, R, R]
        return torch.softmax(logits.float(), dim=1) * torch.empty(roi, roi, roi, device="meta")
    return forward_peak(model, (batch, in_channels, roi, roi, roi), blend)


def forward_peak(model: nn.Module, shape: tuple[int, ...], then=lambda y: y) -> Activations:
    """The peak of `then(model(x))` without gradients for an input `x` of `shape` (made inside), measured on the
    meta device: the model's parameters and buffers are swapped for meta tensors of the same shapes."""
    meta = {name: torch.empty_like(t, device="meta") for name, t in (*model.named_parameters(),
                                                                      *model.named_buffers())}

    def forward():
        with torch.no_grad():
            return then(functional_call(model, meta, (torch.empty(*shape, device="meta"),)))
    return traced(forward)


@dataclass
class VolumePlan:
    """What the pre-flight says about one volume: sizes, windows, tile batch, memory and (dry run) time."""

    shape: VolumeShape
    windows: int
    tile_batch: int
    auto_batch: bool
    estimate: MemoryEstimate
    available: dict[str, int]
    seconds: dict[str, float] | None = None

    def to_dict(self) -> dict:
        out = {"input_size": list(self.shape.input_size), "grid_size": list(self.shape.grid_size),
               "box_size": list(self.shape.box_size), "windows": self.windows, "tile_batch": self.tile_batch,
               "tile_batch_auto": self.auto_batch, "memory_gb": _gb(self.estimate.host + self.estimate.device),
               "memory_parts_gb": {name: _gb(n) for name, n in self.estimate.parts},
               "available_gb": {pool: _gb(n) for pool, n in self.available.items()}}
        if self.estimate.device:
            out["memory_pools_gb"] = {"host": _gb(self.estimate.host), "device": _gb(self.estimate.device)}
        if self.seconds is not None:
            out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return out


def _gb(n: int) -> float:
    return round(n / GB, 3)


class InferencePreflight:
    """The pre-flight of one predictor: each tile batch is measured once, then every volume gets a plan."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.channels, self.roi = len(predictor.spec.labels), predictor.spec.roi
        self.params = module_bytes(predictor.model)
        self.in_channels = predictor.spec.in_channels
        self._tiles: dict[int, Activations] = {}

    def tiles(self, batch: int) -> Activations:
        if batch not in self._tiles:
            self._tiles[batch] = tile_peak(self.predictor.model, self.roi, batch, self.in_channels)
        return self._tiles[batch]

    def plan(self, image: sitk.Image, prepared, probabilities: bool, tile_batch: int | None,
             available: dict[str, int], uncertainty: bool = False) -> VolumePlan:
        """The tile batch asked for, or (None) the largest that fits up to the settings' one, and its estimate."""
        shape = VolumeShape.of(image, prepared.grid, prepared.box)
        windows = count_windows(shape.box_size, self.roi, self.predictor.settings.overlap)
        batch = tile_batch or self.predictor.settings.sw_batch_size
        if tile_batch is None:
            fitting = (b for b in range(min(batch, windows), 0, -1)
                       if self.estimate(shape, b, probabilities, uncertainty).fits(available))
            batch = next(fitting, 1)
        return VolumePlan(shape, windows, batch, tile_batch is None,
                          self.estimate(shape, batch, probabilities, uncertainty), available)

    def estimate(self, shape: VolumeShape, batch: int, probabilities: bool,
                 uncertainty: bool = False) -> MemoryEstimate:
        """Peak memory of one volume with the model already loaded: the worst phase of its buffers (with the tile
        batch's activations on top during the sliding window), plus the runtime allowance. On a GPU the tiles
        and the weights are its memory; the buffers stay on the host."""
        phases = buffer_phases(shape, self.channels, self.roi, self.predictor.settings.tta, probabilities,
                               uncertainty)
        activations = self.tiles(batch)
        runtime = runtime_allowance(activations, "inference")
        if self.predictor.device.type != "cpu":
            worst = max(phases, key=phases.get)
            return MemoryEstimate(phases[worst] + runtime, self.params + activations.peak,
                                  (("buffers", phases[worst]), ("tiles", activations.peak), ("runtime", runtime)))
        totals = {**phases, "sliding window": phases["sliding window"] + activations.peak}
        worst = max(totals, key=totals.get)
        tiles = activations.peak if worst == "sliding window" else 0
        return MemoryEstimate(totals[worst] + runtime, 0, (("buffers", phases[worst]), ("tiles", tiles),
                                                           ("runtime", runtime)))

    def time(self, plan: VolumePlan, prepared, image: sitk.Image, read_seconds: float) -> dict[str, float]:
        """Predicted seconds: reading and resampling as they took; the first tile batch (which pays for the
        kernels' set-up) and the next one, timed for real, the latter times the remaining batches; one channel
        resampled back onto the input grid, timed, times the channels. Writing the labelmap is not counted."""
        p = self.predictor
        first, per_batch = time_tile_batches(p.model, (plan.tile_batch, self.in_channels, *(self.roi,) * 3),
                                             p.device, p.amp)
        batches = math.ceil(plan.windows / plan.tile_batch) * p.passes
        back = time_back_to_input(prepared.grid, image, self.channels)
        return {"total": read_seconds + first + (batches - 1) * per_batch + back, "read_and_grid": read_seconds,
                "batches": batches, "first_batch": first, "per_batch": per_batch, "back_to_input": back}


def check_volume(plan: VolumePlan, name: str) -> None:
    """Refuse a volume whose segmentation would not fit, saying what to change."""
    if plan.tile_batch > 1:
        hint = "try --sw-batch-size 1 (fewer windows per forward)"
    else:
        hint = ("even one window at a time does not fit: free memory, use a machine with more, or leave out "
                "--probabilities, --uncertainty and --tta if given")
    require_fits(plan.estimate, plan.available, f"segmenting {name} (tile batch {plan.tile_batch})", hint)


def time_tile_batches(model: nn.Module, shape: tuple[int, ...], device: torch.device, amp) -> tuple[float, float]:
    """Seconds of the first and of the second forward of a tile batch of `shape` ([b, C, R, R, R]) on `device`,
    softmax included."""
    x = torch.rand(*shape, device=device)
    seconds = []
    with torch.no_grad(), autocast(device, amp):
        for _ in range(2):
            t0 = time.perf_counter()
            torch.softmax(model(x).float(), dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t0)
    return seconds[0], seconds[1]


def time_back_to_input(grid: sitk.Image, image: sitk.Image, channels: int) -> float:
    """Seconds to resample `channels` probability maps from the model grid onto the input (one timed, times K)."""
    zeros = np.zeros(grid.GetSize(), dtype=np.float32)  # [X, Y, Z]
    t0 = time.perf_counter()
    resample_channel(zeros, grid, image)
    return (time.perf_counter() - t0) * channels


def dry_run_record(source, target, plan: VolumePlan, model_bytes: int) -> dict:
    """A volume's dry run as plain data: the plan, the weights it adds, and whether it fits."""
    peak = plan.estimate.host + plan.estimate.device + model_bytes
    return {"input": str(source), "output": str(target), "fits": plan.estimate.fits(plan.available),
            "peak_gb": _gb(peak), "model_gb": _gb(model_bytes), **plan.to_dict()}


def format_dry_run(record: dict) -> str:
    """The lines `engine infer --dry-run` prints for one volume."""
    size = "x".join
    auto = " (the largest that fits, up to the default)" if record["tile_batch_auto"] else ""
    parts = ", ".join(f"{name} {gb:.2f}" for name, gb in {"model": record["model_gb"],
                                                            **record["memory_parts_gb"]}.items() if gb >= 0.005)
    available = ", ".join(f"{pool} {gb:.2f} GB" for pool, gb in record["available_gb"].items())
    verdict = "fits" if record["fits"] else "does NOT fit (infer would refuse it)"
    t = record["seconds"]
    return "\n".join([
        f"{record['input']}: {size(map(str, record['input_size']))} voxels -> model grid "
        f"{size(map(str, record['grid_size']))}, body box {size(map(str, record['box_size']))}",
        f"  windows: {record['windows']}, tile batch {record['tile_batch']}{auto}",
        f"  memory: {record['peak_gb']:.2f} GB predicted peak ({parts}); available {available}: {verdict}",
        f"  time: {t['total']:.1f} s predicted ({t['batches']:.0f} tile batches x {t['per_batch']:.3f} s, "
        f"reading and resampling {t['read_and_grid'] + t['back_to_input']:.1f} s)"])
