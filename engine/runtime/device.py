"""Device and mixed-precision choice: CUDA when present, else CPU; bf16 autocast where the hardware has it."""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.nn as nn

from engine.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible to torch")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX, and torch may use them: bf16 matrix multiply can be faster than fp32 on this CPU (whether
    it is for a given network, `train.amp: auto` measures: training.precision). ATEN_CPU_CAPABILITY=avx2 and
    ONEDNN_MAX_CPU_ISA=AVX2 (which make torch behave as on an AVX2-only CPU) turn it off."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` (auto | bf16 | fp16 | off) on `device`, or None for full precision."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if amp == "fp16":
        raise UserError("fp16 autocast is for CUDA; on a CPU use --amp bf16 or off")
    if amp == "bf16" or (amp == "auto" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# oneDNN's AVX-512 BF16 weight gradient of a 3D convolution (`jit_bf16:avx512_core_bf16` backward_weights, oneDNN
# 3.12 in PyTorch 2.13) is wrong when the input is smaller than the kernel along a side, e.g. a 3^3 kernel on the
# 2^3 token grid of ROI 32: it returns memory it never wrote (up to 1e37, inf or NaN, different from run to run) or
# values off by 100 %. The forward and the input gradient are right. Measured on 2,600 shapes (kernels 3 and 5, dense
# and depth-wise, both memory formats): never wrong when every side is at least the kernel's. Such a convolution is
# computed in fp32 instead; its map is a few voxels across, so that costs nothing.
def smaller_than_kernel(x: torch.Tensor, kernel: tuple[int, ...]) -> bool:
    """x [B, C, D, H, W] on the CPU has a spatial side shorter than `kernel`'s."""
    return x.device.type == "cpu" and any(s < k for s, k in zip(x.shape[2:], kernel))


class SmallInputConv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and names) that leaves CPU bf16 autocast when its input is smaller than its
    kernel (see `smaller_than_kernel`)."""

    def _conv_forward(self, x, weight, bias):
        if torch.is_autocast_enabled("cpu") and smaller_than_kernel(x, self.kernel_size):
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(x.float(), weight.float(), None if bias is None else bias.float())
        return super()._conv_forward(x, weight, bias)


def guard_small_convolutions(model: nn.Module) -> nn.Module:
    """Every plain nn.Conv3d of `model` becomes a SmallInputConv3d, in place (state dict unchanged)."""
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = SmallInputConv3d
    return model
