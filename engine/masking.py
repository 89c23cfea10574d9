"""Seedable, device-aware masking and MiM's hierarchical views.

Tokens are the p^3 patches of an R^3 view, numbered in (z, y, x) raster order of the (R/p)^3 token grid, which
is the order of `patchify`. Randomness comes from a CPU `torch.Generator`, so a seed gives the same masks on any
device. A level's views go through the network a few at a time (`train.views_per_pass`; the whole level at once
under DDP or with views_per_pass 0)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config.pretrain import MaskConfig, masked_count


@dataclass
class TokenMask:
    """mask: [V, N] bool, True = masked. keep: [V, n_keep] visible token ids, ascending.
    order: [V, N] token ids, the masked ones first, in random order (children are drawn from its head)."""

    mask: torch.Tensor
    keep: torch.Tensor
    order: torch.Tensor

    @property
    def n_masked(self) -> int:
        return self.mask.shape[1] - self.keep.shape[1]

    def to(self, device) -> "TokenMask":
        return TokenMask(self.mask.to(device), self.keep.to(device), self.order.to(device))


@dataclass
class LevelViews:
    """All views of one level of every crop in the batch.

    images: [V, C, R, R, R]; mask: their token masks.
    box: [V, 2, 3] float, (start, size) of each view in crop voxel coordinates (axes of the crop tensor).
    parent, parent_block: [V] index of the parent view in the previous level and of the parent's block the view
    was cut from (None at the coarse level). box_in_parent: [V, 2, 3] (start, stop) in parent voxel coordinates.
    block_of_token: [N] which of this level's `n_blocks` blocks each token belongs to; children are cut from blocks.
    """

    level: int
    images: torch.Tensor
    mask: TokenMask
    box: torch.Tensor
    block_of_token: torch.Tensor
    n_blocks: int
    parent: torch.Tensor | None = None
    parent_block: torch.Tensor | None = None
    box_in_parent: torch.Tensor | None = None


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[V, C, D, H, W] -> [V, N, p^3 * C], tokens in (z, y, x) raster order."""
    v, c, d, h, w = x.shape
    x = x.reshape(v, c, d // p, p, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(v, (d // p) * (h // p) * (w // p), p**3 * c)


def unpatchify(tokens: torch.Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """[V, N, p^3 * C] -> [V, C, D, H, W]; inverse of `patchify`."""
    v = tokens.shape[0]
    gd, gh, gw = grid
    x = tokens.reshape(v, gd, gh, gw, p, p, p, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(v, channels, gd * p, gh * p, gw * p)


def token_positions(grid: int, device=None) -> torch.Tensor:
    """[N, 3] (z, y, x) position of every token of a grid^3 token grid."""
    r = torch.arange(grid, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def octant_of_token(grid: int, device=None) -> torch.Tensor:
    """[N] index (z*4 + y*2 + x) of the 2x2x2 spatial block each token lies in."""
    pos = token_positions(grid, device) // (grid // 2)
    return pos[:, 0] * 4 + pos[:, 1] * 2 + pos[:, 2]


def random_mask(views: int, n_tokens: int, ratio: float, generator: torch.Generator) -> TokenMask:
    """Mask exactly `masked_count(n_tokens, ratio)` random tokens of every view."""
    n_mask = masked_count(n_tokens, ratio)
    order = torch.argsort(torch.rand(views, n_tokens, generator=generator), dim=1)
    return _mask_from_order(order, n_mask)


def block_mask(views: int, block_of_token: torch.Tensor, n_blocks: int, ratio: float,
               generator: torch.Generator) -> tuple[TokenMask, torch.Tensor]:
    """Mask whole spatial blocks. Returns the token mask and [V, n_blocks] block ids, masked ones first."""
    n_mask = masked_count(n_blocks, ratio)
    block_order = torch.argsort(torch.rand(views, n_blocks, generator=generator), dim=1)
    masked_blocks = block_order[:, :n_mask]
    mask = (block_of_token[None, :, None] == masked_blocks[:, None, :]).any(-1)  # [V, N]
    # token order: tokens of masked blocks first, so that `order` keeps its meaning at this level too
    rank = torch.argsort(block_order, dim=1)  # rank of each block in the random order
    token_rank = rank.gather(1, block_of_token[None].expand(views, -1))
    order = torch.argsort(token_rank * block_of_token.numel() + torch.arange(block_of_token.numel()), dim=1)
    keep = torch.nonzero(~mask)[:, 1].reshape(views, -1)
    return TokenMask(mask, keep, order), block_order


def _mask_from_order(order: torch.Tensor, n_mask: int) -> TokenMask:
    views, n = order.shape
    mask = torch.zeros(views, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_mask], True)
    keep = order[:, n_mask:].sort(dim=1).values
    return TokenMask(mask, keep, order)


def make_mim_views(crops: torch.Tensor, cfg: MaskConfig, patch: int, generator: torch.Generator) -> list[LevelViews]:
    """Build every level's views of a batch of crops.

    crops: [B, C, 2R, 2R, 2R] for levels >= 2 ([B, C, R, R, R] for one level, plain MAE).
    Coarse: the whole crop resampled to R^3, half of its 2x2x2 blocks masked. Middle: k2 full-resolution octants
    chosen among the masked coarse blocks. Fine: from each middle view, k3 of its masked patches resampled to R^3.
    """
    r, grid = cfg.roi, cfg.roi // patch
    n_tokens = grid**3
    device = crops.device
    if cfg.levels == 1:
        return [_single_level(crops, cfg.ratios[1], grid, generator)]
    coarse = _coarse_level(crops, r, grid, cfg.ratios[0], generator)
    levels = [coarse]
    middle = _middle_level(crops, coarse, cfg.k2, r, grid, cfg.ratios[1], generator)
    levels.append(middle)
    if cfg.levels == 3:
        levels.append(_fine_level(middle, cfg.k3, r, patch, grid, cfg.ratios[2], generator))
    for lv in levels:
        lv.mask = lv.mask.to(device)
    assert all(lv.mask.mask.shape[1] == n_tokens for lv in levels)
    return levels


def _single_level(crops, ratio, grid, generator) -> LevelViews:
    b, r = crops.shape[0], crops.shape[-1]
    box = torch.tensor([[0.0] * 3, [float(r)] * 3]).expand(b, 2, 3).clone()
    mask = random_mask(b, grid**3, ratio, generator).to(crops.device)
    return LevelViews(1, crops, mask, box, torch.arange(grid**3), grid**3)


def _coarse_level(crops, r, grid, ratio, generator) -> LevelViews:
    b = crops.shape[0]
    images = F.interpolate(crops, size=(r, r, r), mode="trilinear", align_corners=False)
    blocks = octant_of_token(grid)
    mask, _ = block_mask(b, blocks, 8, ratio, generator)
    box = torch.tensor([[0.0] * 3, [2.0 * r] * 3]).expand(b, 2, 3).clone()
    return LevelViews(1, images, mask, box, blocks, 8)


def _middle_level(crops, coarse: LevelViews, k2, r, grid, ratio, generator) -> LevelViews:
    b, c = crops.shape[:2]
    octants = crops.reshape(b, c, 2, r, 2, r, 2, r).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, 8, c, r, r, r)
    # the coarse mask lists tokens of masked blocks first; read the first k2 distinct blocks in that order
    chosen = _first_masked_blocks(coarse, k2)  # [B, k2]
    images = octants[torch.arange(b, device=crops.device)[:, None], chosen.to(crops.device)].reshape(b * k2, c, r, r, r)
    corner = torch.stack([chosen // 4, (chosen // 2) % 2, chosen % 2], -1).reshape(-1, 3).float()  # [V, 3]
    box = torch.stack([corner * r, torch.full_like(corner, float(r))], 1)
    half = r // 2
    box_in_parent = torch.stack([corner * half, corner * half + half], 1).long()
    mask = random_mask(b * k2, grid**3, ratio, generator)
    parent = torch.arange(b).repeat_interleave(k2)
    return LevelViews(2, images, mask, box, torch.arange(grid**3), grid**3,
                      parent, chosen.reshape(-1), box_in_parent)


def _first_masked_blocks(coarse: LevelViews, k: int) -> torch.Tensor:
    order = coarse.mask.order.cpu()
    blocks_in_order = coarse.block_of_token[order]  # [B, N]
    n_per_block = coarse.block_of_token.numel() // coarse.n_blocks
    return blocks_in_order[:, ::n_per_block][:, :k]


def _fine_level(middle: LevelViews, k3, r, patch, grid, ratio, generator) -> LevelViews:
    v, c = middle.images.shape[:2]
    chosen = middle.mask.order.cpu()[:, :k3]  # [V, k3] masked tokens, random order
    patches = patchify(middle.images, patch).reshape(v, grid**3, patch, patch, patch, c)
    picked = patches[torch.arange(v)[:, None], chosen.to(patches.device)]  # [V, k3, p, p, p, C]
    picked = picked.permute(0, 1, 5, 2, 3, 4).reshape(v * k3, c, patch, patch, patch)
    images = F.interpolate(picked, size=(r, r, r), mode="trilinear", align_corners=False)
    pos = token_positions(grid)[chosen.reshape(-1)].float()  # [V*k3, 3]
    parent = torch.arange(v).repeat_interleave(k3)
    parent_box = middle.box[parent]
    scale = parent_box[:, 1] / r  # crop voxels per parent voxel
    start = parent_box[:, 0] + pos * patch * scale
    box = torch.stack([start, torch.full_like(start, float(patch)) * scale], 1)
    box_in_parent = torch.stack([pos * patch, pos * patch + patch], 1).long()
    mask = random_mask(v * k3, grid**3, ratio, generator)
    return LevelViews(3, images, mask, box, torch.arange(grid**3), grid**3,
                      parent, chosen.reshape(-1), box_in_parent)
