"""What the benchmark runs on: the machine block of its report, peak resident memory of the measuring process, and
this machine's best dense matrix-multiply rate (fp32 and bf16), which every achieved GFLOP/s is compared with."""
from __future__ import annotations

import os
import platform
import resource
import sys
import time

import torch

from engine.runtime.device import amp_dtype, pick_device
from engine.training.precision import wants_trial

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon", "asimd")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
GEMM_SECONDS = 0.25  # aim for one multiply to take about this long (bounded by the profile's size)
GEMM_BUDGET_S = 3.0  # seconds of multiplies per dtype
MAX_RUNS = 50


def peak_rss_gb() -> float:
    """Peak resident memory of this process (VmHWM), in GB (10^9 bytes)."""
    peak = _proc_status_gb("VmHWM:")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def rss_gb() -> float | None:
    """Resident memory of this process now (VmRSS), in GB; None where /proc is missing."""
    return _proc_status_gb("VmRSS:")


def _proc_status_gb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) * 1024 / 1e9, 1)  # MemTotal
    except (OSError, ValueError, IndexError):
        return None


def machine_info(amp: str = "auto") -> dict:
    """CPU model, cores, memory, library versions, thread settings, SIMD flags and the autocast dtype in use."""
    import monai

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", cpu.get("Features", "")).split())
    device = pick_device("auto")
    dtype = amp_dtype(amp, device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cores": cores,
        "memory_gb": _memory_gb(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": sorted(flags.intersection(FLAGS)),
        "amp": amp,
        "autocast_dtype": ("fp32 or bf16, measured by each run" if wants_trial(amp, dtype, device)
                           else str(dtype).replace("torch.", "") if dtype is not None else "off"),
        "bf16_autocast": dtype == torch.bfloat16,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    _sync(a.device)
    t0 = time.perf_counter()
    a @ b
    _sync(a.device)
    return time.perf_counter() - t0


def _operands(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(dtype: torch.dtype, max_size: int, device: torch.device, budget_s: float = GEMM_BUDGET_S) -> dict:
    """Best GFLOP/s of an n x n matrix multiply over a few runs. n doubles up to `max_size` until one multiply
    takes GEMM_SECONDS: a dtype without hardware support can be 100x slower, and a fixed large n would take minutes."""
    n = min(256, max_size)
    a, b = _operands(n, dtype, device)
    _matmul_seconds(a, b)  # first call: library and thread-pool set-up
    while n < max_size and _matmul_seconds(a, b) < GEMM_SECONDS:
        n = min(2 * n, max_size)
        a, b = _operands(n, dtype, device)
    best, spent, runs = 0.0, 0.0, 0
    while runs < 2 or (spent < budget_s and runs < MAX_RUNS):
        seconds = _matmul_seconds(a, b)
        best, spent, runs = max(best, 2 * n**3 / max(seconds, 1e-9) / 1e9), spent + seconds, runs + 1
    return {"gflops": round(best, 1), "size": n, "runs": runs}


def gemm_peak(max_size: int = 2048, budget_s: float = GEMM_BUDGET_S) -> dict:
    """This machine's dense-GEMM rate in fp32 and bf16, and the better of the two (`gemm_peak_gflops`)."""
    device = pick_device("auto")
    fp32 = gemm_rate(torch.float32, max_size, device, budget_s)
    bf16 = gemm_rate(torch.bfloat16, max_size, device, budget_s)
    return {"gemm_fp32_gflops": fp32["gflops"], "gemm_bf16_gflops": bf16["gflops"],
            "gemm_peak_gflops": max(fp32["gflops"], bf16["gflops"]),
            "gemm_sizes": {"fp32": fp32["size"], "bf16": bf16["size"]}, "gemm_device": str(device)}
