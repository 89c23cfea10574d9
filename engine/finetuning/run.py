"""Fine-tuning (segmentation or classification): `run_finetune` reads like its table of contents.

A run folder holds config.yaml, cases.json (which cases trained and validated, and why), weights.json (the
pre-trained key report), log.jsonl, checkpoint.pt (latest training state, for --resume) and model.pt (the best
model by validation: self-contained for inference)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from engine.config.finetune import (
    TASKS,
    FinetuneConfig,
    build_finetune_config,
    finetune_config_from_dict,
)
from engine.config.schema import check_choice
from engine.data.labelled import (
    CaseSelection,
    load_classification_dataset,
    load_dataset,
    select_cases,
    write_json_atomic,
)
from engine.errors import UserError
from engine.finetuning.classification import ClassificationTask
from engine.finetuning.data import steps_per_epoch
from engine.finetuning.preflight import check_finetune
from engine.finetuning.segmentation import SegmentationTask
from engine.finetuning.weights import (
    PretrainedWeights,
    load_pretrained,
    read_pretrained,
)
from engine.runtime import distributed
from engine.runtime.checkpoint import load_checkpoint, save_checkpoint, unwrap
from engine.runtime.device import amp_dtype
from engine.runtime.progress import Progress
from engine.training.loop import train_loop
from engine.training.optim import build_optimizer

log = logging.getLogger(__name__)
CHECKPOINT, MODEL = "checkpoint.pt", "model.pt"
TASK_TYPES = {"segmentation": SegmentationTask, "classification": ClassificationTask}


@dataclass
class FinetuneResult:
    step: int
    model_path: Path
    best: dict
    stopped_early: bool = False


def run_finetune(data: str, out: str, task: str = "segmentation", pretrained: str | None = None,
                 preset: str = "tiny", steps: int | None = None, epochs: int | None = None,
                 freeze_encoder: bool = False, fold: int | None = None, train_cases: int | None = None,
                 seed: int = 0, resume: bool = False, progress: str = "bar", device: str = "auto",
                 overrides: dict | None = None, check_memory: bool = True) -> FinetuneResult:
    """Fine-tune alone or as one of torchrun's processes (DDP); only rank 0 reports and writes. Unless
    `check_memory` is False, a run whose estimated peak memory does not fit is refused before its run folder."""
    info, dev = distributed.setup(device)
    try:
        return _finetune(info, dev, data, Path(out), task, pretrained, preset, steps, epochs, freeze_encoder, fold,
                         train_cases, seed, resume, progress, overrides, check_memory)
    finally:
        distributed.teardown()


def _finetune(info, dev, data, out_dir: Path, task, pretrained, preset, steps, epochs, freeze_encoder, fold,
              train_cases, seed, resume, progress, overrides, check_memory) -> FinetuneResult:
    ckpt = _resume_state(out_dir, task) if resume else None
    dataset = _load_data(task, data)
    cases = _cases(ckpt, dataset, fold, train_cases, seed)
    weights = _pretrained(pretrained) if ckpt is None else None
    cfg = _resolve_config(ckpt, preset, task, weights, freeze_encoder, seed, overrides)
    cfg = _with_length(cfg, len(cases.training), steps, epochs)
    job = TASK_TYPES[task](cfg, dataset, cases)
    job.shard = (info.rank, info.world_size)
    job.check_data()
    if check_memory:
        estimate = check_finetune(job, dev, resume)
        log.info("memory: about %s predicted", estimate.describe())
    if info.is_main:
        _prepare_run_dir(out_dir, cfg, cases, resume)
    distributed.barrier()
    set_determinism(seed=cfg.train.seed + 7919 * info.rank + (int(ckpt["step"]) if ckpt else 0))
    model = _build_model(job, weights, out_dir if info.is_main else None)
    return _train(job, model, ckpt, out_dir, dev, progress, info)


def _build_model(job, weights: PretrainedWeights | None, out_dir: Path | None) -> nn.Module:
    model = job.build_model()
    if weights is not None:
        report = load_pretrained(model, weights)
        log.info("%s", report.summary())
        if out_dir is not None:
            write_json_atomic(report.to_dict(), out_dir / "weights.json")
    if job.cfg.freeze_encoder:
        freeze(model)
    return model


def _train(job, model: nn.Module, ckpt: dict | None, out_dir: Path, device: torch.device,
           progress: str, info: distributed.DistInfo) -> FinetuneResult:
    cfg, cases = job.cfg, job.cases
    model = model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    best = _restore(ckpt, model, optimizer)
    if info.enabled:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    start, amp = int(ckpt["step"]) if ckpt else 0, amp_dtype(cfg.train.amp, device)
    reporter = Progress(progress if info.is_main else "none", stage="finetune", total=cfg.train.steps)
    log.info("fine-tuning %s (%s preset) on %d case(s), validating on %d, on %s, %d process(es)", job.kind,
             cfg.preset, len(cases.training), len(cases.validation), device, info.world_size)

    def save(step: int) -> Path:
        if info.is_main:
            save_checkpoint(out_dir / CHECKPOINT, kind=f"finetune-{job.kind}", config=cfg.to_dict(), model=model,
                            step=step, optimizer=optimizer, extra={"best": best, "cases": cases.to_dict()})
        return out_dir / CHECKPOINT

    result = train_loop(model, optimizer, cfg.train, job.batches(start), job.step_fn(model, device), device=device,
                        amp=amp, start_step=start, progress=reporter, save=save,
                        log_path=out_dir / "log.jsonl" if info.is_main else None,
                        validate=_validator(job, model, device, amp, best, out_dir if info.is_main else None))
    if info.is_main and not (out_dir / MODEL).exists():  # no finite validation score yet: keep the latest weights
        _save_model(out_dir, job, model, result.step, {})
    message = "stopped early, resume with --resume" if result.stopped_early else ""
    reporter.done(result.step, out_dir / MODEL, message=message, best=best, processes=info.world_size,
                  ranks_in_sync=distributed.parameters_in_sync(model))
    return FinetuneResult(result.step, out_dir / MODEL, best, result.stopped_early)


def _load_data(task: str, data: str):
    check_choice("task", task, TASKS)
    return load_classification_dataset(data) if task == "classification" else load_dataset(data)


def _cases(ckpt: dict | None, dataset, fold, train_cases, seed) -> CaseSelection:
    if ckpt is None:
        return select_cases(dataset, fold, train_cases, seed)
    saved = ckpt["cases"]
    return CaseSelection(saved["training"], saved["validation"], saved["fold"], saved["train_cases"], saved["seed"],
                         saved.get("note", ""))


def _pretrained(pretrained: str | None) -> PretrainedWeights | None:
    if pretrained is None or str(pretrained).lower() == "none":
        return None
    return read_pretrained(pretrained)


def _resolve_config(ckpt, preset, task, weights, freeze_encoder, seed, overrides) -> FinetuneConfig:
    extra = dict(overrides or {})
    if ckpt is not None:
        if any(k != "train.steps" for k in extra) or freeze_encoder:
            raise UserError("--resume keeps the saved settings; only --steps / --epochs may change")
        return finetune_config_from_dict(ckpt["config"]).validate()
    extra.setdefault("train.seed", seed)
    if freeze_encoder:
        extra["freeze_encoder"] = True
    if weights is not None:
        extra.setdefault("model.backbone", weights.backbone)
        if weights.feature_size is not None:
            extra["model.feature_size"] = weights.feature_size
    return build_finetune_config(preset, task, weights.encoder if weights else None, extra)


def _with_length(cfg: FinetuneConfig, n_training: int, steps: int | None, epochs: int | None) -> FinetuneConfig:
    """--steps N, or --epochs N (one epoch = every training case once), else the preset's length."""
    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    if epochs is not None:
        steps = epochs * steps_per_epoch(n_training, cfg.data.batch_size)
    if steps is None:
        return cfg
    tree = cfg.to_dict()
    tree["train"]["steps"] = steps
    return finetune_config_from_dict(tree).validate()


