"""Self-supervised pre-training: `run_pretrain` reads like its table of contents."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from engine.config.pretrain import PretrainConfig, build_config, config_from_dict, config_from_file
from engine.data.datalist import resolve_datalist
from engine.errors import UserError
from engine.models import build_pretrainer
from engine.pretraining.data import batches
from engine.pretraining.preflight import check_pretrain
from engine.pretraining.step import step_function
from engine.runtime import distributed
from engine.runtime.progress import Progress
from engine.training.budget import TimeBudget
from engine.training.loop import LoopHooks, LoopResult, train_loop
from engine.training.optim import build_optimizer
from engine.training.run_folder import CHECKPOINT, RunFolder

log = logging.getLogger(__name__)
KIND = "pretrain"


@dataclass(frozen=True)
class PretrainRequest:
    """What `engine pretrain` is asked to do (the CLI's options, as a Python API)."""

    data: str  # a folder of volumes or a dataset JSON
    out: str  # the run folder
    method: str = "mim"  # mim | mae | hybridmim
    preset: str = "tiny"
    steps: int | None = None  # None: the preset's (or what fits in time_limit)
    time_limit: float | None = None  # minutes for the whole run, reading the data included (not with steps)
    resume: bool = False
    seed: int | None = None  # None: the config file's, else 0
    config: str | None = None  # a config file (a run's config.yaml) instead of method + preset
    progress: str = "bar"  # bar | json | none
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # dotted settings (--set)
    check_memory: bool = True  # refuse a run whose estimated peak memory does not fit, before reading the data


def run_pretrain(request: PretrainRequest) -> LoopResult:
    """Pre-train alone or as one of torchrun's processes (DDP); only rank 0 reports and writes."""
    started = time.monotonic()  # a time limit counts from here
    return distributed.in_process_group(lambda req, info, dev: _pretrain(req, info, dev, started), request)


def _pretrain(request: PretrainRequest, info: distributed.DistInfo, dev: torch.device, started: float) -> LoopResult:
    folder = RunFolder.open(request.out, KIND, info, request.resume)
    cfg = _resolve_config(folder.resumed, request)
    cfg = replace(cfg, train=replace(cfg.train, views_per_pass=cfg.train.views_per_pass_on(dev)))  # "auto" decided
    items = _training_items(request.data, cfg, info)
    if request.check_memory:
        estimate = check_pretrain(cfg, items, dev, request.resume)
        log.info("memory: about %s predicted", estimate.describe())
    # reads the volumes first: with the in-memory cache (at most 32 volumes, no data.cache_dir) a bad volume stops
    # the run here; otherwise it stops the step that reads it
    data = batches(items, cfg, folder.start_step, info)
    folder.prepare(cfg.to_dict())
    folder.seed(cfg.train.seed)
    model = build_pretrainer(cfg).to(dev)
    optimizer = build_optimizer(model, cfg.train)
    folder.restore(model, optimizer)
    model = folder.wrap(model, dev)
    masks = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 7919 * info.rank + folder.start_step)
    t = cfg.train
    budget = None
    if t.time_limit is not None and folder.resumed is None:  # a resumed run keeps the steps its first run chose
        budget = TimeBudget.minutes(t.time_limit, started, t.warmup_steps, None, t.checkpoint_every)
    reporter = Progress(request.progress if info.is_main else "none", stage=f"pretrain-{cfg.method}",
                        total=cfg.train.steps, deadline=budget and budget.started + budget.seconds)
    log.info("pre-training %s (%s preset), %d passes per sample, on %s, %d process(es)", cfg.method, cfg.preset,
             cfg.mask.passes_per_sample() if cfg.method != "hybridmim" else 3, dev, info.world_size)
    state = {"cfg": cfg}

    def planned(steps: int) -> None:  # the time limit fixed the length: the config records it
        state["cfg"] = replace(state["cfg"], train=replace(state["cfg"].train, steps=steps))
        if info.is_main:
            folder.write_config(state["cfg"].to_dict())

    hooks = LoopHooks(reporter, lambda step: folder.save(step, state["cfg"].to_dict(), model, optimizer),
                      folder.log_path, budget=budget, planned=planned)
    result = train_loop(model, optimizer, cfg.train, data, step_function(model, cfg, dev, masks), dev,
                        folder.start_step, hooks)
    reporter.done(result.step, folder.path / CHECKPOINT, processes=info.world_size,
                  ranks_in_sync=distributed.parameters_in_sync(model),
                  message="stopped early, resume with --resume" if result.stopped_early else "")
    return result


def _resolve_config(ckpt: dict | None, request: PretrainRequest) -> PretrainConfig:
    extra = dict(request.overrides or {})
    if request.steps is not None and request.time_limit is not None:
        raise UserError("give --steps or --time-limit, not both")
    if request.steps is not None:
        extra["train.steps"] = request.steps
    if request.time_limit is not None:
        if ckpt is not None:
            raise UserError("--resume keeps the steps the first run chose (or give --steps); drop --time-limit")
        extra["train.time_limit"] = request.time_limit
    if ckpt is None:
        if request.seed is not None:
            extra.setdefault("train.seed", request.seed)
        if request.config:
            return config_from_file(request.config, extra)
        return build_config(request.preset, request.method, extra)
    if request.config:
        raise UserError("--resume keeps the run's own settings; --config starts a new run")
    tree = ckpt["config"]
    if tree.get("method") != request.method:
        raise UserError(f"--resume: {request.out} was trained with method '{tree.get('method')}', "
                        f"not '{request.method}'")
    for key, value in extra.items():  # a resumed run may only change how long it runs
        if key != "train.steps":
            raise UserError(f"--resume keeps the saved settings; '{key}' cannot change on resume")
        tree["train"]["steps"] = value
    return config_from_dict(tree).validate()


def _training_items(data: str, cfg: PretrainConfig, info: distributed.DistInfo) -> list[dict]:
    items = resolve_datalist(data)
    while len(items) < cfg.data.batch_size * info.world_size:  # tiny datasets: several crops of the same volumes
        items = items * 2
    return items
