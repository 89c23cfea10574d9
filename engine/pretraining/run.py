"""Self-supervised pre-training: `run_pretrain` reads like its table of contents."""
from __future__ import annotations

import logging
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
    steps: int | None = None  # None: the preset's
    resume: bool = False
    seed: int | None = None  # None: the config file's, else 0
    config: str | None = None  # a config file (a run's config.yaml) instead of method + preset
    progress: str = "bar"  # bar | json | none
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # dotted settings (--set)
    check_memory: bool = True  # refuse a run whose estimated peak memory does not fit, before reading the data


def run_pretrain(request: PretrainRequest) -> LoopResult:
    """Pre-train alone or as one of torchrun's processes (DDP); only rank 0 reports and writes."""
    return distributed.in_process_group(_pretrain, request)


def _pretrain(request: PretrainRequest, info: distributed.DistInfo, dev: torch.device) -> LoopResult:
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
    reporter = Progress(request.progress if info.is_main else "none", stage=f"pretrain-{cfg.method}",
                        total=cfg.train.steps)
    log.info("pre-training %s (%s preset), %d passes per sample, on %s, %d process(es)", cfg.method, cfg.preset,
             cfg.mask.passes_per_sample() if cfg.method != "hybridmim" else 3, dev, info.world_size)
    hooks = LoopHooks(reporter, lambda step: folder.save(step, cfg.to_dict(), model, optimizer), folder.log_path)
    result = train_loop(model, optimizer, cfg.train, data, step_function(model, cfg, dev, masks), dev,
                        folder.start_step, hooks)
    reporter.done(result.step, folder.path / CHECKPOINT, processes=info.world_size,
                  ranks_in_sync=distributed.parameters_in_sync(model),
                  message="stopped early, resume with --resume" if result.stopped_early else "")
    return result


def _resolve_config(ckpt: dict | None, request: PretrainRequest) -> PretrainConfig:
    extra = dict(request.overrides or {})
    if request.steps is not None:
        extra["train.steps"] = request.steps
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
