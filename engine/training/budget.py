"""A wall-clock budget for a training run (`--time-limit`): the run's length is fixed from measured time.

The first `probe` optimiser steps lie in the linear warm-up, where the learning rate does not depend on the total
yet. They are timed, then one validation and the writing of a checkpoint are timed, and the total is fixed so that
the remaining steps, the validations and checkpoints they bring and the last ones fit in what is left of the budget
(the time spent reading the data counts: the clock starts with the run). Until the warm-up ends the total is
fixed again each step from the latest steps' pace (`replan`), where that moves it by more than REPLAN_CHANGE: the
first steps can be slow for reasons that pass (other work on the cores, caches filling), and a total fixed from
them alone would leave most of the budget unused. Should the machine slow down later, `overdue` ends the run at the
step after which one more would not fit, so the budget holds either way."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from engine.runtime import distributed

PROBE_STEPS = 5  # timed before the length is fixed; the first is left out of the step time (one-off costs)
PROVISIONAL_STEPS = 10**6  # the schedule's total while probing: warm-up only, so any large number does
REPLAN_CHANGE = 0.05  # within the warm-up, a new total is taken when it differs from the current one by more


@dataclass
class TimeBudget:
    """`seconds` from `started` (time.monotonic()); validations every `validate_every` steps (None: none) and
    checkpoints every `checkpoint_every` steps, each also after the last step."""

    seconds: float
    started: float
    validate_every: int | None = None
    checkpoint_every: int = 100
    probe: int = PROBE_STEPS
    step_times: list[float] = field(default_factory=list)
    validate_s: float = 0.0
    save_s: float = 0.0
    steps: int | None = None  # the total, once fixed
    planned_step_s: float = 0.0  # the step time the total was fixed with
    startup_s: float | None = None  # from the start to the first step (reading the data, building the model)

    @classmethod
    def minutes(cls, minutes: float, started: float, warmup_steps: int, validate_every: int | None,
                checkpoint_every: int) -> "TimeBudget":
        """A budget whose probe stays inside the warm-up (at least 2 steps, so that one is timed without the first
        step's one-off costs)."""
        probe = max(2, min(PROBE_STEPS, warmup_steps))
        return cls(minutes * 60.0, started, validate_every, checkpoint_every, probe)

    @property
    def margin(self) -> float:
        """Seconds kept back for noise in the step time: 3% of the budget, at least 2 s."""
        return max(2.0, 0.03 * self.seconds)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    @property
    def step_s(self) -> float:
        """Seconds per step: the median of the latest `probe` steps after the first (the first alone if that is
        all). A median, and the latest steps, so that a few slow steps (another program's burst, the loader's
        first reads) do not set the pace of the whole run."""
        timed = (self.step_times[1:] or self.step_times)[-self.probe:]
        return statistics.median(timed) if timed else 0.0

    def record_step(self, seconds: float) -> None:
        if not self.step_times:
            self.startup_s = self.seconds - self.left() - seconds
        self.step_times.append(seconds)

    def plans_at(self, step: int) -> bool:
        """True at the step after which the total is fixed."""
        return self.steps is None and step >= self.probe

    def plan(self, step: int, validate_s: float, save_s: float) -> int:
        """Fix the total: the most steps whose remaining cost fits in what is left (every rank agrees on it)."""
        self.validate_s, self.save_s, self.planned_step_s = validate_s, save_s, self.step_s
        room = self.left() - self.margin - self.validate_s - self.save_s  # the last validation and checkpoint
        total = step + max(0, int(room / self._cost_per_step()))
        while total > step and self._cost(step, total) > room:
            total -= 1
        self.steps = distributed.min_over_ranks(total)
        return self.steps

    def replan(self, step: int) -> int | None:
        """Within the warm-up (where the learning rate does not depend on the total), fix the total again at the
        latest pace; returns the new total when it moved by more than REPLAN_CHANGE, else None (the same on every
        rank)."""
        if self.steps is None:
            return None
        previous = self.steps
        self.steps = None
        total = self.plan(step, self.validate_s, self.save_s)
        if total <= step or abs(total - previous) <= REPLAN_CHANGE * previous:  # out of time: `overdue` ends it
            self.steps = previous
            return None
        return total

    def overdue(self, step: int) -> bool:
        """True when one more step, then the last validation and checkpoint, would not fit (agreed by all ranks).
        Costs are taken at the pace of the latest step where that is slower than the planned one: when other work
        takes the cores, a step can take ten times as long, and the last validation with it."""
        if self.steps is None:
            return False
        pace = self.planned_step_s or self.step_s
        slowdown = max(1.0, self.step_times[-1] / pace) if pace > 0 else 1.0
        needed = (pace + self.validate_s + self.save_s) * slowdown + self.margin / 2
        return distributed.any_rank(self.left() < needed)

    def _cost_per_step(self) -> float:
        per_step = self.step_s
        if self.validate_every:
            per_step += self.validate_s / self.validate_every
        return max(per_step + self.save_s / self.checkpoint_every, 1e-6)

    def _cost(self, step: int, total: int) -> float:
        """Seconds from after `step` to before the last step's validation and checkpoint of a run of `total`."""
        def between(every: int | None) -> int:  # multiples of `every` in (step, total)
            return 0 if not every else (total - 1) // every - step // every
        return ((total - step) * self.step_s + between(self.validate_every) * self.validate_s
                + between(self.checkpoint_every) * self.save_s)

    def to_dict(self) -> dict:
        """What the run records about its plan."""
        return {"time_limit_s": round(self.seconds, 1), "steps": self.steps, "step_s": round(self.step_s, 3),
                "validate_s": round(self.validate_s, 2), "save_s": round(self.save_s, 3),
                "startup_s": round(self.startup_s or 0.0, 1), "time_left_s": round(self.left(), 1)}
