"""Pre-training and fine-tuning step times: the real `run_pretrain` / `run_finetune` on real CT for a few steps in a
scratch folder, read back from their log.jsonl (each record's `seconds` covers fetching the batch, forward, backward
and the optimiser step; not checkpoints or validation). The first `warmup` steps are left out of the figures."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.bench.flops import finetune_step_flops, pretrain_step_flops
from engine.bench.machine import peak_rss_gb
from engine.config.finetune import build_finetune_config
from engine.config.pretrain import build_config
from engine.finetuning.data import steps_per_epoch
from engine.finetuning.run import FinetuneRequest, run_finetune
from engine.pretraining.run import PretrainRequest, run_pretrain
from engine.runtime.device import amp_dtype, pick_device


@dataclass(frozen=True)
class PretrainJob:
    name: str  # the key prefix in the report, e.g. "mim_base"
    method: str
    preset: str
    ct: str  # one real CT; each step draws one random crop (or `batch_size` crops) from it
    out_dir: str
    warmup: int = 1
    steps: int = 3  # measured steps, after the warm-up
    overrides: dict = field(default_factory=dict)
    amp: str = "auto"


@dataclass(frozen=True)
class FinetuneJob:
    preset: str
    training: tuple[str, ...]  # stems of labelled cases: <stem>_ct.nii.gz and <stem>_label.nii.gz in `data_dir`
    validation: tuple[str, ...]
    data_dir: str
    out_dir: str
    labels: dict
    warmup: int = 1
    epochs: int = 1  # measured epochs, after the warm-up steps
    overrides: dict = field(default_factory=dict)
    amp: str = "auto"


def step_seconds(log_path: Path) -> list[float]:
    """Seconds of every optimiser step in a run's log.jsonl, in order."""
    return [float(json.loads(line)["seconds"]) for line in log_path.read_text().splitlines() if line.strip()]


def measure_pretrain(job: PretrainJob) -> dict:
    """`job.warmup + job.steps` steps of `run_pretrain`; seconds per measured step (median), the peak RSS of the
    whole run (data caching and the final checkpoint included, as in real use) and the achieved GFLOP/s."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "datalist.json"
    data.write_text(json.dumps({"training": [{"image": str(Path(job.ct).resolve())}]}))
    overrides = {**job.overrides, "train.amp": job.amp}
    cfg = build_config(job.preset, job.method, overrides)
    t0 = time.perf_counter()
    request = PretrainRequest(str(data), str(out / "run"), method=job.method, preset=job.preset,
                              steps=job.warmup + job.steps, progress="none", overrides=overrides)
    run_pretrain(request)
    seconds = step_seconds(out / "run" / "log.jsonl")[job.warmup:]
    step_s, peak = statistics.median(seconds), peak_rss_gb()  # the peak before counting FLOPs
    flops = pretrain_step_flops(cfg)
    return {
        "step_s": round(step_s, 3), "steps_s": [round(s, 3) for s in seconds], "peak_rss_gb": round(peak, 3),
        "step_tflop": round(flops / 1e12, 4), "gflops": round(flops / 1e9 / step_s, 2),
        "run_s": round(time.perf_counter() - t0, 1),
        "method": job.method, "preset": job.preset, "crop": cfg.crop_size, "roi": cfg.mask.roi,
        "batch_size": cfg.data.batch_size, "amp": _amp_name(job.amp), "overrides": dict(job.overrides),
        **_method_details(cfg),
    }


def _method_details(cfg) -> dict:
    if cfg.method == "hybridmim":
        return {"backbone": cfg.hybridmim.backbone, "partial": cfg.hybridmim.partial}
    return {"views_per_crop": cfg.mask.passes_per_sample(),
            "views_per_pass": cfg.train.views_per_pass_on(pick_device())}


def write_dataset(job: FinetuneJob, path: Path) -> Path:
    """dataset.json (absolute paths) for the job's training and validation cases."""
    def item(stem: str) -> dict:
        folder = Path(job.data_dir).resolve()
        return {"image": str(folder / f"{stem}_ct.nii.gz"), "label": str(folder / f"{stem}_label.nii.gz")}
    tree = {"labels": job.labels, "training": [item(s) for s in job.training],
            "validation": [item(s) for s in job.validation]}
    path.write_text(json.dumps(tree, indent=1))
    return path


def measure_finetune(job: FinetuneJob) -> dict:
    """Warm-up steps then `epochs` epochs of `run_finetune` from random weights: seconds per step (median),
    seconds per epoch (the last epoch's steps), and what the preset's whole run would take at that pace."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = write_dataset(job, out / "dataset.json")
    overrides = {**job.overrides, "train.amp": job.amp}
    cfg = build_finetune_config(job.preset, "segmentation", None, overrides)
    per_epoch = steps_per_epoch(len(job.training), cfg.data.batch_size)
    t0 = time.perf_counter()
    request = FinetuneRequest(str(data), str(out / "run"), preset=job.preset,
                              steps=job.warmup + job.epochs * per_epoch, progress="none", overrides=overrides)
    run_finetune(request)
    seconds = step_seconds(out / "run" / "log.jsonl")[job.warmup:]
    step_s, peak = statistics.median(seconds), peak_rss_gb()
    flops = finetune_step_flops(cfg, len(job.labels))
    return {
        "step_s": round(step_s, 3), "epoch_s": round(sum(seconds[-per_epoch:]), 3),
        "steps_s": [round(s, 3) for s in seconds],
        "steps_per_epoch": per_epoch, "cases": len(job.training), "preset": job.preset, "roi": cfg.model.roi,
        "crops_per_step": cfg.crop.samples * cfg.data.batch_size, "preset_steps": cfg.train.steps,
        "preset_run_s": round(cfg.train.steps * step_s, 1), "run_s": round(time.perf_counter() - t0, 1),
        "step_tflop": round(flops / 1e12, 4), "gflops": round(flops / 1e9 / step_s, 2),
        "peak_rss_gb": round(peak, 3), "amp": _amp_name(job.amp), "overrides": dict(job.overrides),
    }


def _amp_name(amp: str) -> str:
    dtype = amp_dtype(amp, pick_device("auto"))
    return str(dtype).replace("torch.", "") if dtype is not None else "off"
