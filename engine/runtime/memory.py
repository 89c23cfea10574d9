"""Resource pre-flight: how much memory a command will need, how much this machine has, and a clear refusal (with
the estimate and what to change) instead of a run the operating system kills half-way.

Estimates are measured, not guessed: the network runs once on PyTorch's `meta` device (shapes only, no data, no
memory) under `TensorMemoryTracker`, which follows every tensor storage the operators create and free, so the
peak it reports is what the same code holds at once on a real device. Data buffers (volumes, sliding-window
outputs) are counted from their shapes. What the process's resident set adds beyond tensors (code, caches, a
fragmented C heap) cannot be traced; it is an allowance fitted to measured peaks (RUNTIME). `preflight_infer` and
`preflight_training` hold the per-command parts."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.errors import UserError

GB = 1e9
F32, INT64 = 4, 8  # bytes per value
LIMIT_ENV = "MIM_MEMORY_LIMIT_GB"  # a cap on what this process may use (tests; users sharing a node)
MARGIN = 0.9  # refuse when the estimate exceeds this share of what is available
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2^63
HEAP_LIMIT = 32 * 2**20  # glibc's largest mmap threshold: bigger blocks are mapped, and returned when freed
# Resident memory beyond the traced tensors, as (bytes, share of the activations held in heap-sized blocks) per
# kind of work: what the run touches first (kernels, caches, thread pools), and freed blocks the C heap keeps,
# fragmented (the share vanishes with MALLOC_MMAP_THRESHOLD_=65536). Fitted to VmHWM on x86 (torch 2.13, glibc) over
# tiny and small runs of every command measured after their estimate (Testing/preflight_probe.py): 31 MB + 0.71 of
# the heap part for training, 21 MB + 0.07 for inference, whose windows reuse the same blocks over and over.
RUNTIME = {"inference": (int(0.02 * GB), 0.1), "training": (int(0.03 * GB), 0.7)}


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes this process can still allocate on `device`: on a CPU the smaller of MemAvailable and what the cgroup
    limit leaves; on CUDA the free memory torch reports. MIM_MEMORY_LIMIT_GB, when set, caps either."""
    device = torch.device(device)
    if device.type == "cuda":
        measured = torch.cuda.mem_get_info(device)[0]
    else:
        found = [b for b in (meminfo_available(), cgroup_available()) if b is not None]
        measured = min(found) if found else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = memory_limit_override()
    return measured if limit is None else min(measured, limit)


