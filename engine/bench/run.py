"""`python -m engine bench [--quick] [--json OUT]`: where we stand against what users would pick instead, measured
side by side in one run on this machine (every figure is best read as a ratio to another figure of the same run):

1. whole-CT segmentation, end to end, our segmenter vs MONAI SwinUNETR and UNet at the same ROI, overlap, window
   batch and output channels (`bench_inference`), against this machine's dense-GEMM peak (`bench_machine`);
2. pre-training seconds per step and peak RSS: MiM `base` on one 192^3 crop, MAE on one 96^3 view, HybridMIM on
   the UNet backbone with and without partial reconstruction (`bench_training`);
3. fine-tuning seconds per step and per epoch of the segmentation preset on real labelled CT;
4. the radiologist's loop (`bench_loop`, alone as `bench loop`): a few labelled CTs, fine-tuning within a time
   budget, CTs it never saw segmented and scored (Dice per label per case), from scratch and from MiM.

Each measurement runs in a process of its own (forked from a server that has imported torch and MONAI once), so
peak memory never mixes. The table and the targets come from `bench_report`."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from engine.bench.inference import CONTENDERS, LABELS, InferenceJob, measure_whole_ct, prepare_ct, segmentation_config
from engine.bench.loop import LOOP_PROFILES, TASKS, LoopProfile, bench_loop, loop_files
from engine.bench.machine import gemm_peak, machine_info, rss_gb
from engine.bench.report import judge_targets
from engine.bench.training import (FinetuneJob, PretrainJob, ReferenceStepJob, measure_finetune, measure_pretrain,
                                   measure_reference_step)
from engine.config.finetune import DEFAULT_PRESET, build_finetune_config
from engine.config.schema import check_choice
from engine.errors import UserError
from engine.runtime.atomic import write_json

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # the project's ../shared/data
NATIVE_CT = "ct-native/mirp_lung1_001_ct.nii.gz"  # 512 x 512 x 134, 0.98 x 0.98 x 3 mm
LABELLED_DIR = "ct-2mm"
FINETUNE_TRAINING = ("pycerr_pat_1", "pycerr_pat_3", "pycerr_pat_4")  # three manual tumour (GTV) contours
FINETUNE_VALIDATION = ("pycerr_pat_2",)
FINETUNE_LABELS = {"background": 0, "GTV-1": 1}
VALIDATE_AT_END = 10**9  # fine-tuning validates after its last step only: the bench times training steps
# imported once by the forkserver; torch._dynamo is what the first optimiser imports (seconds)
PRELOAD = ["engine.bench.inference", "engine.bench.training", "engine.bench.loop", "engine.pretraining.run",
           "engine.finetuning.run", "engine.inference.run", "torch._dynamo"]
SECTIONS = ("all", "speed", "loop")  # every measurement; all but the loop (1-4 above); the radiologist's loop alone


@dataclass(frozen=True)
class BenchProfile:
    """How big one run is: `full` (the issue's sizes), `quick` (a few minutes) or `tiny` (the test suite)."""

    mode: str
    seg_preset: str = DEFAULT_PRESET  # inference and fine-tuning: the default recipe, what `engine finetune` makes
    inference_overrides: dict = field(default_factory=dict)  # of the segmentation preset, for inference only
    pretrain_preset: str = "base"
    pretrain_ct: str = "ct-2mm/mirp_lung1_001_ct.nii.gz"  # each step draws its crop(s) from this real CT
    hybridmim_overrides: dict = field(default_factory=dict)
    finetune_overrides: dict = field(default_factory=dict)
    finetune_cases: int = 3  # labelled training cases (an epoch is this many steps)
    ct_crop: tuple[int, int, int] | None = None  # central crop of the native CT in voxels (x, y, z); None = whole
    swin_feature_size: int = 48
    reference_roi: int = 96  # the SwinUNETR training step the pre-training targets are ratios of
    sw_batch_size: int = 2  # windows per forward (`engine infer`'s default)
    overlap: float = 0.5  # sliding-window overlap (`engine infer`'s default)
    gemm_size: int = 4096
    gemm_budget_s: float = 3.0
    warmup_steps: int = 1
    pretrain_steps: int = 2  # measured, after the warm-up (a base MiM step is ~7.7 TFLOP)
    finetune_epochs: int = 2
    note: str = ""


PROFILES = {
    "full": BenchProfile("full"),
    "quick": BenchProfile("quick", pretrain_preset="small", ct_crop=(160, 160, 48), gemm_size=2048,
                          gemm_budget_s=1.5, pretrain_steps=1, finetune_epochs=1,
                          note="--quick: the CT is cropped to its central 160x160x48 voxels, pre-training uses the "
                               "small preset (not base), every training figure is one measured step (or epoch) "
                               "after one warm-up step; whole-CT and pre-training targets are not judged"),
    "tiny": BenchProfile("tiny", seg_preset="tiny", inference_overrides={"model.roi": 64}, pretrain_preset="tiny",
                         pretrain_ct="ct-2mm/pycerr_pat_1_ct.nii.gz", hybridmim_overrides={"mask.roi": 32},
                         finetune_overrides={"crop.samples": 1}, finetune_cases=1, ct_crop=(48, 48, 12),
                         swin_feature_size=12, reference_roi=64, sw_batch_size=1, gemm_size=256, gemm_budget_s=0.1,
                         warmup_steps=0,
                         pretrain_steps=1, finetune_epochs=1,
                         note="--tiny: the test suite's size (tiny presets, a 48x48x12 CT crop, one step per "
                              "figure, one fine-tuning case); no figure here means anything"),
}


class IsolatedRunner:
    """Runs each measurement in a fresh process (its own peak RSS), forked from a forkserver that imported torch,
    MONAI and the engine once, so a measurement starts in milliseconds rather than seconds."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        methods = multiprocessing.get_all_start_methods()
        self.context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self.context.get_start_method() == "forkserver":
            self.context.set_forkserver_preload(PRELOAD)

    def __call__(self, label: str, fn: Callable, *args) -> dict:
        """fn(*args) in its own process; {"error": ...} if it raised or the process died (out of memory)."""
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=self.context) as pool:
                result = pool.submit(_with_process_times, fn, *args).result()
        except Exception as err:  # a measurement that fails is reported, the others still run
            result = {"error": f"{type(err).__name__}: {err}"[:300]}
        times = f"{result.get('process_wall_s', 0):.1f} s, {result.get('process_cpu_s', 0):.1f} CPU s"
        self.echo(f"bench: {label}: {'FAILED ' + result['error'] if 'error' in result else 'done'} ({times})")
        return result


def _with_process_times(fn: Callable, *args) -> dict:
    """fn(*args) plus what the whole measurement cost its process: wall and CPU seconds (CPU / wall well below the
    thread count means the cores were shared with something else, and the figures are slower than this machine can
    do), resident memory at the start (torch and MONAI already imported) and, on a GPU, its peak allocation."""
    import torch
    start_rss, wall, cpu = rss_gb(), time.perf_counter(), time.process_time()
    result = fn(*args)
    extra = {"process_wall_s": round(time.perf_counter() - wall, 2),
             "process_cpu_s": round(time.process_time() - cpu, 2), "threads": torch.get_num_threads(),
             "start_rss_gb": round(start_rss, 3) if start_rss else None}
    if torch.cuda.is_available():
        extra["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return {**result, **extra}


def run_bench(mode: str = "full", json_out: str | None = None, amp: str = "auto", seg_preset: str | None = None,
              data_dir: str | Path | None = None, echo: Callable[[str], None] | None = None, section: str = "all",
              pretrained: str | None = None, loop_minutes: float | None = None,
              loop_overrides: dict | None = None, loop_tasks: tuple[str, ...] | None = None) -> dict:
    """Run every measurement of the profile (progress lines to `echo`, default stderr), write the JSON report if
    asked; returns the report (`bench_report.format_report` makes the table). `section="speed"` runs every
    measurement but the loop (its 30 minutes are fine-tuning budgets, not speed); `section="loop"` runs the
    radiologist's loop alone, with `seg_preset` (default: the default fine-tuning recipe), `loop_minutes` and
    `loop_overrides` as its fine-tuning settings, `loop_tasks` (default: the profile's) and `pretrained` as its MiM
    encoder (else pre-trained here)."""
    check_choice("--amp", amp, ("auto", "bf16", "fp16", "off"))
    check_choice("bench section", section, SECTIONS)
    speed = section in ("all", "speed")
    profile = _profile(mode, seg_preset if speed else None)
    loop = _loop_profile(mode, seg_preset if section == "loop" else None, loop_minutes, loop_overrides, loop_tasks)
    data = Path(data_dir) if data_dir else SHARED_DATA
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_data(data, section, loop if section != "speed" else None, pretrained)
    t0 = time.perf_counter()
    run = IsolatedRunner(echo)
    echo(f"bench ({profile.mode}{'' if section == 'all' else ', ' + section}): every measurement in its own process, "
         "one after the other")
    report = {"mode": profile.mode, "section": section, "note": profile.note if speed else loop.note}
    with tempfile.TemporaryDirectory(prefix="mimslicer-bench-") as tmp:
        report["machine"] = run("machine", machine_info, amp)
        if speed:
            gemm = run("dense GEMM peak", gemm_peak, profile.gemm_size, profile.gemm_budget_s)
            report["inference"] = _inference(run, profile, amp, data, Path(tmp), gemm)
            report["pretrain"] = _pretrain(run, profile, amp, data, Path(tmp), gemm.get("gemm_peak_gflops"))
            report["finetune"] = run(f"fine-tuning, {profile.seg_preset} preset", measure_finetune,
                                     _finetune_job(profile, amp, data, Path(tmp)))
        if section != "speed":
            report["loop"] = bench_loop(run, loop, amp, data, Path(tmp) / "loop", pretrained)
    report.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=_commit())
    report["targets"] = judge_targets(report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if json_out:
        write_json(report, Path(json_out))
    return report


def _loop_profile(mode: str, preset: str | None, minutes: float | None, overrides: dict | None,
                  tasks: tuple[str, ...] | None) -> LoopProfile:
    """The mode's loop profile with the settings asked for; a bad preset, setting or task is refused here."""
    for task in tasks or ():
        check_choice("loop task", task, tuple(TASKS))
    changes = {"preset": preset, "minutes": minutes, "overrides": overrides, "tasks": tuple(tasks or ())}
    profile = replace(LOOP_PROFILES[mode], **{k: v for k, v in changes.items() if v})
    build_finetune_config(profile.preset, overrides=profile.overrides)
    return profile


def _profile(mode: str, seg_preset: str | None) -> BenchProfile:
    """The mode's profile, with another segmentation preset if asked; refused before anything runs if SwinUNETR
    cannot take the preset's ROI."""
    check_choice("bench mode", mode, tuple(PROFILES))
    profile = replace(PROFILES[mode], seg_preset=seg_preset) if seg_preset else PROFILES[mode]
    roi = segmentation_config(profile.seg_preset, profile.inference_overrides).model.roi
    if roi % 32 or roi < 64:
        raise UserError(f"preset {profile.seg_preset}: ROI {roi}, but SwinUNETR, the reference contender, needs an "
                        "ROI divisible by 32 and at least 64 (e.g. --preset small or base)")
    return profile


def _check_data(data: Path, section: str, loop, pretrained: str | None) -> None:
    if pretrained and not Path(pretrained).is_file():  # the user's own argument first
        raise UserError(f"--pretrained {pretrained}: no such checkpoint")
    needed = loop_files(data, loop) if loop is not None else []
    if section in ("all", "speed"):
        needed += [data / NATIVE_CT, *(data / p.pretrain_ct for p in PROFILES.values()),
                   *(data / LABELLED_DIR / f"{s}_{kind}.nii.gz" for s in FINETUNE_TRAINING + FINETUNE_VALIDATION
                     for kind in ("ct", "label"))]
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise UserError(f"the benchmark reads real CT from {data} (the project's ../shared/data); "
                        f"missing: {missing[0]}")


def _inference(run: IsolatedRunner, profile: BenchProfile, amp: str, data: Path, tmp: Path, gemm: dict) -> dict:
    ct, size = prepare_ct(data / NATIVE_CT, profile.ct_crop, tmp)
    contenders = {}
    for name in CONTENDERS:
        job = InferenceJob(name, str(ct), str(tmp / "inference"), profile.seg_preset, dict(profile.inference_overrides),
                           profile.overlap, profile.sw_batch_size, amp, profile.swin_feature_size)
        contenders[name] = run(f"whole-CT segmentation, {name}", measure_whole_ct, job)
    return _inference_section(profile, contenders, gemm, size)


def _inference_section(profile: BenchProfile, contenders: dict, gemm: dict, size: list[int]) -> dict:
    cfg = segmentation_config(profile.seg_preset, profile.inference_overrides)
    pick = lambda name, key: contenders[name].get(key)  # noqa: E731
    ours, swin, peak = pick("ours", "wall_s"), pick("swinunetr", "wall_s"), gemm.get("gemm_peak_gflops")
    section = {f"{name}_s": pick(name, "wall_s") for name in contenders}
    section.update({f"{name}_peak_rss_gb": pick(name, "peak_rss_gb") for name in contenders})
    section.update({f"{name}_gflops": pick(name, "gflops") for name in contenders})
    section.update({k: v for k, v in gemm.items() if k != "error"})
    section.update({
        "ours_vs_swinunetr": round(ours / swin, 3) if ours and swin else None,
        "ours_gemm_fraction": round(pick("ours", "gflops") / peak, 3) if pick("ours", "gflops") and peak else None,
        "ct": {"name": NATIVE_CT, "size": size, "cropped": profile.ct_crop is not None},
        "preset": profile.seg_preset, "overrides": dict(profile.inference_overrides), "roi": cfg.model.roi,
        "spacing": list(cfg.data.spacing), "overlap": profile.overlap, "sw_batch_size": profile.sw_batch_size,
        "out_channels": len(LABELS), "swinunetr_feature_size": profile.swin_feature_size,
        "gflops_means": "network FLOPs (torch.utils.flop_counter) / seconds inside the network's forward",
        "contenders": contenders,
    })
    return section


def _pretrain(run: IsolatedRunner, profile: BenchProfile, amp: str, data: Path, tmp: Path,
              gemm_peak_gflops: float | None = None) -> dict:
    """Each run's step; its ratio to the SwinUNETR step, and the floor of that ratio: the step's FLOPs at the
    machine's dense-GEMM peak with nothing else to do (what no implementation of the same work beats here)."""
    preset = profile.pretrain_preset
    unet = {**profile.hybridmim_overrides, "hybridmim.backbone": "unet"}
    plans = {"mim_base": ("mim", {}), "mae_base_view": ("mae", {}),
             "hybridmim_unet": ("hybridmim", {**unet, "hybridmim.partial": True}),
             "hybridmim_unet_full_recon": ("hybridmim", {**unet, "hybridmim.partial": False})}
    runs = {}
    for name, (method, overrides) in plans.items():
        job = PretrainJob(name, method, preset, str(data / profile.pretrain_ct), str(tmp / "pretrain" / name),
                          profile.warmup_steps, profile.pretrain_steps, overrides, amp)
        runs[name] = run(f"pre-training {name}, {preset} preset", measure_pretrain, job)
    reference = ReferenceStepJob(str(data / profile.pretrain_ct), profile.reference_roi, profile.swin_feature_size,
                                 len(LABELS), profile.warmup_steps, profile.pretrain_steps, amp)
    runs["swinunetr_train"] = run(f"SwinUNETR training step, {profile.reference_roi}^3 crop", measure_reference_step,
                                  reference)
    section: dict = {}
    for name, r in runs.items():
        section[f"{name}_step_s"], section[f"{name}_peak_rss_gb"] = r.get("step_s"), r.get("peak_rss_gb")
    swin = section["swinunetr_train_step_s"]
    for name in ("mim_base", "hybridmim_unet"):
        ours = section[f"{name}_step_s"]
        section[f"{name}_vs_swinunetr_step"] = round(ours / swin, 3) if ours and swin else None
        tflop = runs[name].get("step_tflop")
        if tflop and swin and gemm_peak_gflops:
            section[f"{name}_floor_vs_swinunetr_step"] = float(f"{tflop * 1e3 / gemm_peak_gflops / swin:.3g}")
    section.update({"preset": preset, "ct": profile.pretrain_ct, "runs": runs})
    return section


def _finetune_job(profile: BenchProfile, amp: str, data: Path, tmp: Path) -> FinetuneJob:
    return FinetuneJob(profile.seg_preset, FINETUNE_TRAINING[:profile.finetune_cases], FINETUNE_VALIDATION,
                       str(data / LABELLED_DIR), str(tmp / "finetune"), FINETUNE_LABELS, profile.warmup_steps,
                       profile.finetune_epochs, {**profile.finetune_overrides, "val.every": VALIDATE_AT_END}, amp)


def _commit() -> str | None:
    """The checkout's commit, so that reports can be compared over time (None outside a git checkout)."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                                capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None
