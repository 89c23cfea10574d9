"""Volume classification for fine-tuning: the pre-training encoder, mean-pooled stage-4 tokens, a linear head."""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.config.sections import EncoderConfig
from engine.models.hybrid_encoder import HybridEncoder, keep_position_embedding


class HybridClassifier(nn.Module):
    """x [B, C, R, R, R] -> class logits [B, K]."""

    encoder_prefix = "encoder."

    def __init__(self, encoder_cfg: EncoderConfig, roi: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got {num_classes}")
        self.encoder = HybridEncoder(encoder_cfg, roi)
        keep_position_embedding(self.encoder)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_dim, num_classes))
        nn.init.zeros_(self.head[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder.forward_features(x)  # [B, N, C4], normalised
        return self.head(tokens.mean(dim=1))
