"""Progress for people and programs: a tqdm bar on a terminal, or one JSON object per line on stdout
(`--progress json`), which the Slicer module reads. Events: start, step, plan, checkpoint, done, error; `infer` adds
windows (done of windows, inside one volume). A run with a time limit (`deadline`, in time.monotonic() seconds) adds
`time_left_s` to every event and shows it on the bar."""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from engine.runtime.atomic import json_safe


class Progress:
    def __init__(self, mode: str = "bar", stage: str = "", total: int = 0, stream=None, deadline: float | None = None):
        self.mode, self.stage, self.total, self.deadline = mode, stage, total, deadline
        self.stream = stream or sys.stdout
        self._bar = None

    def time_left(self) -> float | None:
        """Seconds until the deadline (None without one)."""
        return None if self.deadline is None else round(self.deadline - time.monotonic(), 1)

    def start(self, step: int = 0, message: str = "") -> None:
        self._emit("start", step=step, message=message)
        if self.mode == "bar" and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=step, desc=self.stage, dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, losses: dict[str, float], metrics: dict[str, float] | None = None) -> None:
        self._emit("step", step=step, losses=losses, metrics=metrics)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            postfix = {k: f"{v:.4g}" for k, v in losses.items()}
            if self.deadline is not None:
                postfix["left"] = _clock(self.time_left())
            self._bar.set_postfix(postfix, refresh=False)

    def plan(self, plan: dict) -> None:
        """A time-limited run fixed its length: `plan["steps"]` becomes the total."""
        self.total = plan["steps"]
        self._emit("plan", **plan)
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def checkpoint(self, step: int, path: str) -> None:
        self._emit("checkpoint", step=step, path=str(path))

    def done(self, step: int, path: str = "", message: str = "", **extra) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        self.close()
        self._emit("done", step=step, path=str(path), message=message, **extra)

    def error(self, message: str, step: int | None = None) -> None:
        self.close()
        self._emit("error", step=step, message=message)

    def event(self, name: str, **fields) -> None:
        self._emit(name, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _emit(self, event: str, **fields: Any) -> None:
        if self.mode != "json":
            return
        record = {"event": event, "stage": self.stage, "total": self.total}
        if self.deadline is not None:
            record["time_left_s"] = self.time_left()
        record.update({k: _finite(v) for k, v in fields.items() if v is not None and v != ""})
        self.stream.write(json.dumps(json_safe(record)) + "\n")
        self.stream.flush()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _clock(seconds: float) -> str:
    """m:ss, with a minus sign past the deadline."""
    sign, seconds = ("-" if seconds < 0 else ""), abs(int(seconds))
    return f"{sign}{seconds // 60}:{seconds % 60:02d}"
