"""Fine-tuning's memory pre-flight: reading and caching the cases, a training step measured on the meta device with
the task's own step function, and validation."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from engine.config.finetune import FinetuneConfig, finetune_config_from_dict
from engine.finetuning.weights import freeze
from engine.imageio.volumes import VolumeHeader
from engine.inference.preflight import forward_peak, tile_peak
from engine.runtime.device import amp_dtype, cpu_has_fast_bf16
from engine.runtime.memory import F32, Activations, MemoryEstimate
from engine.training.preflight import (
    bf16_step,
    check_fits,
    grid_voxels,
    load_peak,
    meta_batch,
    optimiser_bytes,
    read_headers,
    smaller_sides,
    training_estimate,
    training_step_peak,
    valid_changes,
)

FINETUNE_LOAD = (0, 26)


def finetune_estimate(job, device: torch.device = torch.device("cpu")) -> MemoryEstimate:
    """Peak memory of a fine-tuning job (a SegmentationTask or ClassificationTask with its cases) on `device`: reading
    and caching the cases, a training step, and validation with the training state and caches still in memory."""

    with torch.device("meta"):
        model = job.build_model()
    if job.cfg.freeze_encoder:
        freeze(model)
    step = training_step_peak(model, job.step_fn(model, torch.device("meta")), _finetune_batch(job))
    if emulated_bf16(job.cfg.train.amp, device):
        step = bf16_step(step)
    training = read_headers(case["image"] for case in job.cases.training)
    validation = read_headers(case["image"] for case in job.cases.validation)
    kept = sum(_cached_case_bytes(job, h) for h in training + validation)
    reading = max((load_peak(h, job.cfg.data.spacing, FINETUNE_LOAD) for h in training + validation), default=0)
    return training_estimate(kept, kept + reading, optimiser_bytes(model),
                              {"step": step, "validation": _validation_peak(job, model, validation)})


def emulated_bf16(amp: str, device: torch.device) -> bool:
    """bf16 autocast on a CPU without AVX-512 BF16 or AMX (or with torch held to AVX2): each bf16 kernel converts to
    fp32 and back, and a small fine-tuning step's peak was measured at 1.8x its fp32 trace (tiny recipe, real CT: 317 MB
    against 172 MB traced, torch held to AVX2 on an AVX-512 BF16 EPYC). Where the CPU has bf16 instructions the peak
    measured below the fp32 one (166 against 190 MB), so the fp32 trace stays a bound there."""
    return device.type == "cpu" and amp_dtype(amp, device) == torch.bfloat16 and not cpu_has_fast_bf16()


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
    return check_fits(lambda cfg: finetune_estimate(_with_config(job, cfg), device), job.cfg, finetune_alternatives, device,
                      resume, f"fine-tuning {job.kind} ({job.cfg.preset} preset)",
                      "the cached cases are the bulk: fewer --train-cases or a coarser --set data.spacing")


def finetune_alternatives(cfg: FinetuneConfig) -> list[tuple[str, FinetuneConfig]]:
    """Smaller settings to try, smallest change first; only settings valid for the backbone are offered."""
    changes = []
    if cfg.task == "segmentation" and cfg.crop.samples > 1:
        changes.append({"crop.samples": 1})
    if cfg.data.batch_size > 1:
        changes.append({"data.batch_size": 1})
    if cfg.task == "segmentation" and cfg.val.sw_batch_size > 1:
        changes.append({"val.sw_batch_size": 1})
    changes += [{"model.roi": roi} for roi in smaller_sides(cfg.model.roi, cfg.encoder.patch_size)]
    return valid_changes(cfg, changes, finetune_config_from_dict)


def _with_config(job, cfg: FinetuneConfig):
    """The same job (data, cases) with other settings."""
    twin = copy.copy(job)
    twin.cfg = cfg
    return twin
