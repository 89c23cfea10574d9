"""Fine-tuning (segmentation or classification): `run_finetune` reads like its table of contents.

A run folder holds config.yaml, cases.json (which cases trained and validated, and why), weights.json (the
pre-trained key report), log.jsonl, checkpoint.pt (latest training state, for --resume), model.pt (the best
model by validation: self-contained for inference, with its provenance and software versions) and MODEL_CARD.md
(written from model.pt each time it is)."""
from __future__ import annotations

import dataclasses
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
    config_file_seed,
    finetune_config_from_dict,
    finetune_config_from_file,
)
from engine.config.schema import build_dataclass, check_choice, to_plain
from engine.config.sections import EncoderConfig
from engine.data.labelled import CaseSelection, load_classification_dataset, load_dataset, select_cases
from engine.errors import UserError
from engine.finetuning.classification import ClassificationTask
from engine.finetuning.data import steps_per_epoch
from engine.finetuning.model_card import MODEL_CARD, write_model_card
from engine.finetuning.preflight import check_finetune
from engine.finetuning.provenance import run_provenance
from engine.finetuning.segmentation import SegmentationTask
from engine.finetuning.weights import PretrainedWeights, freeze, load_pretrained, read_pretrained
from engine.runtime import distributed
from engine.runtime.atomic import write_json
from engine.runtime.checkpoint import save_checkpoint, unwrap
from engine.runtime.device import amp_dtype
from engine.runtime.progress import Progress
from engine.runtime.versions import software_versions
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
    seed: int | None = None  # of the case draw, the crops and the weights; None: the config file's, else 0
    resume: bool = False
    progress: str = "bar"
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # dotted settings (--set)
    check_memory: bool = True  # refuse a run whose estimated peak memory does not fit, before its run folder
    config: str | None = None  # a config file (a run's config.yaml) instead of the preset

    @property
    def case_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return config_file_seed(self.config) if self.config else 0


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
    return distributed.in_process_group(lambda req, info, dev: _finetune(req, info, dev, started), request)


def _finetune(request: FinetuneRequest, info: distributed.DistInfo, dev: torch.device,
              started: float) -> FinetuneResult:
    check_choice("task", request.task, TASKS)
    folder = RunFolder.open(request.out, f"finetune-{request.task}", info, request.resume)
    dataset = _load_data(request.task, request.data)
    cases = _cases(folder.resumed, dataset, request)
    weights = _pretrained(request.pretrained) if folder.resumed is None else None
    cfg = _resolve_config(folder.resumed, request, weights, info.is_main)
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
    about = _about(folder.resumed, request.data, cases, weights)
    budget = _budget(job.cfg, started) if folder.resumed is None else None  # a resumed run keeps its steps
    return _train(job, model, folder, dev, request.progress, about, budget)


def _build_model(job, weights: PretrainedWeights | None, folder: RunFolder) -> nn.Module:
    model = job.build_model()
    if weights is not None:
        report = load_pretrained(model, weights)
        log.info("%s", report.summary())
        if folder.info.is_main:  # with what the encoder saw in pre-training, and what this run feeds it
            data = job.cfg.data
            write_json({**report.to_dict(), "pretrained_data": to_plain(dataclasses.asdict(job.cfg.pretrained_data)),
                        "data": {"spacing": list(data.spacing), "hu_window": list(data.hu_window)}},
                       folder.path / "weights.json")
    if job.cfg.freeze_encoder:
        freeze(model)
    return model


def _about(ckpt: dict | None, data: str, cases: CaseSelection, weights: PretrainedWeights | None) -> dict:
    """What model.pt records besides the network: provenance (cases, licences, pre-trained weights) and versions.
    A resumed run keeps the provenance it started with (its pre-trained weights are no longer at hand)."""
    provenance = (ckpt or {}).get("provenance") or run_provenance(
        data, cases, weights.describe() if weights is not None else None)
    return {"provenance": provenance, "versions": software_versions()}


