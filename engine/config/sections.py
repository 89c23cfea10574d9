"""Configuration sections shared by pre-training and fine-tuning: the encoder, the MAE decoder, the data and the
training loop."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.config.schema import check_choice
from engine.errors import UserError

ENCODER_VARIANTS = ("mimslicer", "authors")


@dataclass(frozen=True)
class EncoderConfig:
    """Hybrid ConvMAE-style 3D encoder: three conv stages, then a ViT on the token grid.

    `variant`: "mimslicer" (ours) or "authors", the function of the MiM authors' encoder, which their weights need:
    a GELU ends every patch embedding, a Linear (`token_proj`, their `patch_embed5`) maps the tokens before the
    position embedding, and the ViT blocks' and the final LayerNorm use eps 1e-6. Same keys otherwise."""

    in_channels: int = 1
    dims: tuple[int, ...] = (48, 96, 192, 384)
    depths: tuple[int, ...] = (2, 2, 2, 11)
    strides: tuple[int, ...] = (2, 2, 2, 2)  # patch side = product of the strides
    num_heads: int = 6
    mlp_ratio: float = 4.0
    conv_kernel: int = 5
    dropout: float = 0.0
    variant: str = "mimslicer"

    @property
    def patch_size(self) -> int:
        return math.prod(self.strides)

    def validate(self) -> None:
        check_choice("encoder.variant", self.variant, ENCODER_VARIANTS)
        if not (len(self.dims) == len(self.depths) == len(self.strides) == 4):
            raise UserError(f"encoder dims/depths/strides need 4 entries each, got {self.dims}, {self.depths}, {self.strides}")
        if self.dims[3] % self.num_heads:
            raise UserError(f"encoder dims[3]={self.dims[3]} must be divisible by num_heads={self.num_heads}")
        if self.dims[3] % 6:
            raise UserError(f"encoder dims[3]={self.dims[3]} must be divisible by 6 (3D sin-cos position embedding)")


@dataclass(frozen=True)
class DecoderConfig:
    """MAE transformer decoder shared by all levels."""

    dim: int = 576
    depth: int = 8
    num_heads: int = 16

    def validate(self) -> None:
        if self.dim % self.num_heads or self.dim % 6:
            raise UserError(f"decoder dim={self.dim} must be divisible by num_heads={self.num_heads} and by 6")


@dataclass(frozen=True)
class DataConfig:
    spacing: tuple[float, ...] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, ...] = (-1000.0, 1000.0)
    cache_dir: str | None = None
    workers: int = 0
    batch_size: int = 1  # crops per step


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 50
    accumulate: int = 1
    clip_grad: float = 3.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    checkpoint_every: int = 100
    log_every: int = 1
    seed: int = 0
    # minutes the whole run may take, reading the data included; the run times its first steps and one validation,
    # then fixes `steps` to what fits (and records it here). None: `steps` as given
    time_limit: float | None = None
    # MiM/MAE in one process (DDP runs a step as one pass): at most this many views of a level per forward and
    # backward, 0 = a level's views at once. Same gradients; fewer activations alive at a time. "auto": 1 on a
    # CPU (the fastest there, and the smallest: MiM base under bf16 on 2 cores, 11.8 s and 2.8 GB per step against
    # 15.4 s and 3.6 GB for 2 views, 15.4 s and 4.4 GB for 4), a whole level on a GPU
    views_per_pass: int | str = "auto"

    def __post_init__(self):
        if self.amp is False:  # YAML reads `--set train.amp=off` as false
            object.__setattr__(self, "amp", "off")

    def validate(self) -> None:
        check_choice("train.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        if self.steps < 1 or self.accumulate < 1 or self.checkpoint_every < 1:
            raise UserError("train.steps, train.accumulate and train.checkpoint_every must be >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UserError(f"train.time_limit (--time-limit) is in minutes and must be positive, got {self.time_limit}")
        if self.views_per_pass != "auto" and not (isinstance(self.views_per_pass, int) and self.views_per_pass >= 0):
            raise UserError(f"train.views_per_pass must be 'auto' or an integer >= 0 (0: all views of a level in one "
                            f"pass), got {self.views_per_pass!r}")

    def views_per_pass_on(self, device: torch.device) -> int:
        if self.views_per_pass == "auto":
            return 0 if device.type == "cuda" else 1
        return self.views_per_pass
