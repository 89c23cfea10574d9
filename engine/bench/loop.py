"""`python -m engine bench loop`: the radiologist's loop, end to end and timed. A few labelled CTs, a fine-tuning run
held to a time budget (`finetune --time-limit`), from scratch and from a MiM encoder, then CTs it never saw
segmented by `engine infer`'s predictor on their own 2 mm grid and scored by `engine evaluate`.

Two tasks on the project's real CT (../shared/data): the lungs (right = 1, left = 2, labels in lungs-2mm; manual
for mirp_lung1_001, silver for the others) with a target of Dice >= 0.90 for each lung on each unseen case; and the
study's tumour (GTV) task, reported as it comes. Each fine-tuning, pre-training and segmentation runs in a process
of its own (the caller's runner)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from engine.config.finetune import DEFAULT_PRESET
from engine.errors import UserError

CT_DIR = "ct-2mm"


@dataclass(frozen=True)
class LoopTask:
    """Labelled cases to learn from and unseen cases to score, by case stem: the CT is CT_DIR/<stem>_ct.nii.gz,
    its labels `label_dir`/<stem><label_suffix>.nii.gz."""

    name: str
    labels: dict[str, int]
    training: tuple[str, ...]
    test: tuple[str, ...]
    label_dir: str
    label_suffix: str
    target_dice: float | None = None  # every label of every test case at least this (None: reported only)

    def image(self, data: Path, stem: str) -> Path:
        return data / CT_DIR / f"{stem}_ct.nii.gz"

    def label(self, data: Path, stem: str) -> Path:
        return data / self.label_dir / f"{stem}{self.label_suffix}.nii.gz"

    def files(self, data: Path) -> list[Path]:
        return [f(data, s) for s in self.training + self.test for f in (self.image, self.label)]


TASKS = {
    "lungs": LoopTask("lungs", {"background": 0, "lung_right": 1, "lung_left": 2},
                      ("ctanalyser_lungdx_a0001", "pyradiomics_lung1", "pyradiomics_lung2"),
                      ("mirp_lung1_001", "ts_chest"), "lungs-2mm", "_lungs", target_dice=0.90),
    # the four manual GTV contours of tumour-centred crops; scored on the whole chest CTs with a manual tumour
    "tumour": LoopTask("tumour", {"background": 0, "GTV-1": 1},
                       ("pycerr_pat_1", "pycerr_pat_2", "pycerr_pat_3", "pycerr_pat_4"),
                       ("pyradiomics_lung1", "pyradiomics_lung2", "mirp_lung1_001"), CT_DIR, "_label"),
}
STARTS = ("scratch", "mim")


@dataclass(frozen=True)
class LoopProfile:
    """How big the loop benchmark is: the budget of each fine-tuning, the tasks, and the MiM pre-training."""

    minutes: float = 10.0
    preset: str = DEFAULT_PRESET
    overrides: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = ("lungs", "tumour")
    starts: tuple[str, ...] = STARTS
    pretrain_minutes: float = 10.0  # when no --pretrained checkpoint is given
    pretrain_preset: str = "small"  # its encoder must be the fine-tuning preset's
    test_cases: int | None = None  # the first N test cases of each task (None: all)
    crop: tuple[int, int, int] | None = None  # central crop of every CT and label, in voxels (None: whole)
    note: str = ""


LOOP_PROFILES = {
    "full": LoopProfile(),
    "quick": LoopProfile(minutes=3.0, tasks=("lungs",), starts=("scratch",),
                         note="--quick: the lungs from scratch only, within 3 minutes; the loop's targets are not "
                              "judged"),
    "tiny": LoopProfile(minutes=0.3, preset="tiny", tasks=("lungs",), pretrain_minutes=0.1, pretrain_preset="tiny",
                        test_cases=1, crop=(64, 64, 48),
                        note="--tiny: the test suite's size (tiny presets, 64x64x48-voxel crops of the CTs, budgets of "
                             "seconds, one unseen case); no figure here means anything"),
}


@dataclass(frozen=True)
class LoopJob:
    """One fine-tuning of the loop: a task, a start (scratch or a pre-trained checkpoint) and a budget."""

    task: str
    start: str
    dataset: str  # dataset.json of the training cases
    out_dir: str
    minutes: float
    preset: str
    overrides: dict
    pretrained: str | None = None
    amp: str = "auto"


def loop_files(data: Path, profile: LoopProfile) -> list[Path]:
    """The files the profile reads (checked before anything runs)."""
    return [p for name in profile.tasks for p in TASKS[name].files(data)]


def bench_loop(run: Callable, profile: LoopProfile, amp: str, data: Path, tmp: Path,
               pretrained: str | None = None) -> dict:
    """Every (task, start) of the profile: fine-tune within the budget, segment and score the unseen cases.
    `run(label, fn, *args)` runs one measurement in a process of its own."""
    tmp.mkdir(parents=True, exist_ok=True)
    cases = _prepare_cases(profile, data, tmp / "cases")
    encoder = _encoder(run, profile, amp, data, tmp, pretrained) if "mim" in profile.starts else None
    runs = {}
    for name in profile.tasks:
        task = TASKS[name]
        dataset = _write_dataset(task, cases, tmp / f"{name}.json")
        for start in profile.starts:
            if start == "mim" and not encoder.get("path"):
                runs[f"{name}_{start}"] = {"error": encoder.get("error", "no pre-trained encoder")}
                continue
            job = LoopJob(name, start, str(dataset), str(tmp / f"{name}_{start}"), profile.minutes, profile.preset,
                          dict(profile.overrides), encoder["path"] if start == "mim" else None, amp)
            trained = run(f"loop: {name} from {start}, {profile.minutes:g} min", measure_finetune_loop, job)
            runs[f"{name}_{start}"] = {**trained, **_scores(run, task, cases, trained, tmp / f"{name}_{start}")}
    return _loop_section(profile, encoder, runs)


def _prepare_cases(profile: LoopProfile, data: Path, folder: Path) -> dict[str, dict[str, str]]:
    """{task: {"<stem>_image" / "<stem>_label": path}}: the shared files, or central crops of them (tiny)."""
    out = {}
    for name in profile.tasks:
        task = TASKS[name]
        test = task.test[:profile.test_cases] if profile.test_cases else task.test
        files = {}
        for stem in task.training + test:
            for kind, path in (("image", task.image(data, stem)), ("label", task.label(data, stem))):
                files[f"{stem}_{kind}"] = str(_cropped(path, folder / name, profile.crop))
        out[name] = {"files": files, "test": list(test)}
    return out


def _cropped(path: Path, folder: Path, crop: tuple[int, int, int] | None) -> Path:
    if crop is None:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(path))
    start = [max(0, (n - c) // 2) for n, c in zip(image.GetSize(), crop)]
    stop = [min(n, b + c) for n, b, c in zip(image.GetSize(), start, crop)]
    target = folder / path.name
    sitk.WriteImage(image[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]], str(target))
    return target


def _write_dataset(task: LoopTask, cases: dict, path: Path) -> Path:
    files = cases[task.name]["files"]
    tree = {"name": f"bench loop: {task.name}", "labels": task.labels, "channel_names": {"0": "CT"},
            "training": [{"image": files[f"{s}_image"], "label": files[f"{s}_label"]} for s in task.training],
            "test": [{"image": files[f"{s}_image"], "label": files[f"{s}_label"]} for s in cases[task.name]["test"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tree, indent=1))
    return path


def _encoder(run: Callable, profile: LoopProfile, amp: str, data: Path, tmp: Path, pretrained: str | None) -> dict:
    """The MiM encoder the `mim` runs start from: a given checkpoint, or one pre-trained here within
    `profile.pretrain_minutes` on the CTs of CT_DIR that no task scores on."""
    if pretrained:
        return describe_pretrained(pretrained)
    scored = {s for name in profile.tasks for s in TASKS[name].test}
    images = [p for p in sorted((data / CT_DIR).glob("*_ct.nii.gz")) if p.name[:-len("_ct.nii.gz")] not in scored]
    datalist = tmp / "pretrain.json"
    datalist.write_text(json.dumps({"training": [{"image": str(_cropped(p, tmp / "pretrain_cases", profile.crop))}
                                                 for p in images]}))
    job = (str(datalist), str(tmp / "pretrain"), profile.pretrain_preset, profile.pretrain_minutes, amp,
           _recipe_data(profile))
    return run(f"loop: MiM pre-training, {profile.pretrain_minutes:g} min", measure_pretrain_loop, *job)


def _recipe_data(profile: LoopProfile) -> dict:
    """The fine-tuning recipe's grid and window: pre-training sees the CT as the fine-tuning will (fine-tuning takes
    both from the checkpoint, so a 2 mm pre-training would put the recipe's 4 mm window back to 2 mm)."""
    from engine.config.finetune import build_finetune_config
    data = build_finetune_config(profile.preset, overrides=dict(profile.overrides)).data
    return {"data.spacing": list(data.spacing), "data.hu_window": list(data.hu_window)}


