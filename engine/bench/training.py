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
from engine.training.precision import ROUNDS, bf16_pays, wants_trial

TRIAL_STEPS = 2 * ROUNDS  # the steps of `train.amp: auto`'s precision trial, where it runs


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
    return [float(r["seconds"]) for r in _records(log_path)]


def _records(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def _tries_precision(amp: str) -> bool:
    """The run will start with `train.amp: auto`'s precision trial (training.precision)."""
    device = pick_device("auto")
    return wants_trial(amp, amp_dtype(amp, device), device)


def step_figures(log_path: Path, skip: int) -> dict:
    """Seconds per step of a run (the median of the steps after the first `skip`) and every step's seconds. Where
    the run began with `train.amp: auto`'s precision trial, the trial's two figures too, and the step time is that
    of the precision it kept: the median of the steps after `skip` run in it, else the trial's own figure."""
    records = _records(log_path)
    trial = next((r["amp_trial"] for r in records if "amp_trial" in r), None)
    seconds = [float(r["seconds"]) for r in records]
    measured = [float(r["seconds"]) for r in records[skip:] if trial is None or "amp" not in r]
    figures = {"steps_s": [round(s, 3) for s in seconds]}
    if trial is not None:
        figures["amp_trial"] = trial
        kept = trial["bf16_step_s" if trial["chosen"] == "bf16" else "fp32_step_s"]
        figures["step_s"] = round(statistics.median(measured) if measured else kept, 3)
    else:
        figures["step_s"] = round(statistics.median(measured), 3)
    return figures


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
    trial = _tries_precision(job.amp)
    steps = max(job.warmup + job.steps, TRIAL_STEPS) if trial else job.warmup + job.steps
    request = PretrainRequest(str(data), str(out / "run"), method=job.method, preset=job.preset,
                              steps=steps, progress="none", overrides=overrides)
    run_pretrain(request)
    figures = step_figures(out / "run" / "log.jsonl", job.warmup)
    step_s, peak = figures["step_s"], peak_rss_gb()  # the peak before counting FLOPs
    flops = pretrain_step_flops(cfg)
    return {
        **figures, "peak_rss_gb": round(peak, 3),
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
    first = TRIAL_STEPS if _tries_precision(job.amp) else job.warmup  # the measured steps come after these
    request = FinetuneRequest(str(data), str(out / "run"), preset=job.preset,
                              steps=first + job.epochs * per_epoch, progress="none", overrides=overrides)
    run_finetune(request)
    figures = step_figures(out / "run" / "log.jsonl", first)
    step_s, peak = figures["step_s"], peak_rss_gb()
    flops = finetune_step_flops(cfg, len(job.labels))
    return {
        **figures, "epoch_s": round(sum(figures["steps_s"][-per_epoch:]), 3),
        "steps_per_epoch": per_epoch, "cases": len(job.training), "preset": job.preset, "roi": cfg.model.roi,
        "crops_per_step": cfg.crop.samples * cfg.data.batch_size, "preset_steps": cfg.train.steps,
        "preset_run_s": round(cfg.train.steps * step_s, 1), "run_s": round(time.perf_counter() - t0, 1),
        "step_tflop": round(flops / 1e12, 4), "gflops": round(flops / 1e9 / step_s, 2),
        "peak_rss_gb": round(peak, 3), "amp": _amp_name(job.amp), "overrides": dict(job.overrides),
    }


def _amp_name(amp: str) -> str:
    """The autocast of the run; with a precision trial: `auto`, and the trial's record says what it kept."""
    if _tries_precision(amp):
        return "auto"
    dtype = amp_dtype(amp, pick_device("auto"))
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


@dataclass(frozen=True)
class ReferenceStepJob:
    """MONAI SwinUNETR's supervised training step (the reference the pre-training targets are ratios of): one real
    CT crop of `roi`^3 through the network, DiceCE against labels from HU bands (air, lung, soft tissue, bone: the
    timing does not depend on them), backward and an AdamW step; `warmup` unmeasured steps, then `steps`."""

    ct: str
    roi: int = 96
    feature_size: int = 48
    out_channels: int = 5
    warmup: int = 1
    steps: int = 2
    amp: str = "auto"


HU_BANDS = (-1000, -500, -200, 300)  # air | lung | fat | soft tissue | bone: the reference step's labels


def measure_reference_step(job: ReferenceStepJob) -> dict:
    """Seconds per SwinUNETR training step in fp32 and, where `amp` allows bf16, under bf16 autocast (each the median
    of its measured steps); `step_s` is the faster one where `amp` is `auto` (as `train.amp: auto` keeps it), else
    that of the precision asked for."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    from engine.runtime.device import autocast

    device = pick_device("auto")
    hu = sitk.GetArrayFromImage(sitk.ReadImage(job.ct)).astype(np.float32)
    start = [max(0, (n - job.roi) // 2) for n in hu.shape]
    crop = hu[tuple(slice(s, s + job.roi) for s in start)]
    crop = np.pad(crop, [(0, job.roi - n) for n in crop.shape], constant_values=-1000)
    image = torch.from_numpy((np.clip(crop, -1000, 1000) + 1000) / 2000)[None, None].to(device)
    labels = torch.from_numpy(np.digitize(crop, HU_BANDS[1:]).astype(np.int64))[None, None].to(device)
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=job.out_channels, feature_size=job.feature_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    dtype = amp_dtype(job.amp, device)
    trial = _tries_precision(job.amp)
    precisions = [None, torch.bfloat16] if trial else [dtype]
    result = {"roi": job.roi, "feature_size": job.feature_size, "out_channels": job.out_channels, "amp": job.amp,
              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    for precision in precisions:
        seconds = []
        for _ in range(job.warmup + job.steps):
            t0 = time.perf_counter()
            with autocast(device, precision):
                loss = loss_fn(model(image).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t0)
        name = "bf16" if precision == torch.bfloat16 else ("fp16" if precision == torch.float16 else "fp32")
        result[f"{name}_step_s"] = round(statistics.median(seconds[job.warmup:]), 3)
        result[f"{name}_steps_s"] = [round(s, 3) for s in seconds]
    times = {k[:-len("_step_s")]: v for k, v in result.items() if k.endswith("_step_s")}
    if trial:  # the rule of `train.amp: auto` (training.precision): bf16 only when clearly faster
        result["chosen"] = "bf16" if bf16_pays(times["fp32"], times["bf16"]) else "fp32"
    else:
        result["chosen"] = next(iter(times))
    result["step_s"] = times[result["chosen"]]
    result["peak_rss_gb"] = round(peak_rss_gb(), 3)
    return result
