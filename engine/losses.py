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


def masked_blocks(mask: torch.Tensor, block_of_token: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[V, n_blocks] bool: the blocks whose tokens are all masked (those a child can be cut from). mask: [V, N].
    Counted in integers (a mean of the mask under bf16 autocast is not exactly 1)."""
    member = F.one_hot(block_of_token.to(mask.device), n_blocks).bool()  # [N, n_blocks]
    return (mask[:, :, None] & member).sum(1) == member.sum(0)


def centred_targets(features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """What sets each block apart from the blocks a child could equally have come from: features [V, B, D] minus,
    per view, their mean over the candidate blocks (candidates [V, B] bool), divided by the root-mean-square norm
    of the result over those blocks. Over a view's candidates the targets sum to zero and have mean squared norm 1,
    so no constant matches them: see `byol_alignment`."""
    weight = candidates.to(features.dtype)[..., None]  # [V, B, 1]
    count = weight.sum(1, keepdim=True).clamp_min(1)
    centred = features - (features * weight).sum(1, keepdim=True) / count
    mean_square = (centred.pow(2).sum(-1, keepdim=True) * weight).sum(1, keepdim=True) / count
    return centred / mean_square.clamp_min(1e-12).sqrt()


def byol_alignment(child: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|child - target|^2, averaged over views: the child output regressed onto its target. child [V, D]; target
    [V, D] from `centred_targets`, without gradient. A child output c that ignores which block it came from scores
    1 + |c|^2 on average over its parent's candidate blocks (their targets sum to zero, mean squared norm 1), so
    1 is chance and only telling the blocks apart scores lower. (BYOL's 2 - 2 cos normalises the output instead;
    here that let the output's norm grow along one shared direction, which slowed its gradient to a stop.)"""
    return byol_pair_losses(child, target[:, None])[:, 0].mean()


def byol_pair_losses(child: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The byol loss of each view against each of several targets: child [V, D], targets [V, B, D] -> [V, B]."""
    return (child.float()[:, None] - targets.float()).pow(2).sum(-1)


def ce_logits(child: torch.Tensor, parent_blocks: torch.Tensor, candidates: torch.Tensor, tau: float) -> torch.Tensor:
    """cos(child, each parent block)/tau, -inf where a block is no candidate. [V, D], [V, B, D], [V, B] -> [V, B]."""
    logits = F.cosine_similarity(child.float()[:, None], parent_blocks.float(), dim=-1) / tau
    return logits.masked_fill(~candidates.to(logits.device), float("-inf"))


def ce_alignment(child: torch.Tensor, parent_blocks: torch.Tensor, target: torch.Tensor, tau: float,
                 candidates: torch.Tensor) -> torch.Tensor:
    """Which of its parent's masked blocks was the child cut from? child [V, D], parent_blocks [V, B, D],
    target [V], candidates [V, B] bool: the parent's masked blocks. A child always comes from a masked block, so
    visible blocks are no candidates (else telling masked from visible would lower the loss for free)."""
    logits = ce_logits(child, parent_blocks, candidates, tau)
    return F.cross_entropy(logits, target.to(logits.device))


def spread(outputs: torch.Tensor) -> torch.Tensor:
    """1 - mean pairwise cosine of the rows of outputs [V, D] (V >= 2): 0 when every row points the same way."""
    z = F.normalize(outputs.float(), dim=-1)
    v = z.shape[0]
    cos = (z[:, None] * z[None]).sum(-1)  # [V, V]; not a matmul, which autocast would run in bf16
    return 1 - (cos.sum() - cos.diagonal().sum()) / (v * (v - 1))


def wrong_block_gap(pair_loss: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per view: the alignment loss with the child paired to a wrong parent block (the mean over the parent's other
    masked blocks) minus the loss with its own block; 0 where the parent has no other masked block.
    pair_loss [V, B]: the loss of each view were it paired with block b; target [V]; candidates [V, B] -> [V]."""
    own = F.one_hot(target.to(pair_loss.device), pair_loss.shape[1]).bool()
    wrong = candidates.to(pair_loss.device) & ~own
    wrong_loss = torch.where(wrong, pair_loss, torch.zeros_like(pair_loss)).sum(1) / wrong.sum(1).clamp_min(1)
    own_loss = pair_loss.gather(1, target.to(pair_loss.device)[:, None])[:, 0]
    return torch.where(wrong.any(1), wrong_loss - own_loss, torch.zeros_like(own_loss))


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
