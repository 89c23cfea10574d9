"""The study's runs, each in its own folder and resumable: one pre-training per method (STUDY/pretrain/<method>,
shared by every fine-tuning run from it), and one fine-tune -> segment the test cases -> Dice per (initialisation,
labelled cases, seed) (STUDY/runs/<init>_n<cases>_seed<seed>). A finished run leaves done.json / result.json and
is skipped by a rerun; an interrupted one continues from its checkpoint."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.finetuning.run import FinetuneRequest, run_finetune
from engine.inference.evaluate import run_evaluate
from engine.inference.run import InferRequest, run_infer
from engine.pretraining.run import PretrainRequest, run_pretrain
from engine.runtime.atomic import write_json
from engine.study.config import StudyConfig
from engine.study.data import StudyData, check_held_out
from engine.training.run_folder import CHECKPOINT

DONE, RESULT = "done.json", "result.json"


@dataclass(frozen=True)
class RunSpec:
    init: str  # mim | mae | scratch
    n_cases: int
    seed: int  # draws the training cases, and seeds the initial head/decoder weights, crops and augmentation

    @property
    def name(self) -> str:
        return f"{self.init}_n{self.n_cases}_seed{self.seed}"


def plan_runs(cfg: StudyConfig) -> list[RunSpec]:
    """Cases, then seed, then initialisation: an interrupted study holds complete, paired comparisons."""
    return [RunSpec(init, n, seed) for n in cfg.train_cases for seed in cfg.seeds for init in cfg.inits]


def pretrain_once(method: str, cfg: StudyConfig, data: StudyData, run_dir: Path, device: str, progress: str) -> Path:
    """Pre-train `method` on the unlabelled volumes for pretrain.steps steps (or reuse the finished run)."""
    checkpoint = run_dir / CHECKPOINT
    if (run_dir / DONE).exists():
        return checkpoint
    t0 = time.perf_counter()
    resume = checkpoint.exists()
    request = PretrainRequest(str(data.pretrain), str(run_dir), method=method, preset=cfg.pretrain.preset,
                              steps=cfg.pretrain.steps, resume=resume, seed=cfg.pretrain.seed, progress=progress,
                              device=device, overrides=None if resume else dict(cfg.pretrain.overrides))
    result = run_pretrain(request)
    if result.stopped_early:
        raise KeyboardInterrupt
    write_json({"method": method, "steps": result.step, "seconds": round(time.perf_counter() - t0, 1),
                       "train_seconds": logged_seconds(run_dir), "resumed": resume}, run_dir / DONE)
    return checkpoint


def finetune_and_test(spec: RunSpec, cfg: StudyConfig, data: StudyData, checkpoints: dict[str, Path], run_dir: Path,
                      device: str, progress: str) -> dict:
    """One row of the study: fine-tune on spec.n_cases pool cases, segment every test case, Dice against its label."""
    if (run_dir / RESULT).exists():
        return json.loads((run_dir / RESULT).read_text())
    t0 = time.perf_counter()
    result = _finetune(spec, cfg, data, checkpoints.get(spec.init), run_dir / "finetune", device, progress)
    cases = json.loads((run_dir / "finetune" / "cases.json").read_text())
    check_held_out(cases["training"] + cases["validation"], data.test)
    dice = {case["name"]: _test_dice(result.model_path, case, data, run_dir / "predictions", cfg, device)
            for case in data.test}
    row = {"init": spec.init, "n_cases": spec.n_cases, "seed": spec.seed,
           "train_cases": [case["name"] for case in cases["training"]], "test_cases": list(dice),
           "label": cfg.task.label, "mean_dice": _mean(dice.values()), "dice": dice,
           "train_dice": result.best.get("metrics", {}).get("val_mean_dice"), "finetune_steps": result.step,
           "pretrain_steps": cfg.pretrain.steps if spec.init != "scratch" else 0,
           "train_seconds": logged_seconds(run_dir / "finetune"), "seconds": round(time.perf_counter() - t0, 1),
           "run": run_dir.name}
    write_json(row, run_dir / RESULT)
    return row


def _finetune(spec: RunSpec, cfg: StudyConfig, data: StudyData, checkpoint: Path | None, out: Path, device: str,
              progress: str):
    """Fixed length, validated only after the last step (on its own training cases: every other case is a test
    case), so model.pt holds the last weights and no arm gets a model selection the others lack. That validation
    is a readout of the fit (train_dice), so it runs without window overlap to stay cheap."""
    resume = (out / CHECKPOINT).exists()
    overrides = None if resume else {**cfg.finetune.overrides, "val.every": cfg.finetune.steps, "val.overlap": 0.0}
    request = FinetuneRequest(str(data.dataset), str(out), task="segmentation",
                              pretrained=str(checkpoint) if checkpoint else None, preset=cfg.finetune.preset,
                              steps=cfg.finetune.steps, train_cases=spec.n_cases, seed=spec.seed, resume=resume,
                              progress=progress, device=device, overrides=overrides)
    result = run_finetune(request)
    if result.stopped_early:
        raise KeyboardInterrupt
    return result


def _test_dice(model: Path, case: dict, data: StudyData, folder: Path, cfg: StudyConfig, device: str) -> float:
    """Segment one test case on its own grid with the engine's inference, then the engine's Dice."""
    prediction = folder / f"{case['name']}_seg.nii.gz"
    request = InferRequest(str(model), case["image"], str(prediction), device=device, overlap=cfg.evaluate.overlap,
                           progress="none")
    run_infer(request)
    scores = run_evaluate(str(prediction), case["label"], labels=str(data.dataset))
    dice = next(iter(scores["cases"].values()))[cfg.task.label]["dice"]
    return float("nan") if dice is None else round(float(dice), 6)


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return round(float(np.mean(finite)), 6) if finite else float("nan")


def logged_seconds(run_dir: Path) -> float:
    """Sum of the per-step times in log.jsonl: training compute only, and correct across resumes."""
    log = run_dir / "log.jsonl"
    if not log.exists():
        return 0.0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return round(sum(r.get("seconds", 0.0) for r in records), 1)