def describe_pretrained(path: str) -> dict:
    """What a given pre-training checkpoint is: its steps, preset and, where its log says, its training time."""
    from engine.runtime.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "pretrain":
        raise UserError(f"--pretrained {path}: a '{ckpt.get('kind')}' checkpoint, not a pre-training one")
    log = Path(path).with_name("log.jsonl")
    seconds = None
    if log.is_file():
        seconds = sum(json.loads(line).get("seconds", 0.0) for line in log.read_text().splitlines() if line.strip())
    cfg = ckpt.get("config") or {}
    return {"source": "given", "path": str(Path(path).resolve()), "steps": ckpt.get("step"),
            "preset": cfg.get("preset"), "method": cfg.get("method"),
            "train_minutes": round(seconds / 60, 1) if seconds else None}


def measure_pretrain_loop(datalist: str, out_dir: str, preset: str, minutes: float, amp: str,
                          data: dict | None = None) -> dict:
    """MiM pre-training within `minutes` (on the grid and window `data`, dotted settings); the checkpoint and how
    long it trained."""
    from engine.pretraining.run import PretrainRequest, run_pretrain
    t0 = time.perf_counter()
    request = PretrainRequest(datalist, out_dir, method="mim", preset=preset, time_limit=minutes, progress="none",
                              overrides={"train.amp": amp, **(data or {})})
    result = run_pretrain(request)
    cases = len(json.loads(Path(datalist).read_text())["training"])
    return {"source": "bench", "path": str(Path(out_dir) / "checkpoint.pt"), "steps": result.step, "preset": preset,
            "method": "mim", "cases": cases, **{key.split(".")[1]: value for key, value in (data or {}).items()}, "budget_minutes": minutes,
            "train_minutes": round((time.perf_counter() - t0) / 60, 2)}


