"""Model registry: method name -> pre-training model around the shared encoder."""
from __future__ import annotations

import torch.nn as nn

from engine.config.pretrain import METHODS, PretrainConfig
from engine.config.schema import check_choice
from engine.models.hybrid_encoder import HybridEncoder
from engine.models.hybridmim import HybridMIMPretrainer
from engine.models.mim import MiMPretrainer
from engine.runtime.device import guard_small_convolutions

__all__ = ["build_pretrainer", "HybridEncoder", "MiMPretrainer", "HybridMIMPretrainer"]


def build_pretrainer(cfg: PretrainConfig) -> nn.Module:
    """mim and mae share MiMPretrainer (mae is its one-level case); hybridmim has its own heads."""
    check_choice("method", cfg.method, METHODS)
    model = HybridMIMPretrainer(cfg) if cfg.method == "hybridmim" else MiMPretrainer(cfg)
    return guard_small_convolutions(model)
