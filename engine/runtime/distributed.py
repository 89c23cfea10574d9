"""Running under torchrun: process group, device per rank, sharding, rank-0-only side effects.

`torchrun --nproc_per_node N -m engine pretrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them every
function here describes a single process, so the same code runs alone, on N GPUs or on N CPU processes (gloo)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from engine.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """Read torchrun's variables (a single process when they are absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group (nccl on GPUs, gloo on CPUs) and pick this rank's device."""
    info = from_environment()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible to torch")
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        device = torch.device("cpu")
    elif info.enabled or device_name in ("auto", "cuda"):
        device = torch.device(f"cuda:{info.local_rank}")
    else:
        device = torch.device(device_name)
    if info.enabled and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return info, device


def in_process_group(stage: Callable[[Any, DistInfo, torch.device], T], request) -> T:
    """`stage(request, info, device)` alone or as one of torchrun's processes: joins the process group on
    `request.device` first and always leaves it."""
    info, device = setup(request.device)
    try:
        return stage(request, info, device)
    finally:
        teardown()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parameters_in_sync(model: torch.nn.Module) -> bool:
    """True when every rank holds exactly the same parameters (checked through a checksum all-gather)."""
    if not dist.is_initialized():
        return True
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=flat.dtype, device=flat.device)
    checksum = torch.stack([flat.sum(), (flat * weights).sum()]).cpu()  # bit-identical parameters, equal sums
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class ShardSampler(Sampler[int]):
    """Each epoch, a fresh permutation (seed + epoch) dealt out rank by rank: every item is seen exactly once per
    epoch across all ranks, with no padding duplicates. Ranks may hold one item more than others; training runs
    by steps, so every rank still takes the same number of optimiser steps."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if size < world_size:
            raise UserError(f"{size} volume(s) cannot be shared among {world_size} processes; use fewer processes")
        self.size, self.rank, self.world_size, self.seed, self.epoch = size, rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (the value itself in a single process)."""
    if not dist.is_initialized():
        return value
    t = _scalar(value)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (the flag itself in a single process)."""
    if not dist.is_initialized():
        return flag
    t = _scalar(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _scalar(value: int) -> torch.Tensor:
    """A one-element tensor on the device the process group's backend reduces on (nccl: this rank's GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    return torch.tensor([value], dtype=torch.int64, device=device)
