"""Model registry: method name -> pre-training model around the shared encoder."""
from __future__ import annotations

import torch.nn as nn

from engine.config.pretrain import METHODS, PretrainConfig
from engine.config.schema import check_choice
from engine.models.hybrid_encoder import HybridEncoder
from engine.models.hybridmim import HybridMIMPretrainer
from engine.models.mim import MiMPretrainer

__all__ = ["build_pretrainer", "HybridEncoder", "MiMPretrainer", "HybridMIMPretrainer"]


def build_pretrainer(cfg: PretrainConfig) -> nn.Module:
    """mim and mae share MiMPretrainer (mae is its one-level case); hybridmim has its own heads."""
    check_choice("method", cfg.method, METHODS)
    if cfg.method == "hybridmim":
        return HybridMIMPretrainer(cfg)
    return MiMPretrainer(cfg)
