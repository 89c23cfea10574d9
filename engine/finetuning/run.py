"""Fine-tuning (segmentation or classification): `run_finetune` reads like its table of contents.

A run folder holds config.yaml, cases.json (which cases trained and validated, and why), weights.json (the
pre-trained key report), log.jsonl, checkpoint.pt (latest training state, for --resume) and model.pt (the best
model by validation: self-contained for inference)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from engine.config.finetune import (
    DEFAULT_PRESET,
    TASKS,
    FinetuneConfig,
    build_finetune_config,
    finetune_config_from_dict,
)
from engine.config.schema import check_choice
from engine.data.labelled import CaseSelection, load_classification_dataset, load_dataset, select_cases
from engine.errors import UserError
from engine.finetuning.classification import ClassificationTask
from engine.finetuning.data import steps_per_epoch
from engine.finetuning.preflight import check_finetune
from engine.finetuning.segmentation import SegmentationTask
from engine.finetuning.weights import PretrainedWeights, freeze, load_pretrained, read_pretrained
from engine.runtime import distributed
from engine.runtime.atomic import write_json
from engine.runtime.checkpoint import save_checkpoint, unwrap
from engine.runtime.device import amp_dtype
from engine.runtime.progress import Progress
from engine.training.budget import TimeBudget
from engine.training.loop import LoopHooks, train_loop
from engine.training.optim import build_optimizer
from engine.training.run_folder import RunFolder

log = logging.getLogger(__name__)
MODEL = "model.pt"
TASK_TYPES = {"segmentation": SegmentationTask, "classification": ClassificationTask}


@dataclass(frozen=True)
class FinetuneRequest:
    """What `engine finetune` is asked to do (the CLI's options, as a Python API)."""

    data: str  # dataset.json (segmentation) or a classification CSV/JSON
    out: str  # the run folder
    task: str = "segmentation"
    pretrained: str | None = None  # a checkpoint of ours, the authors' MiM, SwinUNETR weights; None: from scratch
    preset: str = DEFAULT_PRESET
    steps: int | None = None  # --steps, or
    epochs: int | None = None  # --epochs (every training case once per epoch), or
    time_limit: float | None = None  # --time-limit: minutes for the whole run; none of them: the preset's length
    freeze_encoder: bool = False
    fold: int | None = None
    train_cases: int | None = None
    seed: int = 0
    resume: bool = False
    progress: str = "bar"
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # dotted settings (--set)
    check_memory: bool = True  # refuse a run whose estimated peak memory does not fit, before its run folder


@dataclass
class FinetuneResult:
    step: int
    model_path: Path
    best: dict
    stopped_early: bool = False
    out_of_time: bool = False  # the time limit ended the run before the steps it planned


def run_finetune(request: FinetuneRequest) -> FinetuneResult:
    """Fine-tune alone or as one of torchrun's processes (DDP); only rank 0 reports and writes."""
    started = time.monotonic()  # a time limit counts from here: reading the data is part of the run
    info, dev = distributed.setup(request.device)
    try:
        return _finetune(request, info, dev, started)
    finally:
        distributed.teardown()


def _finetune(request: FinetuneRequest, info: distributed.DistInfo, dev: torch.device,
              started: float) -> FinetuneResult:
    check_choice("task", request.task, TASKS)
    folder = RunFolder.open(request.out, f"finetune-{request.task}", info, request.resume)
    dataset = _load_data(request.task, request.data)
    cases = _cases(folder.resumed, dataset, request)
    weights = _pretrained(request.pretrained) if folder.resumed is None else None
    cfg = _resolve_config(folder.resumed, request, weights)
    cfg = _with_length(cfg, len(cases.training), request, folder.resumed is not None)
    job = TASK_TYPES[request.task](cfg, dataset, cases)
    job.shard = info
    job.check_data()
    if request.check_memory:
        estimate = check_finetune(job, dev, request.resume)
        log.info("memory: about %s predicted", estimate.describe())
    folder.prepare(cfg.to_dict(), {"cases.json": cases.to_dict()})
    if cases.note and info.is_main:
        log.warning(cases.note)
    folder.seed(cfg.train.seed)
    model = _build_model(job, weights, folder)
    budget = _budget(job.cfg, started) if folder.resumed is None else None  # a resumed run keeps its steps
    return _train(job, model, folder, dev, request.progress, budget)


def _build_model(job, weights: PretrainedWeights | None, folder: RunFolder) -> nn.Module:
    model = job.build_model()
    if weights is not None:
        report = load_pretrained(model, weights)
        log.info("%s", report.summary())
        if folder.info.is_main:
            write_json(report.to_dict(), folder.path / "weights.json")
    if job.cfg.freeze_encoder:
        freeze(model)
    return model


def _train(job, model: nn.Module, folder: RunFolder, device: torch.device, progress: str,
           budget: TimeBudget | None) -> FinetuneResult:
    cases, info = job.cases, folder.info
    model = model.to(device)
    optimizer = build_optimizer(model, job.cfg.train)
    best = dict(folder.restore(model, optimizer).get("best") or {"score": None, "step": None, "metrics": {}})
    model = folder.wrap(model, device)
    amp = amp_dtype(job.cfg.train.amp, device)
    deadline = budget.started + budget.seconds if budget is not None else None
    reporter = Progress(progress if info.is_main else "none", stage="finetune", total=job.cfg.train.steps,
                        deadline=deadline)
    log.info("fine-tuning %s (%s preset) on %d case(s), validating on %d, on %s, %d process(es)%s", job.kind,
             job.cfg.preset, len(cases.training), len(cases.validation), device, info.world_size,
             f", within {budget.seconds / 60:g} min" if budget else "")

    def planned(steps: int) -> None:  # a time-limited run fixed its length, right after validating: record it
        job.cfg = _with_steps(job.cfg, steps)
        if info.is_main:
            folder.write_config(job.cfg.to_dict())
            if best["step"] is not None:  # model.pt of that validation, with the steps fixed
                _save_model(folder.path, job, model, best["step"], best["metrics"])
        log.info("time limit: %d steps fit (%s)", steps, budget.to_dict())

    hooks = LoopHooks(reporter, lambda step: folder.save(step, job.cfg.to_dict(), model, optimizer,
                                                         {"best": best, "cases": cases.to_dict()}),
                      folder.log_path, _validator(job, model, device, amp, best, folder.path if info.is_main else None),
                      budget, planned)
    result = train_loop(model, optimizer, job.cfg.train, job.batches(folder.start_step), job.step_fn(model, device),
                        device, folder.start_step, hooks)
    if info.is_main and not (folder.path / MODEL).exists():  # no finite validation score yet: the latest weights
        _save_model(folder.path, job, model, result.step, {})
    reporter.done(result.step, folder.path / MODEL, message=_ending(result, job.cfg.train.steps), best=best,
                  processes=info.world_size, ranks_in_sync=distributed.parameters_in_sync(model))
    return FinetuneResult(result.step, folder.path / MODEL, best, result.stopped_early, result.out_of_time)


def _ending(result, planned_steps: int) -> str:
    if result.stopped_early:
        return "stopped early, resume with --resume"
    if result.out_of_time:
        return f"the time limit ended the run at step {result.step} of the {planned_steps} planned"
    return ""


def _budget(cfg: FinetuneConfig, started: float) -> TimeBudget | None:
    """The time limit's budget, counted from `started`; None for a run of fixed length."""
    t = cfg.train
    if t.time_limit is None:
        return None
    return TimeBudget.minutes(t.time_limit, started, t.warmup_steps, cfg.val.every, t.checkpoint_every)


def _load_data(task: str, data: str):
    return load_classification_dataset(data) if task == "classification" else load_dataset(data)


def _cases(ckpt: dict | None, dataset, request: FinetuneRequest) -> CaseSelection:
    if ckpt is None:
        return select_cases(dataset, request.fold, request.train_cases, request.seed)
    saved = ckpt["cases"]
    return CaseSelection(saved["training"], saved["validation"], saved["fold"], saved["train_cases"], saved["seed"],
                         saved.get("note", ""))


def _pretrained(pretrained: str | None) -> PretrainedWeights | None:
    if pretrained is None or str(pretrained).lower() == "none":
        return None
    return read_pretrained(pretrained)


def _resolve_config(ckpt: dict | None, request: FinetuneRequest, weights: PretrainedWeights | None) -> FinetuneConfig:
    extra = dict(request.overrides or {})
    if ckpt is not None:
        if any(k != "train.steps" for k in extra) or request.freeze_encoder:
            raise UserError("--resume keeps the saved settings; only --steps / --epochs may change")
        return finetune_config_from_dict(ckpt["config"]).validate()
    extra.setdefault("train.seed", request.seed)
    if request.freeze_encoder:
        extra["freeze_encoder"] = True
    if weights is not None:
        extra.setdefault("model.backbone", weights.backbone)
        if weights.feature_size is not None:
            extra["model.feature_size"] = weights.feature_size
    return build_finetune_config(request.preset, request.task, weights.encoder if weights else None, extra)


def _with_length(cfg: FinetuneConfig, n_training: int, request: FinetuneRequest, resumed: bool) -> FinetuneConfig:
    """--steps N, --epochs N (one epoch = every training case once) or --time-limit M, else the preset's length."""
    steps, epochs, minutes = request.steps, request.epochs, request.time_limit
    if sum(x is not None for x in (steps, epochs, minutes)) > 1:
        raise UserError("give one of --steps, --epochs or --time-limit")
    if minutes is not None:
        if resumed:
            raise UserError(f"--resume keeps the {cfg.train.steps} steps the first run chose (or give --steps); "
                            "drop --time-limit")
        return _with_train(cfg, time_limit=minutes)
    if epochs is not None:
        steps = epochs * steps_per_epoch(n_training, cfg.data.batch_size)
    if steps is None:
        return cfg
    return _with_steps(cfg, steps)


def _with_steps(cfg: FinetuneConfig, steps: int) -> FinetuneConfig:
    return _with_train(cfg, steps=steps)


def _with_train(cfg: FinetuneConfig, **train) -> FinetuneConfig:
    tree = cfg.to_dict()
    tree["train"].update(train)
    return finetune_config_from_dict(tree).validate()


def _validator(job, model: nn.Module, device, amp, best: dict, out_dir: Path | None):
    """Validation every `val.every` steps and when the loop asks (`now`: the last step, the step that fixes a
    time-limited run's length); a better score rewrites model.pt (atomically)."""

    def validate(step: int, now: bool) -> dict | None:
        if step % job.cfg.val.every and not now:
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
