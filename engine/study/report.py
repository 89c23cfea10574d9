"""What the study publishes: results.csv (one row per run), label_efficiency.png (test Dice vs labelled cases, one
line per initialisation, every seed shown and the min-max band), and results_table.md (mean +- sd over seeds, the
paired differences to the scratch arm, and how well the runs fit their own training cases)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLOURS = {"mim": "#d62728", "mae": "#1f77b4", "scratch": "#7f7f7f"}
NAMES = {"mim": "MiM pre-trained", "mae": "MAE pre-trained", "scratch": "from scratch"}
CSV_HEAD = ["init", "n_cases", "seed", "train_cases", "test_cases", "label", "mean_dice"]
CSV_TAIL = ["train_dice", "finetune_steps", "pretrain_steps", "train_seconds", "seconds", "run"]


def write_csv(rows: list[dict], path: Path) -> Path:
    """One row per run; Dice of each test case in its own column (dice_<case>); case lists joined by ';'."""
    test_cases = list(rows[0]["dice"]) if rows else []
    columns = CSV_HEAD + [f"dice_{case}" for case in test_cases] + CSV_TAIL
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            flat = {key: row[key] for key in CSV_HEAD + CSV_TAIL}
            flat.update({f"dice_{case}": row["dice"][case] for case in test_cases})
            flat["train_cases"], flat["test_cases"] = ";".join(row["train_cases"]), ";".join(row["test_cases"])
            writer.writerow(flat)
    return path


def by_arm(rows: list[dict], key: str = "mean_dice") -> dict[str, dict[int, list[float]]]:
    """init -> labelled cases -> row[key] (test Dice by default) of each seed (finite values only), in run order."""
    arms: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        values = arms.setdefault(row["init"], {}).setdefault(row["n_cases"], [])
        value = row.get(key)
        if value is not None and math.isfinite(value):
            values.append(value)
    return arms


def write_plot(rows: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    arms = by_arm(rows)
    counts = sorted({n for arm in arms.values() for n in arm})
    for k, (init, arm) in enumerate(arms.items()):
        _draw_arm(ax, init, arm, offset=(k - (len(arms) - 1) / 2) * 0.04)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean Dice over the held-out test cases")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.text(0.99, 0.98, "line: mean over seeds\nband: min–max over seeds\ndots: each seed", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="#444444")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _draw_arm(ax, init: str, arm: dict[int, list[float]], offset: float) -> None:
    """Mean over seeds (line), min-max over seeds (band), each seed (dot); slightly offset so arms do not hide."""
    counts = [n for n in sorted(arm) if arm[n]]
    if not counts:
        return
    x = np.array(counts, dtype=float) * 2.0 ** offset
    colour = COLOURS.get(init, None)
    means = [np.mean(arm[n]) for n in counts]
    ax.plot(x, means, "-o", color=colour, label=NAMES.get(init, init))
    ax.fill_between(x, [min(arm[n]) for n in counts], [max(arm[n]) for n in counts], color=colour, alpha=0.15)
    for xi, n in zip(x, counts):
        ax.scatter([xi] * len(arm[n]), arm[n], s=12, color=colour, alpha=0.6, zorder=3)


def markdown_table(rows: list[dict]) -> str:
    """Three tables, initialisations x labelled cases: test Dice (mean +- sd over seeds and the seeds' range); the
    paired difference to scratch (same cases and seed, so the case draw cancels); train_dice (the fit)."""
    sections = [("Test Dice (mean over the test cases), mean ± sd over seeds (range, number of seeds)",
                 _grid(by_arm(rows), _cell))]
    paired = paired_differences(rows)
    if paired:
        sections.append(("Paired difference in test Dice to the scratch arm (same training cases and seed): "
                         "mean over seeds (range; seeds where the pre-trained arm is higher)", _grid(paired, _diff_cell)))
    sections.append(("Dice on the run's own training cases after the last step (`train_dice`: the fit), mean ± sd "
                     "over seeds", _grid(by_arm(rows, "train_dice"), _cell)))
    return "\n".join(f"**{title}**\n\n{table}" for title, table in sections)


def paired_differences(rows: list[dict], reference: str = "scratch") -> dict[str, dict[int, list[float]]]:
    """init -> labelled cases -> [Dice(init) - Dice(reference)] for each (cases, seed) both arms finished."""
    ref = {(r["n_cases"], r["seed"]): r["mean_dice"] for r in rows if r["init"] == reference}
    out: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        base = ref.get((row["n_cases"], row["seed"]))
        if row["init"] == reference or base is None or not (math.isfinite(row["mean_dice"]) and math.isfinite(base)):
            continue
        out.setdefault(row["init"], {}).setdefault(row["n_cases"], []).append(row["mean_dice"] - base)
    return out


def _grid(arms: dict[str, dict[int, list[float]]], cell) -> str:
    counts = sorted({n for arm in arms.values() for n in arm})
    lines = ["| initialisation | " + " | ".join(f"{n} case{'s' * (n > 1)}" for n in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for init, arm in arms.items():
        lines.append(f"| {NAMES.get(init, init)} | " + " | ".join(cell(arm.get(n, [])) for n in counts) + " |")
    return "\n".join(lines) + "\n"


def _diff_cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    higher = sum(v > 0 for v in values)
    return f"{np.mean(values):+.3f} ({min(values):+.3f} to {max(values):+.3f}; {higher}/{len(values)})"


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{sd} ({min(values):.3f}–{max(values):.3f}, n={len(values)})"
