"""MiM (and plain MAE, its one-level case) around one hybrid encoder and one shared MAE decoder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from engine.config.pretrain import PretrainConfig, masked_count
from engine.losses import (
    byol_alignment,
    ce_alignment,
    ce_logits,
    level_weights,
    masked_blocks,
    pool_blocks,
    reconstruction_loss,
    spread,
    wrong_block_gap,
)
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
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # on the level's last pass; no gradient


class AlignmentStats:
    """A level's alignment diagnostics gathered pass by pass (no gradient), summarised on its last pass:
    `align_spread_lXY`: 1 - mean pairwise cosine of the normalised child outputs (0: every child says the same;
    needs two children); `align_gap_lXY`: the alignment loss with each child paired to a wrong masked block of its
    parent (the mean over the parent's other masked blocks) minus the loss with its own block (0: the parent's
    block does not matter; needs two masked blocks per parent). Neither enters the loss. Every decision is made
    on shapes and the config, never on values, so that the step also runs on the meta device (pre-flight)."""

    def __init__(self, name: str, parent_masked_blocks: int):
        self.name, self.with_gap = name, parent_masked_blocks >= 2
        self.outputs, self.gaps = [], []

    @torch.no_grad()
    def add(self, child: torch.Tensor, pair_loss: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor):
        self.outputs.append(child.detach().float())
        self.gaps.append(wrong_block_gap(pair_loss, target, candidates))

    @torch.no_grad()
    def summary(self) -> dict[str, torch.Tensor]:
        out = {}
        outputs = torch.cat(self.outputs)
        if outputs.shape[0] >= 2:
            out[f"align_spread_{self.name}"] = spread(outputs)
        if self.with_gap:
            out[f"align_gap_{self.name}"] = torch.cat(self.gaps).mean()
        return out


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

    def level_outputs(self, levels: list[LevelViews], progress: float = 0.0, views_per_pass: int = 0,
                      diagnostics: bool = False) -> Iterator[LevelOutput]:
        """Yields LevelOutputs, coarse level first: one per level, or one per pass of at most `views_per_pass`
        views (0: a level's views in one pass). Back-propagate each `total` before asking for the next.
        diagnostics: the level's last LevelOutput carries its alignment diagnostics (see AlignmentStats)."""
        loss_cfg = self.cfg.loss
        weights = level_weights(loss_cfg.rec_weights, len(levels), loss_cfg.curriculum, progress)
        parent_blocks = parent_candidates = None
        for i, views in enumerate(levels):
            n_views = views.images.shape[0]
            n_masked = views.mask.mask.sum()  # the reconstruction loss is a mean over the level's masked tokens
            pooled = []
            aligned = parent_blocks is not None and bool(self.predictors)
            stats = AlignmentStats(f"l{views.level - 1}{views.level}", self._masked_per_parent(levels[i - 1])) \
                if aligned and diagnostics else None
            for start in range(0, n_views, views_per_pass or n_views):
                part = slice(start, min(n_views, start + (views_per_pass or n_views)))
                images, keep, mask = views.images[part], views.mask.keep[part], views.mask.mask[part]
                tokens = self.encoder(images, keep, mask)  # [v, n_keep, C4]
                pred, latent = self.decoder(tokens, keep)  # [v, N, p^3 C], [v, N, Dd]
                rec = reconstruction_loss(pred, images, mask, self.patch, loss_cfg.norm_pix, n_masked)
                losses = {f"rec_l{views.level}": rec}
                total = weights[i] * rec
                if aligned:
                    share = (part.stop - part.start) / n_views  # the alignment loss is a mean over views
                    align, child, pair_loss = self._alignment(i - 1, tokens, parent_blocks, parent_candidates,
                                                              views, part)
                    losses[f"align_l{views.level - 1}{views.level}"] = share * align
                    total = total + loss_cfg.align_weight * share * align
                    if stats is not None:
                        stats.add(child, pair_loss, views.parent_block[part], self._candidates(parent_candidates,
                                                                                               views, part))
                if i + 1 < len(levels):
                    pooled.append(pool_blocks(latent.detach(), views.block_of_token, views.n_blocks))  # [v, B, Dd]
                last = part.stop == n_views
                yield LevelOutput(views.level, losses, total, pred, part,
                                  stats.summary() if stats is not None and last else {})
            parent_blocks = torch.cat(pooled) if pooled else None
            parent_candidates = masked_blocks(views.mask.mask, views.block_of_token, views.n_blocks)  # [V, B]

    def forward(self, levels: list[LevelViews], progress: float = 0.0) -> dict[str, torch.Tensor]:
        """All losses and their weighted sum under "loss" (one graph; for tests and small runs)."""
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for level in self.level_outputs(levels, progress, diagnostics=True):
            out.update(level.losses)
            out.update(level.diagnostics)
            total = total + level.total
        out["loss"] = total
        return out

    def _masked_per_parent(self, parent: LevelViews) -> int:
        """How many blocks of each view of the parent level are masked (the same for every view: exact counts)."""
        return masked_count(parent.n_blocks, self.cfg.mask.ratios[parent.level - 1])

    @staticmethod
    def _candidates(parent_candidates: torch.Tensor, views: LevelViews, part: slice) -> torch.Tensor:
        """[v, B] bool: the masked blocks of each child's parent (where a child can come from)."""
        return parent_candidates[views.parent[part].to(parent_candidates.device)]

    def _alignment(self, pair: int, tokens, parent_blocks, parent_candidates, views: LevelViews,
                   part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: the encoder tokens of `views[part]`; parent_blocks: [V_parent, B, Dd] of the whole parent level,
        parent_candidates: [V_parent, B] its masked blocks. Returns the loss (a mean over these views), the child
        outputs [v, d] and, without gradient, the loss of each view were it paired with each block [v, B]."""
        device = tokens.device
        child = self.predictors[pair](tokens.mean(1))  # [v, d]
        target_block = views.parent_block[part].to(device)
        candidates = self._candidates(parent_candidates, views, part).to(device)
        parents = self._targets(pair, parent_blocks[views.parent[part].to(device)], candidates)  # [v, B, d]
        if self.cfg.loss.align == "ce":
            tau = self.cfg.loss.ce_temperature
            loss = ce_alignment(child, parents, target_block, tau, candidates)
            with torch.no_grad():
                logits = ce_logits(child, parents, candidates, tau)
                pair_loss = logits.logsumexp(1, keepdim=True) - logits  # cross-entropy were b the target
            return loss, child, pair_loss
        parent = parents[torch.arange(parents.shape[0], device=device), target_block]  # [v, d]
        with torch.no_grad():
            pair_loss = 2 - 2 * torch.nn.functional.cosine_similarity(child.float()[:, None], parents.float(), dim=-1)
        return byol_alignment(child, parent), child, pair_loss

    def _targets(self, pair: int, parent_blocks: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """What a child is compared with: [v, B, Dd] pooled parent decoder latents -> [v, B, d]."""
        return self.projectors[pair](parent_blocks)
