"""Training pre-flight: the peak memory of pre-training and fine-tuning, checked before the data is read and the
run folder is made, with a setting that would fit when the asked one does not.

The peak is the data kept in memory (cached volumes, sized from their headers), the loading of a volume, the model
(parameters, gradients, AdamW's two moments), one training step (its activations and gradients, measured by running
the run's own step function on the `meta` device at the real batch shapes), for fine-tuning the validation
(sliding window and Dice on the largest validation case), and the runtime allowance."""
from __future__ import annotations

import copy
import math
import os
from typing import Callable

import torch
import torch.nn as nn
from monai.data import MetaTensor

from engine.config import PretrainConfig, config_from_dict, merge_trees, undot
from engine.data import IN_MEMORY_CACHE_MAX
from engine.errors import UserError
from engine.finetune_config import FinetuneConfig, finetune_config_from_dict
from engine.geometry import model_grid_size
from engine.imageio import VolumeHeader, read_header
from engine.preflight import (F32, GB, Activations, MemoryEstimate, available_for, module_bytes, require_fits,
                              runtime_allowance, traced)
from engine.preflight_infer import forward_peak, tile_peak

# Bytes a volume costs while it is read, per voxel of the file (on top of its pixel bytes) and per voxel of the
# model grid. Pre-training transforms: float32 copy, transposed and reoriented copies of the input; MONAI's
# resampling grid and coordinates, its output, the intensity scaling and the crop on the grid (VmHWM on the two
# ct-native CTs: 18.6 and 49 per voxel). Fine-tuning's `LoadCase`: the reoriented copy of the input; on the grid the
# resampled image, its windowed copies, the label's int64 look-up and their crops (3.5 and 26 measured).
PRETRAIN_LOAD = (4 * F32, 12 * F32)
FINETUNE_LOAD = (0, 26)


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

def pretrain_estimate(cfg: PretrainConfig, items: list[dict]) -> MemoryEstimate:
    """Peak memory of pre-training `cfg` on `items`: reading and caching the volumes, then a training step with
    the model, AdamW's moments and the cached volumes in memory."""
    from engine.models import build_pretrainer
    from engine.pretrain import step_function

    with torch.device("meta"):
        model = build_pretrainer(cfg)
    crop, batch_size, channels = cfg.crop_size, cfg.data.batch_size, cfg.encoder.in_channels
    masks = torch.Generator().manual_seed(0)
    step = training_step_peak(model, step_function(model, cfg, torch.device("meta"), masks),
                              meta_batch((batch_size, channels, crop, crop, crop)))
    step = step.plus(Activations(2 * batch_size * channels * crop**3 * F32))  # the crops and their collated batch
    training, reading = pretrain_data_bytes(cfg, items)
    return _training_estimate(training, reading, optimiser_bytes(model), {"step": step})


def pretrain_data_bytes(cfg: PretrainConfig, items: list[dict]) -> tuple[int, int]:
    """Bytes of data held while training, and while reading the volumes before training.

    Up to IN_MEMORY_CACHE_MAX volumes are preprocessed once, before training, and kept (MONAI CacheDataset, which
    reads with one thread per CPU); with a disk cache (data.cache_dir) or more volumes, every batch reads its own."""
    headers = _headers(item["image"] for item in items)
    largest = max(load_peak(h, cfg.data.spacing, PRETRAIN_LOAD) for h in headers)
    if cfg.data.cache_dir or len(items) > IN_MEMORY_CACHE_MAX:
        readers = max(1, 2 * cfg.data.workers) * cfg.data.batch_size  # DataLoader workers prefetch 2 batches each
        return readers * largest, 0
    kept = sum(grid_voxels(h, cfg.data.spacing) * F32 for h in headers)
    return kept, kept + min(len(items), os.cpu_count() or 1) * largest


def check_pretrain(cfg: PretrainConfig, items: list[dict], device: torch.device, resume: bool) -> MemoryEstimate:
    """Refuse a pre-training run whose estimated peak does not fit, naming a setting that would."""
    return _check(lambda changed: pretrain_estimate(changed, items), cfg, pretrain_alternatives, device, resume,
                  f"pre-training {cfg.method} ({cfg.preset} preset)",
                  "the cached volumes are the bulk: --set data.cache_dir=FOLDER keeps them on disk instead")


