"""Hybrid ConvMAE-style 3D encoder: three convolution stages on the full grid, a ViT on the token grid.

The same class serves pre-training (visible tokens only, MAE gather) and fine-tuning (no mask, multi-scale
features), so weights move between them under one prefix without key surgery.

Stages 1-3 keep their features channels-last, [B, D, H, W, C], so that every 1x1x1 convolution, every patch
embedding and every stage projection (kernel = stride) is one matrix multiply over the last axis, and the
depth-wise convolution sees a channels-last tensor without a copy. The parameters stay those of `nn.Conv3d`
(same names and shapes as the convolutions they compute), so checkpoints and the authors' key map are unchanged;
`Testing/test_models.py` holds them to the plain convolutions in value and gradient. Measured on 2 CPU cores, MiM
base, the 4 middle-level views forward and backward: 3.4-3.6 s per view against 4.0-4.3 s as convolutions."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

from engine.config.sections import EncoderConfig
from engine.runtime.device import cpu_has_fast_bf16, smaller_than_kernel

AUTHORS_VIT_NORM_EPS = 1e-6  # the authors' ViT-block and final LayerNorms (models_convmae3d_v4.py:507, 555)


def pointwise(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A 1x1x1 convolution of a channels-last [..., C] tensor: [..., C] -> [..., C_out]."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def patch_linear(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A convolution whose kernel equals its stride (no padding), of a channels-last [B, D, H, W, C] tensor, as
    one matrix multiply over the non-overlapping k^3 patches: -> [B, D/k, H/k, W/k, C_out]."""
    k = conv.kernel_size[0]
    b, d, h, w, c = x.shape
    patches = x.reshape(b, d // k, k, h // k, k, w // k, k, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    weight = conv.weight.permute(0, 2, 3, 4, 1).flatten(1)  # [C_out, k, k, k, C] like the patches
    return F.linear(patches.reshape(b, d // k, h // k, w // k, k**3 * c), weight, conv.bias)


class _DepthwiseConv3d(torch.autograd.Function):
    """Depth-wise stride-1 "same" convolution whose two gradients are forward convolutions, which oneDNN computes
    at its forward speed. On CPU, PyTorch's own backward is far slower (4 x 48 channels x 48^3: input gradient 1.06 s
    against 0.16 s for the forward; one 48-channel 48^3 map's weight gradient 200-270 ms in bf16 and 94-145 ms in
    fp32, against 13 and 30-34 ms as `depthwise_weight_grad`; 2 cores with AVX-512 BF16, measured in runs of
    differing machine speed). MiM `base`'s step under bf16 went from 21.0 to 11.5 s."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        groups, pad = weight.shape[0], ctx.padding
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4).to(grad.dtype), padding=pad, groups=groups).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad, weight, pad).to(weight.dtype)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_b = grad.sum((0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, pad: int) -> torch.Tensor:
    """`depthwise_weight_grad`, except for bf16 on a CPU that only emulates it (no AVX-512 BF16 / AMX: `train.amp:
    auto` never picks bf16 there, a forced `bf16` does), where oneDNN's own backward is 2-3x faster than the forward
    convolution (torch held to AVX2: 628 against 1735 ms for one 48-channel 48^3 map). In fp32 the forward
    convolution is the faster on either kind of CPU for every stage but one (AVX2, 48 channels at 48^3: 88 against
    63 ms; 96 channels at 24^3: 9 against 20 ms)."""
    dtype = torch.promote_types(x.dtype, grad.dtype)
    if dtype != torch.bfloat16 or cpu_has_fast_bf16():
        return depthwise_weight_grad(x, grad, pad)
    # oneDNN's bf16 weight gradient is wrong on a map smaller than the kernel (runtime.device): fp32 there
    dtype = torch.float32 if smaller_than_kernel(x, weight.shape[2:]) else dtype
    groups = weight.shape[0]
    return torch.ops.aten.convolution_backward(
        grad.to(dtype), x.to(dtype), weight.to(dtype), None, [1] * 3, [pad] * 3, [1] * 3, False, [0] * 3, groups,
        [False, True, False])[1]


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, pad: int) -> torch.Tensor:
    """The weight gradient [C, 1, k, k, k] of a depth-wise stride-1 convolution with padding `pad` (k = 2 pad + 1)
    of x [N, C, D, H, W], given the output's gradient `grad` (same shape): w[c, o] = sum over n and p of
    grad[n, c, p] x_padded[n, c, p + o]. For each sample that is one forward convolution, grouped by channel, of
    the padded input with the gradient as the kernel; the samples' are summed in fp32. (All samples in one
    convolution, as N input channels per group, is no longer depth-wise for oneDNN: 431 ms against 48 ms for two
    48-channel 48^3 samples.) Its map is never smaller than its kernel, so oneDNN's bf16 defect
    (`smaller_than_kernel`) does not arise."""
    c = x.shape[1]
    dtype = torch.promote_types(x.dtype, grad.dtype)
    total = None
    for sample, sample_grad in zip(x.split(1), grad.split(1)):
        padded = F.pad(sample.to(dtype), (pad,) * 6).contiguous(memory_format=torch.channels_last_3d)
        kernel = sample_grad.to(dtype).transpose(0, 1)  # [C, 1, D, H, W]
        w = F.conv3d(padded, kernel, groups=c).float()  # [1, C, k, k, k]
        total = w if total is None else total + w
    return total.to(dtype).reshape(c, 1, *(2 * pad + 1,) * 3)


def depthwise(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """The depth-wise convolution `conv` of a channels-last [B, D, H, W, C] tensor, channels-last out."""
    y = x.permute(0, 4, 1, 2, 3)  # [B, C, D, H, W] with channels-last strides: no copy
    if _wants_fast_backward(y, conv):
        y = _DepthwiseConv3d.apply(y, conv.weight, conv.bias, conv.padding[0])
    else:
        y = conv(y)
    return y.permute(0, 2, 3, 4, 1)


def _wants_fast_backward(y: torch.Tensor, conv: nn.Conv3d) -> bool:
    """The custom CPU backward only pays when a gradient will be taken; inference (no_grad) and export (tracing,
    ONNX) take the plain convolution, which computes the same forward and which exporters understand."""
    if y.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return y.requires_grad or conv.weight.requires_grad


class ChannelLayerNorm3d(nn.Module):
    """LayerNorm over the channels of a channels-last [B, D, H, W, C] tensor (a wrapper only so that its
    parameters keep their saved names, `<name>.norm.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvBlock3d(nn.Module):
    """LN -> 1x1x1 conv -> depth-wise k^3 conv -> 1x1x1 conv, then a 1x1x1-conv MLP; both residual.
    Channels-last in and out: x [B, D, H, W, C].

    `visible` ([B, D, H, W, 1], 1 = visible) zeroes masked voxels before the spatial conv so that nothing of a
    masked region reaches a visible one."""

    def __init__(self, dim: int, kernel: int = 5, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = ChannelLayerNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.dwconv = nn.Conv3d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.norm2 = ChannelLayerNorm3d(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv3d(dim, hidden, 1), nn.GELU(), nn.Dropout(dropout), nn.Conv3d(hidden, dim, 1))

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        y = pointwise(self.norm1(x), self.conv1)
        if visible is not None:
            y = y * visible
        x = x + pointwise(depthwise(y, self.dwconv), self.conv2)
        first, act, drop, second = self.mlp
        return x + pointwise(drop(act(pointwise(self.norm2(x), first))), second)


class PatchEmbed3d(nn.Module):
    """Strided conv (kernel = stride) followed by channel LayerNorm, and a GELU if `act` (the authors' variant);
    channels-last in and out."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: bool = False):
        super().__init__()
        self.proj = nn.Conv3d(in_ch, out_ch, stride, stride=stride)
        self.norm = ChannelLayerNorm3d(out_ch)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(patch_linear(x, self.proj)))


class HybridEncoder(nn.Module):
    """x: [B, C, R, R, R] -> stage-4 tokens [B, n, dims[3]] (n = visible tokens, or all (R/p)^3).

    `cfg.variant == "authors"` computes the MiM authors' encoder (models_convmae3d_v4.py): GELU-ended patch
    embeddings, `token_proj` (their `patch_embed5`) on the tokens before the position embedding, LayerNorm eps 1e-6
    in the ViT blocks and the final norm. The default variant has exactly the keys it always had."""

    def __init__(self, cfg: EncoderConfig, roi: int):
        super().__init__()
        cfg.validate()
        self.cfg, self.roi = cfg, roi
        self.patch = cfg.patch_size
        self.grid = roi // self.patch
        authors = cfg.variant == "authors"
        chans = (cfg.in_channels, *cfg.dims)
        self.embeds = nn.ModuleList(PatchEmbed3d(chans[i], chans[i + 1], cfg.strides[i], act=authors) for i in range(4))
        # their Linear between the last patch embedding and the position embedding
        self.token_proj = nn.Linear(cfg.dims[3], cfg.dims[3]) if authors else None
        self.conv_stages = nn.ModuleList(
            nn.ModuleList(ConvBlock3d(cfg.dims[i], cfg.conv_kernel, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depths[i]))
            for i in range(3)
        )
        # stage 1-3 outputs -> token grid, kernel = stride = remaining downsampling
        self.stage_proj = nn.ModuleList(
            nn.Conv3d(cfg.dims[i], cfg.dims[3], math.prod(cfg.strides[i + 1:]), stride=math.prod(cfg.strides[i + 1:]))
            for i in range(3)
        )
        self.blocks = nn.ModuleList(
            transformer_block(cfg.dims[3], cfg.mlp_ratio, cfg.num_heads, cfg.dropout) for _ in range(cfg.depths[3])
        )
        self.norm = nn.LayerNorm(cfg.dims[3])
        if authors:  # their norm_layer=partial(nn.LayerNorm, eps=1e-6); their conv-stage norms keep 1e-5
            for norm in [self.norm, *(n for b in self.blocks for n in (b.norm1, b.norm2))]:
                norm.eps = AUTHORS_VIT_NORM_EPS
        self.register_buffer("pos_embed", sincos_embedding(self.grid, cfg.dims[3]), persistent=False)
        self.apply(_init_weights)

    @property
    def out_dim(self) -> int:
        return self.cfg.dims[3]

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """keep: [B, n_keep] visible token ids; mask: [B, N] bool (True = masked). Both or neither."""
        tokens, _ = self.forward_features(x, keep, mask)
        return tokens

    def forward_features(self, x, keep=None, mask=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (normalised stage-4 tokens [B, n, C4], [stage1, stage2, stage3] feature maps [B, C_i, ...],
        channels-last strides)."""
        self._check_input(x)
        visible = None if mask is None else (~mask).to(x.dtype).reshape(x.shape[0], 1, *(self.grid,) * 3)
        feats = []
        x = x.permute(0, 2, 3, 4, 1)  # [B, D, H, W, C]
        for i in range(3):
            x = self.embeds[i](x)
            vis = None if visible is None else _upsample_mask(visible, x.shape[1]).permute(0, 2, 3, 4, 1)
            for block in self.conv_stages[i]:
                x = block(x, vis)
            if vis is not None:
                x = x * vis
            feats.append(x)
        x = self.embeds[3](x)  # [B, g, g, g, C4]
        tokens = x.flatten(1, 3)  # [B, N, C4], raster (z, y, x) order
        if self.token_proj is not None:
            tokens = self.token_proj(tokens)
        tokens = tokens + self._position(tuple(x.shape[1:4]), x)
        side = sum(patch_linear(f, proj).flatten(1, 3) for proj, f in zip(self.stage_proj, feats))  # [B, N, C4]
        if keep is not None:
            tokens, side = gather_tokens(tokens, keep), gather_tokens(side, keep)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens + side), [f.permute(0, 4, 1, 2, 3) for f in feats]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected [B, {self.cfg.in_channels}, D, H, W], got {tuple(x.shape)}")
        if any(s % self.patch for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be a multiple of the patch size {self.patch}")

    def _position(self, grid: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The fixed embedding of the pre-training grid, or one built for another token grid."""
        pos = self.pos_embed if grid == (self.grid,) * 3 else sincos_embedding_grid(list(grid), self.out_dim)
        return pos.to(device=like.device, dtype=like.dtype)


def transformer_block(dim: int, mlp_ratio: float, heads: int, dropout: float = 0.0) -> TransformerBlock:
    """MONAI's pre-norm ViT block, without the LayerNorm it keeps for a cross-attention we never use."""
    block = TransformerBlock(dim, int(dim * mlp_ratio), heads, dropout, qkv_bias=True)
    del block.norm_cross_attn
    return block


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, C], ids [B, n] -> [B, n, C]."""
    return tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def sincos_embedding(grid: int, dim: int) -> torch.Tensor:
    return sincos_embedding_grid([grid] * 3, dim)


def sincos_embedding_grid(grid: list[int], dim: int) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding [1, prod(grid), dim] (MONAI's builder)."""
    with warnings.catch_warnings():  # MONAI calls torch.meshgrid without `indexing` (it means "ij")
        warnings.simplefilter("ignore", UserWarning)
        return build_sincos_position_embedding(list(grid), dim, spatial_dims=3).data.clone()


def _upsample_mask(visible: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(visible, size=(size,) * 3, mode="nearest")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def keep_position_embedding(encoder: HybridEncoder) -> None:
    """Make the encoder's position embedding part of its weights, so that one loaded from elsewhere (the authors'
    layout, interpolated) travels into model.pt; our own checkpoints do not carry it and it stays our sin-cos."""
    encoder.register_buffer("pos_embed", encoder.pos_embed, persistent=True)