def _train(job, model: nn.Module, folder: RunFolder, device: torch.device, progress: str, about: dict,
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
                _save_model(folder.path, job, model, best["step"], best["metrics"], about)
        log.info("time limit: %d steps fit (%s)", steps, budget.to_dict())

    hooks = LoopHooks(reporter, lambda step: folder.save(step, job.cfg.to_dict(), model, optimizer,
                                                         {"best": best, "cases": cases.to_dict(),
                                                          "provenance": about["provenance"]}),
                      folder.log_path, _validator(job, model, device, amp, best, folder.path if info.is_main else None,
                                                  about),
                      budget, planned, images=lambda: getattr(job, "previews", {}))
    result = train_loop(model, optimizer, job.cfg.train, job.batches(folder.start_step), job.step_fn(model, device),
                        device, folder.start_step, hooks)
    if info.is_main and not (folder.path / MODEL).exists():  # no finite validation score yet: the latest weights
        _save_model(folder.path, job, model, result.step, {}, about)
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
        return select_cases(dataset, request.fold, request.train_cases, request.case_seed)
    saved = ckpt["cases"]
    return CaseSelection(saved["training"], saved["validation"], saved["fold"], saved["train_cases"], saved["seed"],
                         saved.get("note", ""))


def _pretrained(pretrained: str | None) -> PretrainedWeights | None:
    if pretrained is None or str(pretrained).lower() == "none":
        return None
    return read_pretrained(pretrained)


def _resolve_config(ckpt: dict | None, request: FinetuneRequest, weights: PretrainedWeights | None,
                    is_main: bool = True) -> FinetuneConfig:
    extra = dict(request.overrides or {})
    if ckpt is not None:
        if request.config:
            raise UserError("--resume keeps the run's own settings; --config starts a new run")
        if any(k != "train.steps" for k in extra) or request.freeze_encoder:
            raise UserError("--resume keeps the saved settings; only --steps / --epochs may change")
        return finetune_config_from_dict(ckpt["config"]).validate()
    extra.setdefault("train.seed", request.case_seed)
    if request.freeze_encoder:
        extra["freeze_encoder"] = True
    if request.config:
        return _config_file(request, weights, extra)
    chosen: list[str] = []  # the data settings the user gave (the others follow the checkpoint)
    if weights is not None:
        extra.setdefault("model.backbone", weights.backbone)
        if weights.feature_size is not None:
            extra["model.feature_size"] = weights.feature_size
        for key, value in weights.data.items():  # spacing and window: the checkpoint's, unless the user sets them
            extra[f"pretrained_data.{key}"] = value
            if _overridden(request.overrides or {}, "data", key):
                chosen.append(key)
            else:
                extra[f"data.{key}"] = value
    cfg = build_finetune_config(request.preset, request.task, weights.encoder if weights else None, extra)
    if weights is not None and is_main:
        _report_data(cfg, weights, chosen)
    return cfg


def _overridden(overrides: dict, section: str, key: str) -> bool:
    """Whether the user's settings (dotted, or nested as in a study file) set `section.key`."""
    nested = overrides.get(section)
    return f"{section}.{key}" in overrides or (isinstance(nested, dict) and key in nested)


def _report_data(cfg: FinetuneConfig, weights: PretrainedWeights, chosen: list[str]) -> None:
    """Say where the spacing and window come from; warn once when the user's differ from pre-training's."""
    seen = {key: getattr(cfg.pretrained_data, key) for key in weights.data}
    differ = [key for key in chosen if tuple(getattr(cfg.data, key)) != tuple(seen[key])]
    if differ:
        log.warning("fine-tuning with %s, but the encoder was pre-trained with %s: both are recorded in config.yaml "
                    "and weights.json (data, pretrained_data)",
                    " and ".join(f"data.{key}={list(getattr(cfg.data, key))}" for key in differ),
                    " and ".join(f"{key} {list(seen[key])}" for key in differ))
    taken = [key for key in seen if key not in chosen]
    if taken:
        log.info("%s: as the encoder was pre-trained (--set data.%s=... to choose otherwise)",
                 ", ".join(f"data.{key}={list(seen[key])}" for key in taken), "/".join(taken))


def _config_file(request: FinetuneRequest, weights: PretrainedWeights | None, extra: dict) -> FinetuneConfig:
    """The settings of --config (a run's config.yaml) and --set; pre-trained weights must fit its network."""
    cfg = finetune_config_from_file(request.config, request.task, extra)
    if weights is None:
        return cfg
    if weights.backbone != cfg.model.backbone:
        raise UserError(f"--pretrained {weights.path} feeds a '{weights.backbone}' network; --config "
                        f"{request.config} describes a '{cfg.model.backbone}' one")
    if weights.encoder is not None and build_dataclass(EncoderConfig, weights.encoder, "encoder.") != cfg.encoder:
        raise UserError(f"--pretrained {weights.path} has encoder {weights.encoder}; --config {request.config} "
                        f"describes encoder {cfg.to_dict()['encoder']}")
    return cfg


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


def _validator(job, model: nn.Module, device, amp, best: dict, out_dir: Path | None, about: dict):
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
                _save_model(out_dir, job, model, step, metrics, about)
        return metrics
    return validate


def _save_model(out_dir: Path, job, model: nn.Module, step: int, metrics: dict, about: dict) -> Path:
    """model.pt: format tag, kind, config, weights, everything inference needs (labels, grid, window), provenance
    and versions; then its model card."""
    extra = {**job.model_extra(), "metrics": dict(metrics), **about}
    path = save_checkpoint(out_dir / MODEL, kind=job.kind, config=job.cfg.to_dict(), model=model, step=step,
                           extra=extra)
    write_model_card({"kind": job.kind, "config": job.cfg.to_dict(), "step": step, **extra}, out_dir / MODEL_CARD)
    return path
