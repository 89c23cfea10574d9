"""FLOPs of one training step (forward and backward), counted by `torch.utils.flop_counter` on meta tensors: the
network is built and run without memory or compute, so the count costs a second even for the `base` preset.
Divided by the measured seconds per step, it gives the achieved GFLOP/s of training.

`flop_counter()` is PyTorch's counter with one formula corrected: for `convolution_backward` PyTorch (2.13) counts
the weight gradient of a grouped convolution as if it were dense, `groups` times too much. For the depth-wise
5x5x5 convolutions of the hybrid encoder (groups = channels) that inflated the count of a MiM base step from 3.1
to 7.7 TFLOP (measured)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from engine.config.finetune import FinetuneConfig
from engine.config.pretrain import PretrainConfig
from engine.masking import make_mim_views
from engine.models import build_pretrainer
from engine.models.segmenter import build_segmenter

META = torch.device("meta")


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """PyTorch's `conv_backward_flop` (shapes in, shapes out), with the weight gradient divided by `groups`."""
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input: a transposed convolution of grad_out with the (already grouped) weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: a convolution over the batch, once per group
        x, g = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(t(x), t(g), t(out_shape[1]), transposed=False) // groups
    return flops


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: grouped_conv_backward_flop})


def pretrain_step_flops(cfg: PretrainConfig) -> float:
    """One step of `cfg`: a batch of crops (2R^3 for MiM, R^3 otherwise) through every view and level."""
    with META:
        model = build_pretrainer(cfg)
    side, batch, channels = cfg.crop_size, cfg.data.batch_size, cfg.encoder.in_channels
    crops = torch.zeros(batch, channels, side, side, side, device=META)  # [B, C, S, S, S]
    generator = torch.Generator().manual_seed(0)
    with flop_counter() as counter:
        if cfg.method == "hybridmim":
            model(crops, generator)["loss"].backward()
        else:
            levels = make_mim_views(crops, cfg.mask, model.patch, generator)
            for level in model.level_outputs(levels, views_per_pass=cfg.train.views_per_pass_on(META)):
                level.total.backward()
    return float(counter.get_total_flops())


def finetune_step_flops(cfg: FinetuneConfig, out_channels: int) -> float:
    """One step of segmentation fine-tuning: every crop of the batch through the segmenter and back."""
    m = cfg.model
    with META:
        model = build_segmenter(m.backbone, cfg.encoder, m.roi, out_channels, m.feature_size, m.decoder)
    crops = torch.zeros(cfg.data.batch_size * cfg.crop.samples, cfg.encoder.in_channels, m.roi, m.roi, m.roi,
                        device=META)  # [B * samples, C, R, R, R]
    with flop_counter() as counter:
        model(crops).float().mean().backward()
    return float(counter.get_total_flops())
