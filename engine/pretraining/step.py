"""One pre-training step: what a micro-batch does for each method (MiM/MAE level by level, HybridMIM at once)."""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from engine.config.pretrain import PretrainConfig
from engine.masking import make_mim_views
from engine.runtime.checkpoint import unwrap


def step_function(model, cfg: PretrainConfig, device: torch.device, masks: torch.Generator):
    """What one micro-batch does: yields (named values, the tensor to back-propagate) once or level by level. The
    named values are the losses and, for MiM, each level's alignment diagnostics (`align_spread_lXY`,
    `align_gap_lXY`, computed without gradient); the loop logs all of them."""
    if cfg.method == "hybridmim":
        def step(batch, progress):
            losses = model(batch["image"].to(device).as_tensor(), masks)
            total = losses.pop("loss")
            yield losses, total
        return step

    patch = unwrap(model).patch

    def step(batch, progress):
        levels = make_mim_views(batch["image"].to(device).as_tensor(), cfg.mask, patch, masks)
        if isinstance(model, DistributedDataParallel):  # DDP: one forward, one backward per micro-batch
            losses = model(levels, progress)
            yield losses, losses.pop("loss")
            return
        # alone: back-propagate level by level, and pass by pass within a level
        for level in model.level_outputs(levels, progress, cfg.train.views_per_pass_on(device), diagnostics=True):
            yield {**level.losses, **level.diagnostics}, level.total
    return step
