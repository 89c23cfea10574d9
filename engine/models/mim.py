"""MiM (and plain MAE, its one-level case) around one hybrid encoder and one shared MAE decoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from engine.config import PretrainConfig
from engine.losses import byol_alignment, ce_alignment, level_weights, pool_blocks, reconstruction_loss
from engine.masking import LevelViews
from engine.models.decoder import MAEDecoder
from engine.models.hybrid_encoder import HybridEncoder


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@dataclass
class LevelOutput:
    """What one level produced: losses (unweighted), their weighted sum, and the decoder's prediction."""

    level: int
    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    pred: torch.Tensor


class MiMPretrainer(nn.Module):
    """Reconstruct every level's masked views; align each child view with its parent's block.

    The parent's block features are the parent decoder's latent tokens of that block (the parent had to infer
    them: the block was masked), mean-pooled, detached (stop-gradient) and passed through a projector; the child's
    feature is the mean of its visible encoder tokens through a predictor. Because nothing flows back into the
    parent, each level's loss can be back-propagated as soon as it is computed (`level_outputs`), which frees the
    activations of one level before the next is built, with the same gradients as one summed backward."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        roi = cfg.mask.roi
        self.encoder = HybridEncoder(cfg.encoder, roi)
        self.patch, self.grid = self.encoder.patch, self.encoder.grid
        self.decoder = MAEDecoder(cfg.decoder, self.encoder.out_dim, self.grid, self.patch, cfg.encoder.in_channels)
        n_pairs = cfg.mask.levels - 1 if cfg.loss.align != "none" else 0
        d = cfg.loss.align_dim
        self.predictors = nn.ModuleList(mlp(self.encoder.out_dim, 2 * d, d) for _ in range(n_pairs))
        self.projectors = nn.ModuleList(mlp(cfg.decoder.dim, 2 * d, d) for _ in range(n_pairs))

    def level_outputs(self, levels: list[LevelViews], progress: float = 0.0) -> Iterator[LevelOutput]:
        """Yields one LevelOutput per level, coarse first. Back-propagate each `total` before asking for the next."""
        loss_cfg = self.cfg.loss
        weights = level_weights(loss_cfg.rec_weights, len(levels), loss_cfg.curriculum, progress)
        parent_blocks = None
        for i, views in enumerate(levels):
            tokens = self.encoder(views.images, views.mask.keep, views.mask.mask)  # [V, n_keep, C4]
            pred, latent = self.decoder(tokens, views.mask.keep)  # [V, N, p^3 C], [V, N, Dd]
            rec = reconstruction_loss(pred, views.images, views.mask.mask, self.patch, loss_cfg.norm_pix)
            losses = {f"rec_l{views.level}": rec}
            total = weights[i] * rec
            if parent_blocks is not None and self.predictors:
                align = self._alignment(i - 1, tokens, parent_blocks, views)
                losses[f"align_l{views.level - 1}{views.level}"] = align
                total = total + loss_cfg.align_weight * align
            if i + 1 < len(levels):
                parent_blocks = pool_blocks(latent.detach(), views.block_of_token, views.n_blocks)  # [V, B, Dd]
            yield LevelOutput(views.level, losses, total, pred)

    def forward(self, levels: list[LevelViews], progress: float = 0.0) -> dict[str, torch.Tensor]:
        """All losses and their weighted sum under "loss" (one graph; for tests and small runs)."""
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for level in self.level_outputs(levels, progress):
            out.update(level.losses)
            total = total + level.total
        out["loss"] = total
        return out

    def _alignment(self, pair: int, tokens, parent_blocks, views: LevelViews) -> torch.Tensor:
        child = self.predictors[pair](tokens.mean(1))  # [V, d]
        parents = self.projectors[pair](parent_blocks[views.parent.to(tokens.device)])  # [V, B, d]
        target_block = views.parent_block.to(tokens.device)
        if self.cfg.loss.align == "ce":
            return ce_alignment(child, parents, target_block, self.cfg.loss.ce_temperature)
        parent = parents[torch.arange(parents.shape[0], device=tokens.device), target_block]  # [V, d]
        return byol_alignment(child, parent)
