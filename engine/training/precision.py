"""`train.amp: auto` on a CPU with bf16 instructions: whether bf16 autocast pays is measured on the run's own
training steps, not assumed from the CPU's flags. It depends on the network: on one AVX-512 BF16 EPYC a MiM `base`
step took 43.5 s under bf16 against 40.4 s in fp32, while SwinUNETR's was 1.5x faster and the `fast` fine-tuning
recipe's 30 % faster.

The first `2 * ROUNDS` optimiser steps alternate fp32, bf16, fp32, bf16, ... (they are real training steps: nothing is
wasted). The first step of each precision pays one-off costs (oneDNN primitives, the loader's first batch) and is
left out; of the others the fastest of each precision counts (the least disturbed by other programs). bf16 is kept
when it is at least `MIN_GAIN` faster, else fp32 (the more accurate one wins a tie). Under DDP the ranks agree: each
precision counts at its slowest rank."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

ROUNDS = 3  # steps of each precision; the first of each is left out
MIN_GAIN = 0.05  # bf16 must take at most 95 % of fp32's time to be kept
CANDIDATES = (None, torch.bfloat16)  # fp32 first: the first step also pays the data loader's start

log = logging.getLogger(__name__)


class PrecisionTrial:
    """Alternates the autocast dtype over the first steps, times them, then settles on the faster one."""

    def __init__(self):
        self.seconds: dict[torch.dtype | None, list[float]] = {c: [] for c in CANDIDATES}
        self.chosen: torch.dtype | None = None
        self.decided = False
        self._steps = 0

    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of the next step."""
        return self.chosen if self.decided else CANDIDATES[self._steps % len(CANDIDATES)]

    def record(self, seconds: float) -> dict | None:
        """The seconds of the step just run (under `dtype()`); returns the decision record once it is taken."""
        if self.decided:
            return None
        self.seconds[CANDIDATES[self._steps % len(CANDIDATES)]].append(seconds)
        self._steps += 1
        if self._steps < ROUNDS * len(CANDIDATES):
            return None
        fp32, bf16 = (_slowest_rank(min(self.seconds[c][1:])) for c in CANDIDATES)
        self.chosen = torch.bfloat16 if bf16_pays(fp32, bf16) else None
        self.decided = True
        record = {"fp32_step_s": round(fp32, 4), "bf16_step_s": round(bf16, 4), "chosen": self.name}
        log.info("train.amp auto: a step took %.3g s in fp32 and %.3g s under bf16 autocast; %s from here on",
                 fp32, bf16, "bf16" if self.chosen is not None else "fp32")
        return record

    @property
    def name(self) -> str:
        return "bf16" if self.chosen is not None else "off"


def bf16_pays(fp32_s: float, bf16_s: float) -> bool:
    """The rule: bf16 is kept only when its step is clearly faster (the more accurate fp32 wins a tie)."""
    return bf16_s <= (1 - MIN_GAIN) * fp32_s


def _slowest_rank(seconds: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def wants_trial(amp_setting: str, amp: torch.dtype | None, device: torch.device) -> bool:
    """`auto` on a CPU whose flags offer fast bf16: the only case where the faster precision is not known."""
    return amp_setting == "auto" and device.type == "cpu" and amp == torch.bfloat16
