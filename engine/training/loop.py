"""One training loop for pre-training and fine-tuning: warm-up + cosine per iteration, gradient accumulation,
clipping, autocast, a NaN guard, atomic checkpoints every N steps, a JSONL log, a clean stop on SIGINT/SIGTERM, and
optionally a wall-clock budget that fixes the number of steps from measured time (`training.budget`). Each log
record also goes to TensorBoard (`training.tensorboard`) where that package is installed."""
from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from engine.config.sections import TrainConfig
from engine.errors import TrainingDiverged
from engine.runtime.atomic import json_safe, write_text
from engine.runtime.device import amp_dtype, autocast
from engine.runtime.progress import Progress
from engine.training.budget import PROVISIONAL_STEPS, TimeBudget
from engine.training.optim import set_lr, warmup_cosine
from engine.training.precision import PrecisionTrial, wants_trial
from engine.training.tensorboard import TensorBoardLog

# step_fn(batch, progress in [0, 1]) yields (named losses, the tensor to back-propagate), one or more times
StepFn = Callable[[object, float], Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]]
MAX_SKIPPED = 5  # optimiser steps in a row whose gradients are not finite before the run is declared diverged


@dataclass
class LoopResult:
    step: int
    stopped_early: bool = False
    last_losses: dict[str, float] = field(default_factory=dict)
    out_of_time: bool = False  # the time budget ended the run before its planned last step


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (it then saves and returns)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class LoopHooks:
    """What the loop reports and writes. `validate(step, now)`, if given, runs after each optimiser step and returns
    metrics when it validated (else None): on its own schedule, and always when `now` (the last step, the step that
    fixes a time-limited run's length); the metrics go into that step's log record and progress event, before any
    checkpoint is saved. With a `budget`, the loop fixes the number of steps after the budget's probe and tells
    `planned(steps)`. `images()`, if given, returns pictures of the validation just run ({name: RGB [3, H, W]}) for
    TensorBoard, which is written beside `log_path` (rank 0 only, as the log)."""

    progress: Progress
    save: Callable[[int], Path]  # writes the checkpoint of this step, returns its path
    log_path: Path | None = None  # log.jsonl (None: not written, e.g. on ranks other than 0)
    validate: Callable[[int, bool], dict[str, float] | None] | None = None
    budget: TimeBudget | None = None
    planned: Callable[[int], None] | None = None
    images: Callable[[], dict[str, np.ndarray]] | None = None


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, batches: Iterator,
               step_fn: StepFn, device: torch.device, start_step: int, hooks: LoopHooks) -> LoopResult:
    """Optimiser steps from `start_step` to `cfg.steps` (or to what `hooks.budget` fits), under the autocast
    `cfg.amp` asks for on `device`."""
    board = TensorBoardLog.open(hooks.log_path.parent, start_step) if hooks.log_path is not None else None
    try:
        return _train_loop(model, optimizer, cfg, batches, step_fn, device, start_step, hooks, board)
    finally:
        if board is not None:
            board.close()


