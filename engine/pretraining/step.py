"""One pre-training step: what a micro-batch does for each method (MiM/MAE level by level, HybridMIM at once)."""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from engine.config.pretrain import PretrainConfig
from engine.masking import make_mim_views
from engine.runtime.checkpoint import unwrap


def step_function(model, cfg: PretrainConfig, device: torch.device, masks: torch.Generator):
    """What one micro-batch does: yields (named losses, the tensor to back-propagate) once or level by level."""
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
        for level in model.level_outputs(levels, progress, cfg.train.views_per_pass_on(device)):
            yield level.losses, level.total
    return step
