"""Training pre-flight: the peak memory of pre-training and fine-tuning, checked before the data is read and the
run folder is made, with a setting that would fit when the asked one does not.

The peak is the data kept in memory (cached volumes, sized from their headers), the loading of a volume, the model
(parameters, gradients, AdamW's two moments), one training step (its activations and gradients, measured by running
the run's own step function on the `meta` device at the real batch shapes), for fine-tuning the validation
(sliding window and Dice on the largest validation case), and the runtime allowance."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from monai.data import MetaTensor

from engine.config.schema import merge_trees, undot
from engine.errors import UserError
from engine.imageio.geometry import model_grid_size
from engine.imageio.volumes import VolumeHeader, read_header
from engine.runtime.memory import (
    GB,
    Activations,
    MemoryEstimate,
    available_for,
    module_bytes,
    require_fits,
    runtime_allowance,
    traced,
)


def grid_voxels(header: VolumeHeader, spacing) -> int:
    return math.prod(model_grid_size(header.size, header.spacing, header.direction, spacing))


def load_peak(header: VolumeHeader, spacing, per_voxel: tuple[int, int]) -> int:
    """Bytes one volume holds while it is read and brought to the model grid (`per_voxel`: input, grid)."""
    return header.voxels * (header.pixel_bytes + per_voxel[0]) + grid_voxels(header, spacing) * per_voxel[1]


def training_step_peak(model: nn.Module, step_fn, batch: dict) -> Activations:
    """The peak of one training step: the step function's forward and backward passes (as many as it yields),
    gradients included, measured on the meta device."""
    def run():
        for _, total in step_fn(batch, 0.0):
            total.backward()
    return traced(run)


# Under CPU bf16 autocast a step holds bf16 copies of what it saves for backward and oneDNN's reorder buffers, which
# the meta-device trace (where autocast does nothing) cannot see. On small networks that doubled the peak (MiM tiny
# +34 to +46 MB on a 20.5 MB trace; a fine-tuning step under emulated bf16 317 MB against 172 MB); at `base` size
# it did not grow: MiM 3.86 GB against 3.72 in fp32, HybridMIM UNet with full reconstruction 9.2 GB against 13.1
# (bf16 activations are half the size). So the step counts twice, up to CPU_BF16_EXTRA_CAP more.
CPU_BF16_EXTRA_CAP = 256 * 2**20


def bf16_step(step: Activations) -> Activations:
    """A step traced on the meta device as it peaks under CPU bf16 autocast (see CPU_BF16_EXTRA_CAP)."""
    return Activations(step.peak + min(step.peak, CPU_BF16_EXTRA_CAP), step.heap + min(step.heap, CPU_BF16_EXTRA_CAP))


def optimiser_bytes(model: nn.Module) -> int:
    """Parameters and buffers, plus AdamW's two moments of every trainable parameter (gradients are in the step)."""
    return module_bytes(model) + 2 * module_bytes(model, trainable_only=True)


def meta_batch(shape, label_shape=None, label_dtype=torch.float32) -> dict:
    """A batch as the data loaders give it ({"image": [B, C, ...], "label": ...}), on the meta device."""
    batch = {"image": MetaTensor(torch.empty(*shape, device="meta"))}
    if label_shape is not None:
        batch["label"] = MetaTensor(torch.empty(*label_shape, device="meta", dtype=label_dtype))
    return batch


# --- pre-training -------------------------------------------------------------------------------------------


# --- fine-tuning --------------------------------------------------------------------------------------------


# --- shared -------------------------------------------------------------------------------------------------

RESUMED = "a resumed run keeps its settings: free memory or use a machine with more"
PRESETS_BY_SIZE = ("tiny", "small", "base")


