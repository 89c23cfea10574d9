"""Segmentation networks for fine-tuning: the pre-training encoder (unmasked, multi-scale) under a UNETR-style decoder
built from MONAI blocks, or MONAI's SwinUNETR for SwinUNETR-SSL weights. Each names the prefix of its encoder
weights (`encoder_prefix`), which is what pre-trained weights load into."""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.networks.nets import SwinUNETR

from engine.config.finetune import DECODERS, finetune_config_from_dict
from engine.config.sections import EncoderConfig
from engine.models.hybrid_encoder import HybridEncoder, keep_position_embedding
from engine.runtime.device import guard_small_convolutions

NORM = "instance"
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})  # as MONAI's UNETR blocks


def conv_norm_act(in_channels: int, out_channels: int) -> Convolution:
    """3x3x3 convolution, instance norm, leaky ReLU."""
    return Convolution(3, in_channels, out_channels, kernel_size=3, norm=NORM, act=ACT)


class LightUpBlock(nn.Module):
    """UnetrUpBlock with one 3x3x3 convolution after the concatenation instead of a residual block of two: for the
    full-resolution level, where each convolution costs as much as all coarser levels together."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.transp_conv = get_conv_layer(3, in_channels, out_channels, kernel_size=stride, stride=stride,
                                          conv_only=True, is_transposed=True)
        self.conv_block = conv_norm_act(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class HybridSegmenter(nn.Module):
    """x [B, C, D, H, W] (multiples of the patch size) -> logits [B, K, D, H, W].

    Skips at full, 1/2, 1/4, 1/8 resolution (raw input, stages 1-3) and the stage-4 tokens as a 1/16 grid, each
    through a residual UnetrBasicBlock, then four UnetrUpBlocks (as in MONAI's SwinUNETR decoder).

    `decoder="light"` thins the full-resolution level, which in the UNETR decoder holds four of its 3x3x3
    convolutions at full width (about 40% of a training step of the `small` preset): there the skip is one
    convolution of the input to half the width, and the last up-block one convolution after the concatenation."""

    encoder_prefix = "encoder."

    def __init__(self, encoder_cfg: EncoderConfig, roi: int, out_channels: int, feature_size: int = 48,
                 decoder: str = "unetr"):
        super().__init__()
        if out_channels < 2:
            raise ValueError(f"a segmenter needs >= 2 output channels (background + labels), got {out_channels}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.encoder = HybridEncoder(encoder_cfg, roi)
        keep_position_embedding(self.encoder)
        dims, strides, fs = encoder_cfg.dims, encoder_cfg.strides, feature_size
        light = decoder == "light"
        widths = (max(fs // 2, 1) if light else fs, fs, 2 * fs, 4 * fs, 8 * fs)  # full, 1/2, ..., 1/16 resolution
        sources = (encoder_cfg.in_channels, *dims)
        self.skips = nn.ModuleList(
            conv_norm_act(sources[i], widths[i]) if light and i == 0 else
            UnetrBasicBlock(3, sources[i], widths[i], 3, 1, NORM, res_block=True) for i in range(5)
        )
        self.ups = nn.ModuleList(
            LightUpBlock(widths[i + 1], widths[i], strides[i]) if light and i == 0 else
            UnetrUpBlock(3, widths[i + 1], widths[i], 3, strides[i], NORM, res_block=True) for i in reversed(range(4))
        )
        self.out = UnetOutBlock(3, widths[0], out_channels)
        # The decoder is channels-last, in training and in inference. Measured on 2 CPU cores, one forward of 2
        # windows of 64^3, `fast` recipe: 112 against 123 ms contiguous in bf16, 209-224 against 246-266 ms in fp32,
        # 255-295 against 290-320 ms in fp32 with torch held to AVX2 (`small`: 348-360 against 430-456 ms in bf16,
        # 1-6% faster in fp32, 5-9% slower in fp32 held to AVX2); a fine-tuning step of `small` 5.5 against 6.6 s.
        # fp32 segmentations are the same voxel for voxel as with a contiguous decoder.
        for part in (self.skips, self.ups, self.out):
            part.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, (f1, f2, f3) = self.encoder.forward_features(x)  # [B, N, C4]; [B, C_i, D/2^i, ...]
        grid = [s // self.encoder.patch for s in x.shape[2:]]
        f4 = tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)  # [B, C4, D/16, H/16, W/16]
        if not torch.onnx.is_in_onnx_export():  # ONNX has no memory formats (and the exporter refuses the call)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = [block(f) for block, f in zip(self.skips, (x, f1, f2, f3, f4))]
        y = skips[4]
        for up, skip in zip(self.ups, reversed(skips[:4])):
            y = up(y, skip)
        return self.out(y)


class SwinSegmenter(SwinUNETR):
    """MONAI's SwinUNETR: the network SwinUNETR-SSL weights (`model_swinvit.pt`) feed, encoder under `swinViT.`."""

    encoder_prefix = "swinViT."

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 48):
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size)


def build_segmenter(backbone: str, encoder_cfg: EncoderConfig, roi: int, out_channels: int,
                    feature_size: int, decoder: str = "unetr") -> nn.Module:
    if backbone == "swinunetr":
        model = SwinSegmenter(encoder_cfg.in_channels, out_channels, feature_size)
    else:
        model = HybridSegmenter(encoder_cfg, roi, out_channels, feature_size, decoder)
    return guard_small_convolutions(model)  # e.g. the 1/16 skip at ROI 32 (2^3 voxels, 3^3 kernels)


def segmenter_from_config(config: dict, out_channels: int) -> nn.Module:
    """The untrained network a fine-tuning config describes (model.pt's `config`, plain data): what inference
    loads model.pt's weights into, and what an exported MONAI bundle instantiates (`_target_`)."""
    cfg = finetune_config_from_dict(config)
    return build_segmenter(cfg.model.backbone, cfg.encoder, cfg.model.roi, out_channels, cfg.model.feature_size,
                           cfg.model.decoder)
