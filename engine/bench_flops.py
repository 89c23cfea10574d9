"""FLOPs of one training step (forward and backward), counted by `torch.utils.flop_counter` on meta tensors: the
network is built and run without memory or compute, so the count costs a second even for the `base` preset.
Divided by the measured seconds per step, it gives the achieved GFLOP/s of training."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import PretrainConfig
from engine.finetune_config import FinetuneConfig
from engine.masking import make_mim_views
from engine.models import build_pretrainer
from engine.models.segmenter import build_segmenter

META = torch.device("meta")


def pretrain_step_flops(cfg: PretrainConfig) -> float:
    """One step of `cfg`: a batch of crops (2R^3 for MiM, R^3 otherwise) through every view and level."""
    with META:
        model = build_pretrainer(cfg)
    side, batch, channels = cfg.crop_size, cfg.data.batch_size, cfg.encoder.in_channels
    crops = torch.zeros(batch, channels, side, side, side, device=META)  # [B, C, S, S, S]
    generator = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        if cfg.method == "hybridmim":
            model(crops, generator)["loss"].backward()
        else:
            for level in model.level_outputs(make_mim_views(crops, cfg.mask, model.patch, generator)):
                level.total.backward()
    return float(counter.get_total_flops())


def finetune_step_flops(cfg: FinetuneConfig, out_channels: int) -> float:
    """One step of segmentation fine-tuning: every crop of the batch through the segmenter and back."""
    m = cfg.model
    with META:
        model = build_segmenter(m.backbone, cfg.encoder, m.roi, out_channels, m.feature_size)
    crops = torch.zeros(cfg.data.batch_size * cfg.crop.samples, cfg.encoder.in_channels, m.roi, m.roi, m.roi,
                        device=META)  # [B * samples, C, R, R, R]
    with FlopCounterMode(display=False) as counter:
        model(crops).float().mean().backward()
    return float(counter.get_total_flops())
