"""MiM (and plain MAE, its one-level case) around one hybrid encoder and one shared MAE decoder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from engine.config.pretrain import PretrainConfig
from engine.losses import byol_alignment, ce_alignment, level_weights, pool_blocks, reconstruction_loss
from engine.masking import LevelViews
from engine.models.blocks import mlp
from engine.models.decoder import MAEDecoder
from engine.models.hybrid_encoder import HybridEncoder


@dataclass
class LevelOutput:
    """What one level, or one pass of it, produced: losses (unweighted), their weighted sum, and the decoder's
    prediction for the level's views `views`. A level that goes through in several passes yields one LevelOutput
    per pass; their losses and totals are shares that add up to the level's."""

    level: int
    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    pred: torch.Tensor
    views: slice = field(default_factory=lambda: slice(None))


class MiMPretrainer(nn.Module):
    """Reconstruct every level's masked views; align each child view with its parent's block.

    The parent's block features are the parent decoder's latent tokens of that block (the parent had to infer
    them: the block was masked), mean-pooled, detached (stop-gradient) and passed through a projector; the child's
    feature is the mean of its visible encoder tokens through a predictor. Because nothing flows back into the
    parent, each level's loss can be back-propagated as soon as it is computed (`level_outputs`), which frees the
    activations of one level before the next is built, with the same gradients as one summed backward. The same
    holds within a level: every loss is a sum over views divided by a count known in advance, so a level's views
    can go through a few at a time (`views_per_pass`), each pass back-propagated before the next."""

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

    def level_outputs(self, levels: list[LevelViews], progress: float = 0.0,
                      views_per_pass: int = 0) -> Iterator[LevelOutput]:
        """Yields LevelOutputs, coarse level first: one per level, or one per pass of at most `views_per_pass`
        views (0: a level's views in one pass). Back-propagate each `total` before asking for the next."""
        loss_cfg = self.cfg.loss
        weights = level_weights(loss_cfg.rec_weights, len(levels), loss_cfg.curriculum, progress)
        parent_blocks = None
        for i, views in enumerate(levels):
            n_views = views.images.shape[0]
            n_masked = views.mask.mask.sum()  # the reconstruction loss is a mean over the level's masked tokens
            pooled = []
            for start in range(0, n_views, views_per_pass or n_views):
                part = slice(start, min(n_views, start + (views_per_pass or n_views)))
                images, keep, mask = views.images[part], views.mask.keep[part], views.mask.mask[part]
                tokens = self.encoder(images, keep, mask)  # [v, n_keep, C4]
                pred, latent = self.decoder(tokens, keep)  # [v, N, p^3 C], [v, N, Dd]
                rec = reconstruction_loss(pred, images, mask, self.patch, loss_cfg.norm_pix, n_masked)
                losses = {f"rec_l{views.level}": rec}
                total = weights[i] * rec
                if parent_blocks is not None and self.predictors:
                    share = (part.stop - part.start) / n_views  # the alignment loss is a mean over views
                    align = share * self._alignment(i - 1, tokens, parent_blocks, views, part)
                    losses[f"align_l{views.level - 1}{views.level}"] = align
                    total = total + loss_cfg.align_weight * align
                if i + 1 < len(levels):
                    pooled.append(pool_blocks(latent.detach(), views.block_of_token, views.n_blocks))  # [v, B, Dd]
                yield LevelOutput(views.level, losses, total, pred, part)
            parent_blocks = torch.cat(pooled) if pooled else None

    def forward(self, levels: list[LevelViews], progress: float = 0.0) -> dict[str, torch.Tensor]:
        """All losses and their weighted sum under "loss" (one graph; for tests and small runs)."""
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for level in self.level_outputs(levels, progress):
            out.update(level.losses)
            total = total + level.total
        out["loss"] = total
        return out

    def _alignment(self, pair: int, tokens, parent_blocks, views: LevelViews, part: slice = slice(None)) -> torch.Tensor:
        """tokens: the encoder tokens of `views[part]`; parent_blocks: [V_parent, B, Dd] of the whole parent level."""
        child = self.predictors[pair](tokens.mean(1))  # [v, d]
        parents = self.projectors[pair](parent_blocks[views.parent[part].to(tokens.device)])  # [v, B, d]
        target_block = views.parent_block[part].to(tokens.device)
        if self.cfg.loss.align == "ce":
            return ce_alignment(child, parents, target_block, self.cfg.loss.ce_temperature)
        parent = parents[torch.arange(parents.shape[0], device=tokens.device), target_block]  # [V, d]
        return byol_alignment(child, parent)
