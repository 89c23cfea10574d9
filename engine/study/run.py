"""`python -m engine study label-efficiency --config FILE`: does pre-training help when labels are few?

Pre-train each method (MiM, MAE) once on the unlabelled volumes, then fine-tune segmentation from each
pre-trained encoder and from scratch with 1, 2, 4 labelled cases and several seeds, always with the same steps,
and score the last weights by Dice on test cases that no run ever trains on. Everything lands in one study folder:
study.yaml, data/ (derived labels, dataset.json, pretrain.json), pretrain/<method>/, runs/<run>/, results.csv,
label_efficiency.png, results_table.md and summary.json. Rerunning the same command continues an interrupted
study: finished runs are skipped, an interrupted one resumes from its checkpoint."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from engine.runtime.atomic import write_json
from engine.runtime.progress import Progress
from engine.study.config import StudyConfig, load_study_config, save_study_config
from engine.study.data import StudyData, prepare_data
from engine.study.report import markdown_table, write_csv, write_plot
from engine.study.runs import DONE, RunSpec, finetune_and_test, plan_runs, pretrain_once

CSV, PLOT, TABLE, SUMMARY = "results.csv", "label_efficiency.png", "results_table.md", "summary.json"


def run_label_efficiency(config: str, out: str | None = None, device: str = "auto", progress: str = "bar",
                         overrides: dict | None = None) -> dict:
    """Run (or continue) the study described by `config`; returns summary.json's content."""
    t0 = time.perf_counter()
    cfg = load_study_config(config, overrides)
    out_dir = Path(out or cfg.out)
    save_study_config(cfg, out_dir)
    data = prepare_data(cfg, out_dir / "data")
    checkpoints = {method: pretrain_once(method, cfg, data, out_dir / "pretrain" / method, device, progress)
                   for method in cfg.pretrain_methods}
    runs = plan_runs(cfg)
    rows = []
    for number, spec in enumerate(runs, 1):
        rows.append(finetune_and_test(spec, cfg, data, checkpoints, out_dir / "runs" / spec.name, device, progress))
        _announce(progress, number, len(runs), spec, rows[-1])
    return _publish(rows, cfg, data, out_dir, time.perf_counter() - t0)


def _announce(progress: str, number: int, total: int, spec: RunSpec, row: dict) -> None:
    if progress == "json":
        Progress("json", stage="study", total=total).event("run", step=number, row=row)
    elif progress == "bar":
        print(f"[{number:>2}/{total}] {spec.init:<7} {spec.n_cases} case(s) seed {spec.seed}: test Dice "
              f"{row['mean_dice']:.3f}  ({', '.join(row['train_cases'])})", file=sys.stderr, flush=True)


def _publish(rows: list[dict], cfg: StudyConfig, data: StudyData, out_dir: Path, wall: float) -> dict:
    write_csv(rows, out_dir / CSV)
    write_plot(rows, out_dir / PLOT, _plot_title(cfg, data))
    (out_dir / TABLE).write_text(markdown_table(rows), encoding="utf-8")
    summary = {"study": cfg.study, "out": str(out_dir), "csv": str(out_dir / CSV), "plot": str(out_dir / PLOT),
               "table": str(out_dir / TABLE), "runs": len(rows), "test_cases": [c["name"] for c in data.test],
               "training_pool": [c["name"] for c in data.pool], "pretrain": _pretrain_times(cfg, out_dir),
               "finetune_seconds": round(sum(r["seconds"] for r in rows), 1),
               "wall_seconds_this_call": round(wall, 1), "machine": _machine()}
    write_json(summary, out_dir / SUMMARY)
    return summary


def _plot_title(cfg: StudyConfig, data: StudyData) -> str:
    return (f"{cfg.task.label} Dice on {len(data.test)} held-out case(s) ({', '.join(c['name'] for c in data.test)})"
            f"\npre-training {cfg.pretrain.steps} steps ({cfg.pretrain.preset}), fine-tuning {cfg.finetune.steps} "
            f"steps ({cfg.finetune.preset}), {len(cfg.seeds)} seed(s)")


def _pretrain_times(cfg: StudyConfig, out_dir: Path) -> dict:
    return {method: json.loads((out_dir / "pretrain" / method / DONE).read_text())
            for method in cfg.pretrain_methods}


def _machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
