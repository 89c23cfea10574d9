"""MAE transformer decoder: visible tokens + learned mask token, sin-cos position, p^3 voxels per token."""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.config.sections import DecoderConfig
from engine.models.hybrid_encoder import sincos_embedding, transformer_block


class MAEDecoder(nn.Module):
    """Returns (pred [V, N, p^3 * C], latent [V, N, dim]); latent is the decoder's view of every token."""

    def __init__(self, cfg: DecoderConfig, enc_dim: int, grid: int, patch: int, channels: int = 1,
                 mask_token: bool = True):
        super().__init__()
        cfg.validate()
        self.embed = nn.Linear(enc_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02) if mask_token else None
        self.blocks = nn.ModuleList(transformer_block(cfg.dim, 4.0, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.pred = nn.Linear(cfg.dim, patch**3 * channels)
        self.register_buffer("pos_embed", sincos_embedding(grid, cfg.dim), persistent=False)
        self.n_tokens = grid**3

    def forward(self, visible: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """visible: [V, n_keep, enc_dim] encoder tokens; keep: [V, n_keep] their ids (None: all tokens given)."""
        x = self.embed(visible)
        if keep is not None:
            if self.mask_token is None:
                raise ValueError("this decoder was built without a mask token: give it every token")
            full = self.mask_token.to(x.dtype).expand(x.shape[0], self.n_tokens, -1).clone()
            x = full.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)
        return self._decode(x + self.pos_embed.to(x.dtype))

    def decode_subset(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode only the tokens at grid positions `ids` ([n]); no mask tokens. Returns pred [V, n, p^3 C]."""
        x = self.embed(tokens) + self.pos_embed[:, ids].to(tokens.dtype)
        return self._decode(x)[0]

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        latent = self.norm(x)
        return self.pred(latent), latent