def _resume_state(out_dir: Path, task: str) -> dict:
    path = out_dir / CHECKPOINT
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist; start without --resume")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != f"finetune-{task}":
        raise UserError(f"--resume: {path} is a '{ckpt.get('kind')}' run, not finetune-{task}")
    return ckpt


def _prepare_run_dir(out_dir: Path, cfg: FinetuneConfig, cases: CaseSelection, resume: bool) -> None:
    if not resume and (out_dir / CHECKPOINT).exists():
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json_atomic(cases.to_dict(), out_dir / "cases.json")
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write the run folder ({err.strerror})") from None
    if cases.note:
        log.warning(cases.note)


def _restore(ckpt, model, optimizer) -> dict:
    if ckpt is None:
        return {"score": None, "step": None, "metrics": {}}
    unwrap(model).load_state_dict(ckpt["model"])
    if ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("torch_rng") is not None:
        torch.set_rng_state(ckpt["torch_rng"])
    return dict(ckpt.get("best") or {"score": None, "step": None, "metrics": {}})


def _validator(job, model: nn.Module, device, amp, best: dict, out_dir: Path | None):
    """Validation every `val.every` steps and after the last; a better score rewrites model.pt (atomically)."""
    cfg = job.cfg

    def validate(step: int) -> dict | None:
        if step % cfg.val.every and step != cfg.train.steps:
            return None
        metrics = job.validate(unwrap(model), device, amp)
        score = job.score(metrics)
        if math.isfinite(score) and (best["score"] is None or score > best["score"]):
            best.update(score=score, step=step, metrics=metrics)
            if out_dir is not None:  # rank 0 writes; every rank validates the same weights alike
                _save_model(out_dir, job, model, step, metrics)
        return metrics
    return validate


def _save_model(out_dir: Path, job, model: nn.Module, step: int, metrics: dict) -> Path:
    """model.pt: format tag, kind, config, weights, and everything inference needs (labels, grid, window)."""
    extra = {**job.model_extra(), "metrics": dict(metrics)}
    return save_checkpoint(out_dir / MODEL, kind=job.kind, config=job.cfg.to_dict(), model=model, step=step,
                           extra=extra)
from engine.finetuning.weights import freeze
