"""progress.png of a run folder, drawn from its log.jsonl: the losses, the learning rate and the validation scores
over the steps (one panel each; the validation panel only when the run validates)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from engine.runtime.atomic import write_atomic  # noqa: E402

log = logging.getLogger(__name__)
PLOT = "progress.png"
NOT_LOSSES = {"step", "lr", "seconds", "grad_norm", "metrics"}


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl, in order (a line cut short by a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def series(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{"losses": {name: (steps, values)}, "lr": {...}, "validation": {metric: (steps, values)}}; None values
    (non-finite numbers in the log) are left out."""
    panels: dict[str, dict] = {"losses": {}, "lr": {}, "validation": {}}
    for record in records:
        step = record["step"]
        values = {("losses", k): v for k, v in record.items() if k not in NOT_LOSSES}
        values[("lr", "learning rate")] = record.get("lr")
        values.update({("validation", k): v for k, v in (record.get("metrics") or {}).items() if k != "val_cases"})
        for (panel, name), value in values.items():
            if isinstance(value, (int, float)):
                steps, ys = panels[panel].setdefault(name, ([], []))
                steps.append(step)
                ys.append(float(value))
    return panels


def plot_progress(run_folder: Path) -> Path | None:
    """Write run_folder/progress.png from run_folder/log.jsonl; None when there is nothing to draw yet."""
    log_path = Path(run_folder) / "log.jsonl"
    if not log_path.is_file():
        return None
    panels = {name: lines for name, lines in series(read_log(log_path)).items() if lines}
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, lines) in zip(axes[:, 0], panels.items()):
        for label, (steps, ys) in lines.items():
            ax.plot(steps, ys, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ys = [y for _, values in lines.values() for y in values]
        if name == "losses" and min(ys) > 0 and max(ys) > 20 * min(ys):  # losses spanning decades
            ax.set_yscale("log")
        if name == "validation" or len(lines) > 1:
            ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(run_folder).name, fontsize=9)
    fig.tight_layout()
    path = write_atomic(Path(run_folder) / PLOT, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path


def try_plot_progress(run_folder: Path) -> None:
    """plot_progress, never stopping a run: a failure to draw is logged as a warning."""
    try:
        plot_progress(run_folder)
    except Exception as err:  # a plot is a by-product; the checkpoint beside it is what matters
        log.warning("progress.png not drawn: %s", err)
