"""Losses: MAE reconstruction, MiM cross-level alignment, HybridMIM heads and contrast. Pure functions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.masking import patchify


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and sqrt(var + 1e-6) over its voxels: patches [V, N, p^3 C] -> two [V, N, 1]."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()


def norm_pix_target(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch normalised target [V, N, p^3 C]: each patch minus its mean, over its standard deviation."""
    target = patchify(images, patch)
    mean, std = patch_statistics(target)
    return (target - mean) / std


def reconstruction_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int,
                        norm_pix: bool = True, n_masked: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error on masked tokens only. pred: [V, N, p^3 C]; images: [V, C, R, R, R]; mask: [V, N].
    n_masked: divide by this count instead of `mask.sum()` (these views are a part of a larger set)."""
    target = norm_pix_target(images, patch) if norm_pix else patchify(images, patch)
    per_token = (pred.float() - target.float()).pow(2).mean(-1)  # [V, N]
    m = mask.float()
    count = m.sum() if n_masked is None else n_masked.to(m)
    return (per_token * m).sum() / count.clamp_min(1.0)


def pool_blocks(latent: torch.Tensor, block_of_token: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Mean of the tokens of each block: latent [V, N, D] -> [V, n_blocks, D]."""
    onehot = F.one_hot(block_of_token.to(latent.device), n_blocks).to(latent.dtype)  # [N, n_blocks]
    return torch.einsum("vnd,nb->vbd", latent, onehot / onehot.sum(0, keepdim=True))


def byol_alignment(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(child, parent), averaged over views. child, parent: [V, D]; parent carries no gradient."""
    return (2 - 2 * F.cosine_similarity(child.float(), parent.float(), dim=-1)).mean()


def ce_alignment(child: torch.Tensor, parent_blocks: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Which of its parent's blocks was the child cut from? child [V, D], parent_blocks [V, B, D], target [V]."""
    logits = F.cosine_similarity(child.float()[:, None], parent_blocks.float(), dim=-1) / tau  # [V, B]
    return F.cross_entropy(logits, target.to(logits.device))


def level_weights(base: tuple[float, ...], levels: int, curriculum: str, progress: float) -> list[float]:
    """Reconstruction weight of each level at `progress` in [0, 1] of training, as the authors' curriculum
    (their engine_pretrain.py and utils/lr_sched.py; their published recipe itself trains `concurrent`).

    concurrent: constant. coarse_to_fine: the coarse weight falls from 2x to 1x its base (1 + cos) while the finest
    rises from 0 to 1x (sin); a middle level keeps its base, so all levels end equal. fine_to_coarse: the mirror."""
    base = list(base[:levels])
    if curriculum == "concurrent" or levels == 1:
        return base
    falling, rising = (0, levels - 1) if curriculum == "coarse_to_fine" else (levels - 1, 0)
    base[falling] *= 1 + math.cos(math.pi / 2 * progress)
    base[rising] *= math.sin(math.pi / 2 * progress)
    return base


# --- HybridMIM -----------------------------------------------------------------------------------------

def region_targets(mask: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial 2x2x2-patch regions of a [V, grid^3] patch mask.

    Returns (count [V, R] in 0..8, position [V, R, 8] float) with regions and their 8 patches in (z, y, x) order."""
    v, g2 = mask.shape[0], grid // 2
    m = mask.reshape(v, g2, 2, g2, 2, g2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(v, g2**3, 8)
    return m.sum(-1), m.float()


def region_losses(count_logits: torch.Tensor, position_logits: torch.Tensor, mask: torch.Tensor, grid: int):
    """Count CE, position BCE, and count-vs-position consistency (CE + MSE against detached targets)."""
    count, position = region_targets(mask, grid)
    count_loss = F.cross_entropy(count_logits.float().flatten(0, 1), count.flatten())
    position_loss = F.binary_cross_entropy_with_logits(position_logits.float(), position)
    implied = (position_logits.detach() > 0).sum(-1)  # positives of the thresholded position head
    probs = count_logits.float().softmax(-1)
    expected = (probs * torch.arange(9, device=probs.device)).sum(-1)
    consistency = F.cross_entropy(count_logits.float().flatten(0, 1), implied.flatten()) + \
        F.mse_loss(expected, implied.float())
    return count_loss, position_loss, consistency


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each sample's two views attract, the other samples of the batch repel. z: [B, D]."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)