def memory_limit_override() -> int | None:
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{LIMIT_ENV} must be a positive number of GB, got '{text}'")
    return int(value * GB)


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_available(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 `memory.max`, else v1 `memory.limit_in_bytes`), not
    counting inactive page cache, which the kernel reclaims before it kills; None when no limit is set."""
    for limit_file, usage_file, stat_file, inactive_key in _cgroup_files(root, membership):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= UNLIMITED:
            continue
        inactive = _stat_value(stat_file, inactive_key)
        return max(0, limit - max(0, usage - inactive))
    return None


def _cgroup_files(root: Path, membership: Path):
    """Candidate (limit, usage, stat, inactive-cache key) files: this process's own cgroup, then the root of the
    mounted hierarchy (which a container's namespace shows as its own)."""
    v2_paths, v1_paths = [], []
    try:
        for line in membership.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and controllers == "":
                v2_paths.append(path.lstrip("/"))
            elif "memory" in controllers.split(","):
                v1_paths.append(path.lstrip("/"))
    except (OSError, ValueError):
        pass
    for rel in [*v2_paths, ""]:
        d = root / rel
        yield d / "memory.max", d / "memory.current", d / "memory.stat", "inactive_file"
    for rel in [*v1_paths, ""]:
        d = root / "memory" / rel
        yield d / "memory.limit_in_bytes", d / "memory.usage_in_bytes", d / "memory.stat", "total_inactive_file"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


class TensorMemoryTracker(TorchDispatchMode):
    """Follows the storages created inside the `with` block: `live` bytes now, `peak` bytes at most, and the same
    for storages under HEAP_LIMIT bytes (`heap_peak`), which the C allocator serves from its heap.

    Outputs that alias an input (views, in-place ops) are not new memory and are not counted; tensors made before
    the block (parameters, inputs) are not counted either. Works on every device, `meta` included."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.heap_live = self.heap_peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        returns = func._schema.returns
        for i, value in enumerate(outputs):
            aliased = i < len(returns) and returns[i].alias_info is not None
            if not aliased:
                for t in tree_flatten(value)[0]:
                    if isinstance(t, torch.Tensor):
                        self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        if n < HEAP_LIMIT:
            self.heap_live += n
            self.heap_peak = max(self.heap_peak, self.heap_live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        n = self._sizes.pop(key, 0)
        self.live -= n
        if n < HEAP_LIMIT:
            self.heap_live -= n


@dataclass(frozen=True)
class Activations:
    """The most bytes of tensors some work holds at once, and how many of those are in blocks under HEAP_LIMIT."""

    peak: int
    heap: int = 0

    def plus(self, other: "Activations") -> "Activations":
        return Activations(self.peak + other.peak, self.heap + other.heap)


def traced(fn: Callable[[], object]) -> Activations:
    """The tensors `fn()` holds at its peak (beyond those that existed before the call)."""
    with TensorMemoryTracker() as tracker:
        fn()
    return Activations(tracker.peak, tracker.heap_peak)


def runtime_allowance(activations: Activations, work: str) -> int:
    """Bytes of resident memory beyond the tensors, for `work` ("inference" or "training") whose network holds
    `activations` at its peak (a tile batch, or a training step)."""
    base, share = RUNTIME[work]
    return base + int(share * activations.heap)


def module_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    tensors = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak increase of host memory (resident set) and of accelerator memory, with named parts (bytes).
    On a CPU everything is host memory and `device` is 0."""

    host: int
    device: int = 0
    parts: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        """"1.23 GB (data 0.40, model 0.10, step 0.60, runtime 0.13)": the total and its parts, in GB."""
        return f"{gb(self.host + self.device)} GB ({self.parts_text()})"

    def parts_text(self) -> str:
        return ", ".join(f"{name} {gb(n)}" for name, n in self.parts if n >= 0.005 * GB)

    def fits(self, available: dict[str, int]) -> bool:
        return all(need <= MARGIN * available[where] for where, need in self.needs().items())

    def needs(self) -> dict[str, int]:
        """Bytes per memory pool: host only on a CPU; host and device on an accelerator."""
        if self.device == 0:
            return {"host": self.host}
        return {"host": self.host, "device": self.device}


def available_for(device: torch.device) -> dict[str, int]:
    """What each memory pool of `device` has free (host: this machine's RAM; device: the GPU's)."""
    out = {"host": available_memory_bytes("cpu")}
    if device.type != "cpu":
        out["device"] = available_memory_bytes(device)
    return out


def require_fits(estimate: MemoryEstimate, available: dict[str, int], what: str, suggestion: str) -> None:
    """Raise a one-line UserError with the estimate, what is free and what to change, unless the estimate fits."""
    if estimate.fits(available):
        return
    needs = estimate.needs()
    short = max(needs, key=lambda pool: needs[pool] / max(1, available[pool]))
    pool = "GPU memory" if short == "device" else "memory"
    capped = f" ({LIMIT_ENV})" if memory_limit_override() is not None else ""
    raise UserError(f"{what} would need about {gb(needs[short])} GB of {pool} ({estimate.parts_text()}), but "
                    f"{gb(available[short])} GB is available{capped} and at most {int(MARGIN * 100)}% of it is used; "
                    f"{suggestion}, or pass --skip-memory-check")


def gb(n: float) -> str:
    return f"{n / GB:.2f}"