def measure_finetune_loop(job: LoopJob) -> dict:
    """`run_finetune` within the job's budget: its wall time (reading the data included) and what it chose."""
    from engine.finetuning.run import FinetuneRequest, run_finetune
    from engine.runtime.checkpoint import load_checkpoint
    t0 = time.perf_counter()
    request = FinetuneRequest(job.dataset, str(Path(job.out_dir) / "run"), preset=job.preset,
                              pretrained=job.pretrained, time_limit=job.minutes, progress="none",
                              overrides={**job.overrides, "train.amp": job.amp})
    result = run_finetune(request)
    seconds = time.perf_counter() - t0
    run_dir = Path(job.out_dir) / "run"
    planned = load_checkpoint(run_dir / "checkpoint.pt")["config"]["train"]["steps"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    plan = next((r["plan"] for r in reversed(log) if "plan" in r), {})  # the last: re-planned in the warm-up
    return {"model": str(result.model_path), "finetune_s": round(seconds, 1), "budget_s": round(job.minutes * 60, 1),
            "steps": result.step, "planned_steps": planned, "out_of_time": result.out_of_time,
            "step_s": round(sum(r["seconds"] for r in log[1:]) / max(1, len(log) - 1), 3),
            "startup_s": plan.get("startup_s"), "validate_s": plan.get("validate_s"),
            "skipped_steps": sum(1 for r in log if r.get("skipped")), "best_step": result.best.get("step"),
            "largest_component": load_checkpoint(result.model_path).get("largest_component"),
            "final_loss": round(log[-1]["loss"], 4) if log else None, "preset": job.preset, "start": job.start}


def _scores(run: Callable, task: LoopTask, cases: dict, trained: dict, out_dir: Path) -> dict:
    if "error" in trained:
        return {}
    files = cases[task.name]["files"]
    pairs = [(s, files[f"{s}_image"], files[f"{s}_label"]) for s in cases[task.name]["test"]]
    return run(f"loop: {task.name} from {trained['start']}, segment {len(pairs)} unseen case(s)", measure_segment,
               trained["model"], pairs, task.labels, str(out_dir / "segmentations"))


def measure_segment(model: str, pairs: list[tuple[str, str, str]], labels: dict, out_dir: str) -> dict:
    """Each (case, CT, reference) segmented by `engine infer` on the CT's own grid and scored by `engine evaluate`."""
    from engine.inference.run import InferRequest, run_infer
    dice, hd95, seconds = {}, {}, {}
    names = {k: v for k, v in labels.items() if v != 0}
    for case, image, reference in pairs:
        t0 = time.perf_counter()
        (pred,) = run_infer(InferRequest(model, image, str(Path(out_dir) / f"{case}_seg.nii.gz"), progress="none"))
        seconds[case] = round(time.perf_counter() - t0, 1)
        scores = _evaluate(pred, reference, names)
        dice[case] = {n: _round(s["dice"]) for n, s in scores.items()}
        hd95[case] = {n: _round(s["hd95"]) for n, s in scores.items()}
    return {"dice": dice, "hd95_mm": hd95, "infer_s": seconds}


def _evaluate(pred: Path, reference: str, names: dict) -> dict:
    """`engine evaluate` of one prediction: {label name: {"dice", "hd95", ...}}."""
    from engine.inference.evaluate import run_evaluate
    labels = pred.parent / "labels.json"
    labels.write_text(json.dumps({"labels": names}))
    return next(iter(run_evaluate(str(pred), reference, labels=str(labels))["cases"].values()))


def _round(value):
    return None if value is None else round(value, 4)


def _loop_section(profile: LoopProfile, encoder: dict | None, runs: dict) -> dict:
    section = {"budget_min": profile.minutes, "preset": profile.preset, "overrides": dict(profile.overrides),
               "tasks": {n: {"training": list(TASKS[n].training), "test": list(TASKS[n].test),
                             "labels": TASKS[n].labels, "target_dice": TASKS[n].target_dice} for n in profile.tasks},
               "pretrained": encoder, "runs": runs}
    for key, r in runs.items():  # flat figures the targets are judged on
        if "dice" in r:
            values = [d for case in r["dice"].values() for d in case.values()]
            section[f"{key}_min_dice"] = min((d if d is not None else 0.0) for d in values) if values else None
        section[f"{key}_finetune_s"] = r.get("finetune_s")
    return section
