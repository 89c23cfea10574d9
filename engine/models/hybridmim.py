"""HybridMIM: masked 16^3 patches set to zero; partial-region reconstruction, per-region count/position heads
with a consistency term, and dropout contrast between two encoder passes. Backbone: MONAI BasicUNet or the
hybrid encoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from engine.config.pretrain import HYBRIDMIM_PATCH, PretrainConfig, replace_encoder
from engine.losses import nt_xent, region_losses
from engine.masking import random_mask, unpatchify
from engine.models.blocks import mlp, with_cpu_dropout
from engine.models.decoder import MAEDecoder
from engine.models.hybrid_encoder import HybridEncoder

MASK_PATCH = HYBRIDMIM_PATCH  # the authors' masking patch
# Windowed CT is in [0, 1] with air at 0, the value a masked voxel is set to: in air a masked patch would look
# visible, and the count and position targets would be unknowable there. Intensities are lifted to [AIR, 1] first
# (as HybridMIM's [0.001, 1] scaling does), so only masked voxels are exactly 0.
AIR = 0.001


class HybridMIMPretrainer(nn.Module):
    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg, h = cfg, cfg.hybridmim
        self.roi = cfg.mask.roi
        if self.roi % (2 * MASK_PATCH):
            raise ValueError(f"HybridMIM needs roi divisible by {2 * MASK_PATCH}, got {self.roi}")
        self.grid = self.roi // MASK_PATCH
        self.box_start = self.grid // 3  # first token of the central box (2 of 6 at R = 96: voxels [32, 96))
        if h.backbone == "unet":
            self.backbone = UNetBackbone(cfg.encoder.in_channels, h.unet_features, h.dropout)
            feat_dim = h.unet_features[4]
        else:
            enc_cfg = replace_encoder(cfg.encoder, dropout=h.dropout)
            self.backbone = HybridBackbone(enc_cfg, cfg.decoder, self.roi)
            feat_dim = enc_cfg.dims[3]
        self.count_head = nn.Linear(feat_dim, 9)
        self.position_head = nn.Linear(feat_dim, 8)
        self.contrast_head = mlp(feat_dim, 2 * feat_dim, 128)
        with_cpu_dropout(self)  # the contrast's dropout is in every layer of the backbone

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """images: [B, C, R, R, R] with B >= 2 (the other samples are the contrast's negatives)."""
        h = self.cfg.hybridmim
        b = images.shape[0]
        images = lift_air(images)
        mask = random_mask(b, self.grid**3, h.mask_ratio, generator).mask.to(images.device)  # [B, N]
        voxel_mask = unpatchify(mask[..., None].float().expand(-1, -1, MASK_PATCH**3), MASK_PATCH, (self.grid,) * 3)
        masked = images * (1 - voxel_mask)
        feats, bottleneck = self.backbone.encode(masked)
        lo = self.box_start * MASK_PATCH if h.partial else 0
        recon = self.backbone.decode(feats, self.box_start if h.partial else 0)  # [B, C, r', r', r'] of voxels [lo:]
        box = (slice(None), slice(None)) + (slice(lo, None),) * 3
        m = voxel_mask[box].expand_as(recon)
        rec = ((recon.float() - images[box].float()).pow(2) * m).sum() / m.sum().clamp_min(1.0)
        regions = F.avg_pool3d(bottleneck, 2).flatten(2).transpose(1, 2)  # [B, regions, F]
        count, position, consistency = region_losses(self.count_head(regions), self.position_head(regions), mask, self.grid)
        _, bottleneck2 = self.backbone.encode(masked)  # second pass: another dropout draw
        contrast = nt_xent(self.contrast_head(bottleneck.mean((2, 3, 4))),
                           self.contrast_head(bottleneck2.mean((2, 3, 4))), h.temperature)
        losses = {"rec": rec, "count": count, "position": position, "consistency": consistency, "contrast": contrast}
        losses["loss"] = sum(w * losses[k] for w, k in zip(h.weights, ("rec", "count", "position", "consistency", "contrast")))
        return losses


def lift_air(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [AIR, 1]: air stays distinguishable from a masked (zeroed) voxel."""
    return AIR + (1.0 - AIR) * images


class UNetBackbone(nn.Module):
    """MONAI BasicUNet, called stage by stage so that the decoder can run on the central box only."""

    def __init__(self, in_channels: int, features, dropout: float):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=in_channels,
                              features=tuple(features), dropout=dropout)

    def encode(self, x: torch.Tensor):
        u = self.unet
        x0 = u.conv_0(x)
        x1 = u.down_1(x0)
        x2 = u.down_2(x1)
        x3 = u.down_3(x2)
        x4 = u.down_4(x3)
        return [x0, x1, x2, x3, x4], x4

    def decode(self, feats, start: int) -> torch.Tensor:
        """Decode from bottleneck token `start` on: skip features cropped to the same box at every scale."""
        x0, x1, x2, x3, x4 = (f[(..., *(slice(start * 2 ** (4 - i), None),) * 3)] for i, f in enumerate(feats))
        u = self.unet
        y = u.upcat_4(x4, x3)
        y = u.upcat_3(y, x2)
        y = u.upcat_2(y, x1)
        y = u.upcat_1(y, x0)
        return u.final_conv(y)


class HybridBackbone(nn.Module):
    """The hybrid encoder on all tokens of the zero-masked input, and an MAE decoder on the box's tokens only."""

    def __init__(self, enc_cfg, dec_cfg, roi: int):
        super().__init__()
        self.encoder = HybridEncoder(enc_cfg, roi)
        if self.encoder.patch != MASK_PATCH:
            raise ValueError(f"HybridMIM on the hybrid encoder needs a patch of {MASK_PATCH}, got {self.encoder.patch}")
        self.grid = self.encoder.grid
        self.decoder = MAEDecoder(dec_cfg, self.encoder.out_dim, self.grid, MASK_PATCH, enc_cfg.in_channels,
                                  mask_token=False)

    def encode(self, x: torch.Tensor):
        tokens = self.encoder(x)  # [B, N, C4]
        g = self.grid
        return tokens, tokens.transpose(1, 2).reshape(x.shape[0], -1, g, g, g)

    def decode(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        g, side = self.grid, self.grid - start
        idx = torch.arange(g**3, device=tokens.device).reshape(g, g, g)[start:, start:, start:].reshape(-1)
        pred = self.decoder.decode_subset(tokens[:, idx], idx)  # [B, side^3, p^3 C]
        return unpatchify(pred, MASK_PATCH, (side,) * 3, self.encoder.cfg.in_channels)

