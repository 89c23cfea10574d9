"""MiM (and plain MAE, its one-level case) around one hybrid encoder and one shared MAE decoder."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from engine.config.pretrain import PretrainConfig, masked_count
from engine.losses import (
    byol_alignment,
    byol_pair_losses,
    ce_alignment,
    ce_logits,
    centred_targets,
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

    Alignment (`loss.align`): the child's feature is the mean of its visible encoder tokens through a projector
    and a predictor. Its target is the parent level as the same encoder sees it whole (unmasked), without
    gradient: the mean of the encoder tokens of the block the child was cut from, through the same projector
    (the stop-gradient sits after the projector), minus their mean over the parent's masked blocks (the blocks
    the child could have come from), scaled to mean squared norm 1 over them. `byol` regresses the child output
    onto its target (|p - t|^2); `ce` picks the child's block among the parent's masked blocks (cosine logits).
    A constant child output solves neither: on average over the blocks a child can come from it scores at least
    1 (byol) or log(#masked) (ce); only telling them apart scores lower.

    Because the targets carry no gradient, each level's loss can be back-propagated as soon as it is computed
    (`level_outputs`), which frees the activations of one level before the next is built, with the same gradients
    as one summed backward. The same holds within a level: every loss is a sum over views divided by a count known
    in advance, so a level's views can go through a few at a time (`views_per_pass`), each pass back-propagated
    before the next."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        roi = cfg.mask.roi
        self.encoder = HybridEncoder(cfg.encoder, roi)
        self.patch, self.grid = self.encoder.patch, self.encoder.grid
        self.decoder = MAEDecoder(cfg.decoder, self.encoder.out_dim, self.grid, self.patch, cfg.encoder.in_channels)
        n_pairs = cfg.mask.levels - 1 if cfg.loss.align != "none" else 0
        d = cfg.loss.align_dim
        self.projectors = nn.ModuleList(mlp(self.encoder.out_dim, 2 * d, d) for _ in range(n_pairs))
        self.predictors = nn.ModuleList(mlp(d, 2 * d, d) for _ in range(n_pairs))

    def level_outputs(self, levels: list[LevelViews], progress: float = 0.0, views_per_pass: int = 0,
                      diagnostics: bool = False) -> Iterator[LevelOutput]:
        """Yields LevelOutputs, coarse level first: one per level, or one per pass of at most `views_per_pass`
        views (0: a level's views in one pass). Back-propagate each `total` before asking for the next.
        diagnostics: the level's last LevelOutput carries its alignment diagnostics (see AlignmentStats)."""
        loss_cfg = self.cfg.loss
        weights = level_weights(loss_cfg.rec_weights, len(levels), loss_cfg.curriculum, progress)
        for i, views in enumerate(levels):
            n_views = views.images.shape[0]
            n_masked = views.mask.mask.sum()  # the reconstruction loss is a mean over the level's masked tokens
            aligned = i > 0 and bool(self.predictors)
            stats = None
            if aligned:
                parent = levels[i - 1]
                candidates = masked_blocks(parent.mask.mask, parent.block_of_token, parent.n_blocks)  # [V_parent, B]
                targets = self._targets(i - 1, parent, candidates, views_per_pass)  # [V_parent, B, d], no gradient
                if diagnostics:
                    stats = AlignmentStats(f"l{parent.level}{views.level}", self._masked_per_parent(parent))
            for start in range(0, n_views, views_per_pass or n_views):
                part = slice(start, min(n_views, start + (views_per_pass or n_views)))
                images, keep, mask = views.images[part], views.mask.keep[part], views.mask.mask[part]
                tokens = self.encoder(images, keep, mask)  # [v, n_keep, C4]
                pred, _ = self.decoder(tokens, keep)  # [v, N, p^3 C]
                rec = reconstruction_loss(pred, images, mask, self.patch, loss_cfg.norm_pix, n_masked)
                losses = {f"rec_l{views.level}": rec}
                total = weights[i] * rec
                if aligned:
                    share = (part.stop - part.start) / n_views  # the alignment loss is a mean over views
                    align, child, pair_loss = self._alignment(i - 1, tokens, targets, candidates, views, part)
                    losses[f"align_l{views.level - 1}{views.level}"] = share * align
                    total = total + loss_cfg.align_weight * share * align
                    if stats is not None:
                        stats.add(child, pair_loss, views.parent_block[part], self._candidates(candidates, views, part))
                last = part.stop == n_views
                yield LevelOutput(views.level, losses, total, pred, part,
                                  stats.summary() if stats is not None and last else {})

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
    def _candidates(candidates: torch.Tensor, views: LevelViews, part: slice) -> torch.Tensor:
        """[v, B] bool: the masked blocks of each child's parent (where a child can come from), of the parent
        level's candidates [V_parent, B]."""
        return candidates[views.parent[part].to(candidates.device)]

    @torch.no_grad()
    def _targets(self, pair: int, parent: LevelViews, candidates: torch.Tensor, views_per_pass: int = 0) -> torch.Tensor:
        """What the children of `parent` are compared with, without gradient: [V_parent, B, d]. The encoder sees
        each parent view whole (no mask; `views_per_pass` at a time); each block's tokens are mean-pooled, go
        through the projector and are centred (and scaled) on the view's masked blocks (`candidates` [V_parent, B];
        see `centred_targets`)."""
        n = parent.images.shape[0]
        step = views_per_pass or n
        pooled = torch.cat([pool_blocks(self.encoder(parent.images[s:s + step]), parent.block_of_token,
                                        parent.n_blocks) for s in range(0, n, step)])  # [V_parent, B, C4]
        return centred_targets(self.projectors[pair](pooled).float(), candidates)

    def _alignment(self, pair: int, tokens, targets, candidates, views: LevelViews,
                   part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: the encoder tokens of `views[part]`; targets: [V_parent, B, d] of the whole parent level (see
        `_targets`), candidates: [V_parent, B] its masked blocks. Returns the loss (a mean over these views), the
        child outputs [v, d] and, without gradient, the loss of each view were it paired with each block [v, B]."""
        device = tokens.device
        child = self.predictors[pair](self.projectors[pair](tokens.mean(1)))  # [v, d]
        parent = views.parent[part].to(device)
        own = views.parent_block[part].to(device)
        targets, candidates = targets[parent], self._candidates(candidates, views, part).to(device)  # [v, B, ...]
        if self.cfg.loss.align == "ce":
            tau = self.cfg.loss.ce_temperature
            loss = ce_alignment(child, targets, own, tau, candidates)
            with torch.no_grad():
                logits = ce_logits(child, targets, candidates, tau)
                pair_loss = logits.logsumexp(1, keepdim=True) - logits  # cross-entropy were b the target
            return loss, child, pair_loss
        with torch.no_grad():
            pair_loss = byol_pair_losses(child, targets)
        return byol_alignment(child, targets[torch.arange(targets.shape[0], device=device), own]), child, pair_loss
