"""Self-supervised pre-training: `run_pretrain` reads like its table of contents."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from monai.data import DataLoader
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from engine.config.pretrain import PretrainConfig, build_config, config_from_dict
from engine.data.datalist import resolve_datalist
from engine.errors import UserError
from engine.models import build_pretrainer
from engine.pretraining.data import pretrain_dataset
from engine.pretraining.preflight import check_pretrain
from engine.pretraining.step import step_function
from engine.runtime import distributed
from engine.runtime.checkpoint import load_checkpoint, save_checkpoint, unwrap
from engine.runtime.device import amp_dtype
from engine.runtime.progress import Progress
from engine.training.loop import LoopResult, cycle, train_loop, trim_log
from engine.training.optim import build_optimizer

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def run_pretrain(data: str, out: str, method: str = "mim", preset: str = "tiny", steps: int | None = None,
                 resume: bool = False, seed: int = 0, progress: str = "bar", device: str = "auto",
                 overrides: dict | None = None, check_memory: bool = True) -> LoopResult:
    """Pre-train alone or as one of torchrun's processes (DDP); only rank 0 reports and writes. Unless
    `check_memory` is False, a run whose estimated peak memory does not fit is refused before it reads the data."""
    info, dev = distributed.setup(device)
    try:
        return _pretrain(info, dev, data, Path(out), method, preset, steps, resume, seed, progress, overrides,
                         check_memory)
    finally:
        distributed.teardown()


def _pretrain(info, dev, data, out_dir: Path, method, preset, steps, resume, seed, progress, overrides,
              check_memory) -> LoopResult:
    ckpt = _resume_state(out_dir, method, preset) if resume else None
    cfg = _resolve_config(ckpt, method, preset, steps, seed, overrides)
    cfg = replace(cfg, train=replace(cfg.train, views_per_pass=cfg.train.views_per_pass_on(dev)))  # "auto" decided
    start = int(ckpt["step"]) if ckpt else 0
    if not resume and (out_dir / CHECKPOINT).exists():
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    items = _training_items(data, cfg, info)
    if check_memory:
        estimate = check_pretrain(cfg, items, dev, resume)
        log.info("memory: about %s predicted", estimate.describe())
    batches = _batches(items, cfg, start, info)  # reads (and caches) the data first: a bad volume stops us here
    if info.is_main:
        _prepare_run_dir(out_dir, cfg, resume)
        trim_log(out_dir / "log.jsonl", start)
    distributed.barrier()
    set_determinism(seed=cfg.train.seed + 7919 * info.rank + start)
    model = build_pretrainer(cfg).to(dev)
    optimizer = build_optimizer(model, cfg.train)
    _restore(ckpt, model, optimizer)
    if info.enabled:
        model = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    masks = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 7919 * info.rank + start)
    reporter = Progress(progress if info.is_main else "none", stage=f"pretrain-{cfg.method}", total=cfg.train.steps)
    log.info("pre-training %s (%s preset), %d passes per sample, on %s, %d process(es)", cfg.method, cfg.preset,
             cfg.mask.passes_per_sample() if cfg.method != "hybridmim" else 3, dev, info.world_size)

    def save(step: int) -> Path:
        path = out_dir / CHECKPOINT
        if info.is_main:
            save_checkpoint(path, kind="pretrain", config=cfg.to_dict(), model=model, step=step, optimizer=optimizer,
                            extra={"world_size": info.world_size})
        return path

    result = train_loop(model, optimizer, cfg.train, batches, step_function(model, cfg, dev, masks), device=dev,
                        amp=amp_dtype(cfg.train.amp, dev), start_step=start, progress=reporter, save=save,
                        log_path=out_dir / "log.jsonl" if info.is_main else None)
    in_sync = distributed.parameters_in_sync(model)
    reporter.done(result.step, out_dir / CHECKPOINT, processes=info.world_size, ranks_in_sync=in_sync,
                  message="stopped early, resume with --resume" if result.stopped_early else "")
    return result


def _resume_state(out_dir: Path, method: str, preset: str) -> dict:
    path = out_dir / CHECKPOINT
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist; start without --resume")
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if saved.get("method") != method:
        raise UserError(f"--resume: {path} was trained with method '{saved.get('method')}', not '{method}'")
    return ckpt


def _resolve_config(ckpt, method, preset, steps, seed, overrides) -> PretrainConfig:
    extra = dict(overrides or {})
    if steps is not None:
        extra["train.steps"] = steps
    if ckpt is None:
        extra.setdefault("train.seed", seed)
        return build_config(preset, method, extra)
    tree = ckpt["config"]
    for key, value in extra.items():  # a resumed run may only change how long it runs
        if key != "train.steps":
            raise UserError(f"--resume keeps the saved settings; '{key}' cannot change on resume")
        tree["train"]["steps"] = value
    return config_from_dict(tree).validate()


def _prepare_run_dir(out_dir: Path, cfg: PretrainConfig, resume: bool) -> None:
    for stale in out_dir.glob(f".{CHECKPOINT}.tmp*"):  # left by a process killed while saving
        stale.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write the run folder ({err.strerror})") from None


def _restore(ckpt, model, optimizer) -> None:
    """Weights and optimiser state from a checkpoint, whatever number of processes wrote it."""
    if ckpt is None:
        return
    unwrap(model).load_state_dict(ckpt["model"])
    if ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])


def _training_items(data: str, cfg: PretrainConfig, info: distributed.DistInfo) -> list[dict]:
    items = resolve_datalist(data)
    while len(items) < cfg.data.batch_size * info.world_size:  # tiny datasets: several crops of the same volumes
        items = items * 2
    return items


def _batches(items: list[dict], cfg: PretrainConfig, start_step: int, info: distributed.DistInfo):
    """Endless batches of this rank's shard; each epoch reshuffles, every volume once per epoch over all ranks."""
    dataset = pretrain_dataset(items, cfg.data, cfg.crop_size)
    sampler = distributed.ShardSampler(len(items), info.rank, info.world_size, seed=cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed + info.rank)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.workers, generator=generator, persistent_workers=cfg.data.workers > 0)
    epochs_done = start_step * cfg.data.batch_size * info.world_size // max(1, len(items))
    return cycle(loader, cfg.train.seed, start_epoch=epochs_done)


