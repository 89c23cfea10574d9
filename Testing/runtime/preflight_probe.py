"""Estimated vs measured peak memory of one engine command, in a fresh process (run by test_preflight.py).

    python preflight_probe.py infer MODEL INPUT OUTPUT
    python preflight_probe.py finetune DATASET_JSON RUN_DIR [PRESET [TASK]]
    python preflight_probe.py pretrain DATA RUN_DIR [PRESET [METHOD]]

PROBE_AMP=off|bf16 in the environment sets train.amp of a training command (default: the preset's, `auto`);
PROBE_UNCERTAINTY=1 makes `infer` also write the uncertainty map.

The command first runs with its memory check on, up to the check, which records the estimate and stops it (so
every import and the estimate's own work happen before the measurement, as they happen before the check in a real
run). Then the peak resident set is reset to the current one, the command runs for real with the check off, and the
rise of the peak is what it needed. The peak is VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its
parent's peak (it survives fork and exec) and cannot be reset. Prints {"estimate", "increase" (bytes), "seconds"}."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import engine.finetuning.run
import engine.inference.run
import engine.pretraining.run
from engine.runtime.checkpoint import load_checkpoint


class Stop(Exception):
    pass


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Make the peak resident set the current one (Linux); returns it."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS:")


def record_estimate(module, name: str, found: dict) -> None:
    """Replace `module.name` (a check) by one that records its estimate and stops the command."""
    original = getattr(module, name)

    def check(*args, **kwargs):
        if name == "check_volume":  # (plan, volume name): the volume's estimate; the loaded model comes on top
            found["estimate"] = args[0].estimate.host
            found["tile_batch"] = args[0].tile_batch
        else:
            found["estimate"] = original(*args, **kwargs).host
        raise Stop
    setattr(module, name, check)


def command(kind: str, paths: tuple[str, ...], found: dict):
    """The command as a function of its memory check (on or off), and the bytes its estimate leaves out."""
    if kind == "infer":
        model, image, output = paths
        record_estimate(engine.inference.run, "check_volume", found)
        weights = load_checkpoint(model)["model"]  # loaded before the check: not in the volume's estimate

        def run(check: bool):
            request = engine.inference.run.InferRequest(model, image, output, device="cpu", progress="none",
                                                        check_memory=check, sw_batch_size=found.get("tile_batch"),
                                                        uncertainty=os.environ.get("PROBE_UNCERTAINTY") == "1")
            engine.inference.run.run_infer(request)
        return run, sum(t.numel() * t.element_size() for t in weights.values())
    data, out, *options = paths
    preset = options[0] if options else "tiny"
    amp = {"train.amp": os.environ["PROBE_AMP"]} if os.environ.get("PROBE_AMP") else {}
    variant = options[1] if len(options) > 1 else ""  # the task or the method (default: segmentation, mim)
    if kind == "finetune":
        record_estimate(engine.finetuning.run, "check_finetune", found)

        def run(check: bool):
            request = engine.finetuning.run.FinetuneRequest(
                data, out, task=variant or "segmentation", preset=preset, steps=2, fold=0, device="cpu",
                progress="none", overrides={"val.every": 1, **amp}, check_memory=check)
            engine.finetuning.run.run_finetune(request)
    else:
        record_estimate(engine.pretraining.run, "check_pretrain", found)

        def run(check: bool):
            request = engine.pretraining.run.PretrainRequest(
                data, out, method=variant or "mim", preset=preset, steps=2, device="cpu", overrides=amp,
                progress="none", check_memory=check)
            engine.pretraining.run.run_pretrain(request)
    return run, 0


def main(kind: str, *paths: str) -> dict:
    found: dict = {}
    run, outside_estimate = command(kind, paths, found)
    try:
        run(True)
    except Stop:
        pass
    base = reset_peak()
    t0 = time.perf_counter()
    run(False)
    return {"estimate": found["estimate"] + outside_estimate, "increase": status_bytes("VmHWM:") - base,
            "seconds": round(time.perf_counter() - t0, 2)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