def pretrain_alternatives(cfg: PretrainConfig) -> list[tuple[str, Callable[[], PretrainConfig]]]:
    """Smaller settings to try, smallest change first: the first ones train the same model on the same views."""
    changes = []
    if cfg.method != "hybridmim" and cfg.train.views_per_pass != 1:
        changes.append({"train.views_per_pass": 1})
    if cfg.data.batch_size > 1:
        changes.append({"data.batch_size": 1})
    if cfg.method == "mim" and cfg.mask.levels == 3 and cfg.mask.k3 > 1:
        changes.append({"mask.k3": 1})
    if cfg.method == "mim" and cfg.mask.levels >= 2 and cfg.mask.k2 > 1:
        changes.append({"mask.k2": 1, "mask.k3": 1})
    changes.append({"mask.roi": cfg.mask.roi // 2})
    return [(_flags(change), _changed(cfg.to_dict(), change, config_from_dict)) for change in changes]


# --- fine-tuning --------------------------------------------------------------------------------------------

def finetune_estimate(job) -> MemoryEstimate:
    """Peak memory of a fine-tuning job (a SegmentationTask or ClassificationTask with its cases): reading and
    caching the cases, a training step, and validation with the training state and caches still in memory."""
    from engine.finetune import freeze

    with torch.device("meta"):
        model = job.build_model()
    if job.cfg.freeze_encoder:
        freeze(model)
    step = training_step_peak(model, job.step_fn(model, torch.device("meta")), _finetune_batch(job))
    training = _headers(case["image"] for case in job.cases.training)
    validation = _headers(case["image"] for case in job.cases.validation)
    kept = sum(_cached_case_bytes(job, h) for h in training + validation)
    reading = max((load_peak(h, job.cfg.data.spacing, FINETUNE_LOAD) for h in training + validation), default=0)
    return _training_estimate(kept, kept + reading, optimiser_bytes(model),
                              {"step": step, "validation": _validation_peak(job, model, validation)})


def _finetune_batch(job) -> dict:
    cfg, roi = job.cfg, job.cfg.model.roi
    channels = cfg.encoder.in_channels
    if job.kind == "classification":
        n = cfg.data.batch_size
        return meta_batch((n, channels, roi, roi, roi), (n,), torch.long)
    n = cfg.data.batch_size * cfg.crop.samples  # every volume of the batch gives crop.samples crops
    return meta_batch((n, channels, roi, roi, roi), (n, 1, roi, roi, roi))


def _cached_case_bytes(job, header: VolumeHeader) -> int:
    """A case as the fine-tuning cache keeps it: image and label on the model grid (segmentation; at most, the
    body crop makes it smaller), or the image resized to ROI^3 (classification)."""
    if job.kind == "classification":
        return job.cfg.model.roi**3 * F32
    return 2 * grid_voxels(header, job.cfg.data.spacing) * F32


def _validation_peak(job, model: nn.Module, headers: list[VolumeHeader]) -> Activations:
    """Bytes validating the largest case takes: for segmentation the sliding window's output, count and division
    copy with the tile batch, then for Dice the probabilities, argmax, label, two one-hot maps and their product."""
    if not headers:
        return Activations(0)
    roi = job.cfg.model.roi
    if job.kind == "classification":
        return forward_peak(model, (1, job.cfg.encoder.in_channels, roi, roi, roi))
    k = len(job.labels)
    n = max(grid_voxels(h, job.cfg.data.spacing) for h in headers)
    tiles = tile_peak(model, roi, job.cfg.val.sw_batch_size, job.cfg.encoder.in_channels)
    window = (2 * k + 1) * n * F32 + tiles.peak
    dice = 4 * k * n * F32 + 2 * n * 8
    return Activations(max(window, dice), tiles.heap)


def check_finetune(job, device: torch.device, resume: bool) -> MemoryEstimate:
    """Refuse a fine-tuning run whose estimated peak does not fit, naming a setting that would."""
    return _check(lambda cfg: finetune_estimate(_with_config(job, cfg)), job.cfg, finetune_alternatives, device,
                  resume, f"fine-tuning {job.kind} ({job.cfg.preset} preset)",
                  "the cached cases are the bulk: fewer --train-cases or a coarser --set data.spacing")


def finetune_alternatives(cfg: FinetuneConfig) -> list[tuple[str, Callable[[], FinetuneConfig]]]:
    """Smaller settings to try, smallest change first."""
    changes = []
    if cfg.task == "segmentation" and cfg.crop.samples > 1:
        changes.append({"crop.samples": 1})
    if cfg.data.batch_size > 1:
        changes.append({"data.batch_size": 1})
    if cfg.task == "segmentation" and cfg.val.sw_batch_size > 1:
        changes.append({"val.sw_batch_size": 1})
    changes.append({"model.roi": cfg.model.roi // 2})
    return [(_flags(change), _changed(cfg.to_dict(), change, finetune_config_from_dict)) for change in changes]


def _with_config(job, cfg: FinetuneConfig):
    """The same job (data, cases) with other settings."""
    twin = copy.copy(job)
    twin.cfg = cfg
    return twin


# --- shared -------------------------------------------------------------------------------------------------

RESUMED = "a resumed run keeps its settings: free memory or use a machine with more"
PRESETS_BY_SIZE = ("tiny", "small", "base")


def _check(estimate_of: Callable, cfg, alternatives: Callable, device: torch.device, resume: bool, what: str,
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


def _training_estimate(data: int, reading: int, model_bytes: int,
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


def _headers(paths) -> list[VolumeHeader]:
    """The header of every path (each file read once, however often it is listed)."""
    paths = list(paths)
    headers = {path: read_header(path) for path in dict.fromkeys(paths)}
    return [headers[path] for path in paths]


def _flags(change: dict) -> str:
    return " ".join(f"--set {key}={value}" for key, value in change.items())


def _changed(tree: dict, change: dict, build) -> Callable:
    def make():
        return build(merge_trees(tree, undot(change))).validate()
    return make


def _data_heavy(estimate: MemoryEstimate) -> bool:
    return dict(estimate.parts).get("data", 0) > (estimate.host + estimate.device) / 2


def suggestion(alternatives, estimate_with, available: dict[str, int], data_hint: str = "",
               smaller: str | None = None) -> str:
    """The first alternative setting whose estimate fits (tried in order), as a hint a user can paste; else the
    `smaller` preset."""
    hints = [data_hint] if data_hint else []
    for flags, make in alternatives:
        try:
            estimate = estimate_with(make())
        except (UserError, ValueError):  # not a valid setting for this model
            continue
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