def _train_loop(model, optimizer, cfg: TrainConfig, batches: Iterator, step_fn: StepFn, device: torch.device,
                start_step: int, hooks: LoopHooks, board: TensorBoardLog | None) -> LoopResult:
    amp = amp_dtype(cfg.amp, device)
    trial = PrecisionTrial() if wants_trial(cfg.amp, amp, device) else None
    progress, save, log_path, budget = hooks.progress, hooks.save, hooks.log_path, hooks.budget
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    step, losses, out_of_time, skipped = start_step, {}, False, 0
    total = cfg.steps if budget is None else PROVISIONAL_STEPS
    progress.start(step)
    with StopRequest() as stop:
        while step < total:
            lr = warmup_cosine(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            step_amp = trial.dtype() if trial is not None else amp
            losses = _accumulate(model, cfg, batches, step_fn, step, total, device, step_amp, scaler)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad > 0 else None
            skip = grad_norm is not None and not scaler.is_enabled() and not torch.isfinite(grad_norm)
            if not skip:  # the fp16 grad scaler skips a non-finite step itself
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            skipped = _check_skipped(skipped + 1 if skip else 0, step)
            step += 1
            record = {"step": step, "lr": lr, "seconds": round(time.perf_counter() - t0, 4), **losses}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if skip:
                record["skipped"] = True
            if trial is not None and not trial.decided:
                record["amp"] = "bf16" if step_amp is not None else "off"
                decision = trial.record(record["seconds"])
                if decision is not None:
                    record["amp_trial"] = decision
                    progress.event("precision", step=step, **decision)
            if budget is not None:
                budget.record_step(record["seconds"])
                if step < total and budget.overdue(step):  # the machine slowed down: this step is the last
                    total, out_of_time = step, True
            planning = budget is not None and budget.plans_at(step)
            metrics, validate_s = _timed(hooks.validate, step, step == total or planning)
            planned = None
            if planning:
                planned = budget.plan(step, validate_s, _serialisation_seconds(model, optimizer))
            elif budget is not None and step < min(cfg.warmup_steps, total) and not out_of_time:
                planned = budget.replan(step)  # the pace of the first steps may not last
            if planned is not None:
                total = planned
                if hooks.planned is not None:
                    hooks.planned(total)
                record["plan"] = budget.to_dict()
                progress.plan(record["plan"])
            if metrics:
                record["metrics"] = metrics
            _append_log(log_path, record)
            if board is not None:
                board.scalars(record)
                if metrics and hooks.images is not None:
                    board.images(step, hooks.images())
            if step % cfg.log_every == 0 or step == total or metrics:
                progress.step(step, losses, metrics=metrics)
            if step % cfg.checkpoint_every == 0 or step == total or stop.requested:
                progress.checkpoint(step, save(step))
            if stop.requested:
                return LoopResult(step, True, losses)
    return LoopResult(step, False, losses, out_of_time)


def _timed(validate, step: int, now: bool) -> tuple[dict | None, float]:
    """validate(step, now) and the seconds it took (no metrics and 0 s without a validation hook)."""
    if validate is None:
        return None, 0.0
    t0 = time.perf_counter()
    metrics = validate(step, now)
    return metrics, time.perf_counter() - t0


def _serialisation_seconds(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Seconds to serialise the training state, which is most of what writing a checkpoint costs."""
    t0 = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, io.BytesIO())
    return time.perf_counter() - t0


def _accumulate(model, cfg, batches, step_fn, step, steps, device, amp, scaler) -> dict[str, float]:
    """One optimiser step's worth of micro-batches (step `step` of `steps`); returns the mean of each named loss."""
    sums: dict[str, float] = {}
    progress = step / max(1, steps)
    model.train()
    for i in range(cfg.accumulate):
        batch = next(batches)
        with _sync_gradients(model, i == cfg.accumulate - 1), autocast(device, amp):
            for named, total in step_fn(batch, progress):
                _guard(named, step)
                scaler.scale(total / cfg.accumulate).backward()
                for k, v in named.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.accumulate
    return sums


def _sync_gradients(model, last_micro_batch: bool):
    """Under DDP, all-reduce gradients only on the last micro-batch of an accumulation (`no_sync` before)."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _check_skipped(in_a_row: int, step: int) -> int:
    """A step whose gradients overflow (finite losses; seen with bf16 autocast on CPUs) is skipped, as the fp16 grad
    scaler does; MAX_SKIPPED in a row mean the run has diverged."""
    if in_a_row >= MAX_SKIPPED:
        raise TrainingDiverged(
            f"the gradients were not finite for {in_a_row} steps in a row (up to step {step + 1}); nothing was saved "
            "from these steps. Start a new run (another --out) with a lower learning rate (--set train.lr=...) or in "
            "full precision (--set train.amp=off)")
    return in_a_row


def _guard(named: dict[str, torch.Tensor], step: int) -> None:
    for name, value in named.items():
        v = float(value.detach())
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"loss '{name}' became {v} at step {step + 1}; nothing was saved from this step. Start a new run "
                "(another --out) with a lower learning rate (--set train.lr=...) or in full precision "
                "(--set train.amp=off); --resume continues from the last checkpoint with the same settings")


def trim_log(path: Path, last_step: int) -> None:
    """On resume: drop log records of steps after the checkpoint (a killed run may have logged a few more)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text("".join(line + "\n" for line in kept), path)


def _append_log(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")


