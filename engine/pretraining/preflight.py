"""Pre-training's memory pre-flight: reading and caching the volumes, then a training step measured on the meta
device with pre-training's own step function."""
from __future__ import annotations

import os

import torch

from engine.config.pretrain import PretrainConfig, config_from_dict
from engine.models import build_pretrainer
from engine.pretraining.data import IN_MEMORY_CACHE_MAX
from engine.pretraining.step import step_function
from engine.runtime.device import amp_dtype
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

# Bytes a volume costs while it is read, per voxel of the file (on top of its pixel bytes) and per voxel of the
# model grid. Pre-training transforms: float32 copy, transposed and reoriented copies of the input; MONAI's
# resampling grid and coordinates, its output, the intensity scaling and the crop on the grid (VmHWM on the two
# ct-native CTs: 18.6 and 49 per voxel). Fine-tuning's `LoadCase`: the reoriented copy of the input; on the grid the
# resampled image, its windowed copies, the label's int64 look-up and their crops (3.5 and 26 measured).
PRETRAIN_LOAD = (4 * F32, 12 * F32)


# The step is traced on the meta device, where autocast does nothing. Under CPU bf16 autocast a MiM step holds
# bf16 copies of what it saves for backward next to the fp32 originals, and oneDNN's bf16 kernels their reorder
# buffers: measured on MiM tiny (real CT, 2 cores, AVX-512 BF16 and forced bf16 on AVX2) the peak rose by 1.6-2.2x
# the traced step (+34 to +46 MB on 20.5 MB); at `base` size it did not grow (training.preflight.bf16_step).


def pretrain_estimate(cfg: PretrainConfig, items: list[dict], device: torch.device = torch.device("cpu")
                      ) -> MemoryEstimate:
    """Peak memory of pre-training `cfg` on `items` on `device`: reading and caching the volumes, then a training
    step with the model, AdamW's moments and the cached volumes in memory, in the precision `train.amp` gives."""
    with torch.device("meta"):
        model = build_pretrainer(cfg)
    crop, batch_size, channels = cfg.crop_size, cfg.data.batch_size, cfg.encoder.in_channels
    masks = torch.Generator().manual_seed(0)
    step = training_step_peak(model, step_function(model, cfg, torch.device("meta"), masks),
                              meta_batch((batch_size, channels, crop, crop, crop)))
    if device.type == "cpu" and amp_dtype(cfg.train.amp, device) == torch.bfloat16:
        step = bf16_step(step)
    step = step.plus(Activations(2 * batch_size * channels * crop**3 * F32))  # the crops and their collated batch
    training, reading = pretrain_data_bytes(cfg, items)
    return training_estimate(training, reading, optimiser_bytes(model), {"step": step})


def pretrain_data_bytes(cfg: PretrainConfig, items: list[dict]) -> tuple[int, int]:
    """Bytes of data held while training, and while reading the volumes before training.

    Up to IN_MEMORY_CACHE_MAX volumes are preprocessed once, before training, and kept (MONAI CacheDataset, which
    reads with one thread per CPU); with a disk cache (data.cache_dir) or more volumes, every batch reads its own."""
    headers = read_headers(item["image"] for item in items)
    largest = max(load_peak(h, cfg.data.spacing, PRETRAIN_LOAD) for h in headers)
    if cfg.data.cache_dir or len(items) > IN_MEMORY_CACHE_MAX:
        readers = max(1, 2 * cfg.data.workers) * cfg.data.batch_size  # DataLoader workers prefetch 2 batches each
        return readers * largest, 0
    kept = sum(grid_voxels(h, cfg.data.spacing) * F32 for h in headers)
    return kept, kept + min(len(items), os.cpu_count() or 1) * largest


def check_pretrain(cfg: PretrainConfig, items: list[dict], device: torch.device, resume: bool) -> MemoryEstimate:
    """Refuse a pre-training run whose estimated peak does not fit, naming a setting that would."""
    return check_fits(lambda changed: pretrain_estimate(changed, items, device), cfg, pretrain_alternatives, device,
                      resume, f"pre-training {cfg.method} ({cfg.preset} preset)",
                      "the cached volumes are the bulk: --set data.cache_dir=FOLDER keeps them on disk instead")


def pretrain_alternatives(cfg: PretrainConfig) -> list[tuple[str, PretrainConfig]]:
    """Smaller settings to try, smallest change first: the first ones train the same model on the same views. Only
    settings valid for the method are offered (HybridMIM: a batch of at least 2, an ROI divisible by 32)."""
    changes = []
    if cfg.method != "hybridmim" and cfg.train.views_per_pass != 1:
        changes.append({"train.views_per_pass": 1})
    smallest_batch = 2 if cfg.method == "hybridmim" else 1  # HybridMIM's contrast needs other crops in the batch
    if cfg.data.batch_size > smallest_batch:
        changes.append({"data.batch_size": smallest_batch})
    if cfg.method == "mim" and cfg.mask.levels == 3 and cfg.mask.k3 > 1:
        changes.append({"mask.k3": 1})
    if cfg.method == "mim" and cfg.mask.levels >= 2 and cfg.mask.k2 > 1:
        changes.append({"mask.k2": 1, "mask.k3": 1})
    changes += [{"mask.roi": roi} for roi in smaller_sides(cfg.mask.roi, cfg.encoder.patch_size)]
    return valid_changes(cfg, changes, config_from_dict)