def check_fits(estimate_of: Callable, cfg, alternatives: Callable, device: torch.device, resume: bool, what: str,
           data_hint: str) -> MemoryEstimate:
    """The estimate of `cfg` if it fits; otherwise a refusal naming the first alternative setting that fits."""
    estimate = on_device(estimate_of(cfg), device)
    available = available_for(device)  # after estimating: the estimate's own imports are not the run's
    if estimate.fits(available):
        return estimate
    hint = RESUMED
    if not resume:
        hint = suggestion(alternatives(cfg), lambda changed: on_device(estimate_of(changed), device), available,
                          data_hint if _data_heavy(estimate) else "", smaller_preset(cfg.preset))
    require_fits(estimate, available, what, hint)
    return estimate


def smaller_preset(preset: str) -> str | None:
    if preset not in PRESETS_BY_SIZE[1:]:
        return None
    return PRESETS_BY_SIZE[PRESETS_BY_SIZE.index(preset) - 1]


def training_estimate(data: int, reading: int, model_bytes: int,
                       activations: dict[str, Activations]) -> MemoryEstimate:
    """The worse of reading the data before training (`reading` bytes: the cache filling up) and training (`data`
    bytes, model and optimiser, the larger of the step and validation), plus the runtime allowance."""
    worst = max(activations, key=lambda name: activations[name].peak)
    training = data + model_bytes + activations[worst].peak
    runtime = runtime_allowance(activations[worst], "training")
    if reading > training:
        return MemoryEstimate(reading + runtime, 0, (("data", reading), ("runtime", runtime)))
    return MemoryEstimate(training + runtime, 0, (("data", data), ("model", model_bytes),
                                                  (worst, activations[worst].peak), ("runtime", runtime)))


def read_headers(paths) -> list[VolumeHeader]:
    """The header of every path (each file read once, however often it is listed)."""
    paths = list(paths)
    headers = {path: read_header(path) for path in dict.fromkeys(paths)}
    return [headers[path] for path in paths]


def as_flags(change: dict) -> str:
    return " ".join(f"--set {key}={value}" for key, value in change.items())


def valid_changes(cfg, changes: list[dict], build: Callable) -> list[tuple[str, object]]:
    """The changes of `cfg` that give a valid config of its own kind (method, task, backbone), each as the flags a
    user can paste and the config they make; a change that does not validate is never offered."""
    tree, valid = cfg.to_dict(), []
    for change in changes:
        try:
            valid.append((as_flags(change), build(merge_trees(tree, undot(change))).validate()))
        except UserError:
            continue
    return valid


def smaller_sides(side: int, step: int) -> list[int]:
    """Every smaller multiple of `step` below `side`, largest first: the ROIs to try, least reduction first."""
    return list(range((side - 1) // step * step, 0, -step))


def _data_heavy(estimate: MemoryEstimate) -> bool:
    return dict(estimate.parts).get("data", 0) > (estimate.host + estimate.device) / 2


def suggestion(alternatives, estimate_with, available: dict[str, int], data_hint: str = "",
               smaller: str | None = None) -> str:
    """The first alternative setting whose estimate fits (tried in order; each one a valid config, see
    `valid_changes`), as a hint a user can paste; else the `smaller` preset."""
    hints = [data_hint] if data_hint else []
    for flags, changed in alternatives:
        estimate = estimate_with(changed)
        if estimate.fits(available):
            hints.append(f"{flags} would need about {(estimate.host + estimate.device) / GB:.2f} GB")
            break
    else:
        hints.append("nothing smaller of this preset fits: " + (f"try --preset {smaller}" if smaller else
                                                                 "free memory or use a machine with more"))
    return "; ".join(hints)


def on_device(estimate: MemoryEstimate, device: torch.device) -> MemoryEstimate:
    """On an accelerator the model and activations live in its memory; data and the runtime stay on the host."""
    if device.type == "cpu":
        return estimate
    parts = dict(estimate.parts)
    host = parts.get("data", 0) + parts.get("runtime", 0)
    return MemoryEstimate(host, estimate.host - host, estimate.parts)
