"""The resource pre-flight on real CT cropped small: estimates against the peak memory really used (in fresh
processes), refusals under MIM_MEMORY_LIMIT_GB (one line, exit 2, nothing left behind, a setting that fits),
`infer --dry-run` (writes nothing, predicts the time of the real run), the tile-batch picker, the window count
against MONAI's own sliding window, the meta-device trace against a real one, and reading cgroup limits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn
from engine_testing import CT_2MM, REPO, SHARED_DATA, crop_ct, require_shared_data
from monai.data import MetaTensor

from engine.cli import main, parse_sets
from engine.config.finetune import build_finetune_config
from engine.config.pretrain import build_config
from engine.data.labelled import index_folder, load_dataset, select_cases
from engine.errors import UserError
from engine.finetuning.preflight import _with_config, finetune_alternatives, finetune_estimate
from engine.finetuning.segmentation import SegmentationTask
from engine.imageio.geometry import model_grid_size, to_model_grid
from engine.imageio.volumes import read_input
from engine.inference.preflight import InferencePreflight, check_volume, count_windows
from engine.inference.run import InferenceSettings, SegmentationPredictor, sliding_window_probabilities
from engine.models import build_pretrainer
from engine.models.segmenter import build_segmenter
from engine.pretraining.preflight import pretrain_alternatives, pretrain_estimate
from engine.pretraining.step import step_function
from engine.runtime.atomic import write_json
from engine.runtime.checkpoint import save_checkpoint
from engine.runtime.memory import LIMIT_ENV, MARGIN, available_memory_bytes, cgroup_available, traced
from engine.training.preflight import meta_batch, training_step_peak

# Estimate / measured rise of the peak resident set (VmHWM), on a 2-core x86 machine (torch 2.13, glibc), over 19 tiny
# and small runs of every command (pre-training of each method, fine-tuning on crops and whole CTs, inference up to
# 512x512x134): 0.76-1.19. The same run's peak varies by up to 20% from one try to the next.
LOW, HIGH = 0.65, 1.6
SPACING = 4.0  # the test model's grid: few windows, fast


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny segmentation model.pt (random weights: memory and time do not depend on them)."""
    cfg = build_finetune_config("tiny")
    labels = {"background": 0, "heart": 1, "aorta": 2}
    net = build_segmenter("hybrid", cfg.encoder, cfg.model.roi, len(labels), cfg.model.feature_size)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, kind="segmentation", config=cfg.to_dict(), model=net, step=1,
                    extra={"labels": labels, "spacing": [SPACING] * 3, "hu_window": [-1000, 1000], "roi": 32})
    return path


@pytest.fixture(scope="module")
def native_ct(tmp_path_factory):
    """A real CT at its native resolution (1.5 mm), cropped to 200x160x140 voxels: buffers large enough to matter,
    36 windows at the test model's 4 mm."""
    require_shared_data()
    return crop_ct(SHARED_DATA / "ct-native" / "ts_chest_ct.nii.gz",
                   tmp_path_factory.mktemp("native") / "chest_ct.nii.gz", size=(200, 160, 140))


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """Two crops of a real chest CT with heart and aorta labels, and their dataset.json (2 folds)."""
    require_shared_data()
    folder = tmp_path_factory.mktemp("chest")
    for name, size in (("a", (60, 60, 50)), ("b", (56, 64, 46))):
        crop_ct(CT_2MM / "ts_chest_ct.nii.gz", folder / f"{name}_ct.nii.gz", size)
        crop_ct(CT_2MM / "ts_chest_label.nii.gz", folder / f"{name}_label.nii.gz", size)
    dataset = folder / "dataset.json"
    write_json(index_folder(folder, dataset, labels={"background": 0, "heart": 1, "aorta": 2}, folds=2),
                      dataset)
    return dataset


def _probe(*args: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "Testing" / "runtime" / "preflight_probe.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, amp", [("infer", ""), ("infer", "uncertainty"), ("finetune", "off"),
                                       ("finetune", "bf16"), ("pretrain", "off"), ("pretrain", "bf16")])
def test_estimate_is_within_a_factor_of_the_measured_peak(kind, amp, model, native_ct, chest, ct_dir, tmp_path,
                                                          monkeypatch):
    """Training in both precisions on any CPU: bf16 autocast runs on every x86 CPU (fast where it has AVX-512 BF16);
    inference with and without the uncertainty map."""
    monkeypatch.setenv("PROBE_AMP", amp if kind != "infer" else "")
    monkeypatch.setenv("PROBE_UNCERTAINTY", "1" if amp == "uncertainty" else "0")
    args = {"infer": (str(model), str(native_ct), str(tmp_path / "seg.nii.gz")),
            "finetune": (str(chest), str(tmp_path / "run")), "pretrain": (str(ct_dir), str(tmp_path / "run"))}[kind]
    measured = _probe(kind, *args)
    ratio = measured["estimate"] / measured["increase"]
    assert LOW <= ratio <= HIGH, f"{kind} {amp}: estimate {measured['estimate'] / 1e6:.0f} MB, " \
                                 f"measured {measured['increase'] / 1e6:.0f} MB"


def _one_error_line(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_commands_refuse_what_does_not_fit(model, native_ct, chest, ct_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LIMIT_ENV, "0.05")
    out = tmp_path / "out"
    line = _one_error_line(["pretrain", "--data", str(ct_dir), "--out", str(out), "--steps", "1"], capsys)
    assert "pre-training mim (tiny preset) would need about" in line and "0.05 GB is available (" + LIMIT_ENV in line
    assert "--skip-memory-check" in line and "nothing smaller of this preset fits" in line
    line = _one_error_line(["finetune", "--data", str(chest), "--out", str(out), "--steps", "1"], capsys)
    assert "fine-tuning segmentation (fast preset) would need about" in line  # the default recipe
    line = _one_error_line(["infer", "--checkpoint", str(model), "--input", str(native_ct), "--output",
                            str(out / "seg.nii.gz")], capsys)
    assert f"segmenting {native_ct.name} (tile batch 1) would need about" in line and "free memory" in line
    assert not out.exists(), "a refused command leaves nothing behind"


def test_finetune_refusal_names_a_setting_that_fits(chest, tmp_path, monkeypatch, capsys):
    dataset = load_dataset(chest)
    cases = select_cases(dataset, 0, None, 0)
    asked = finetune_estimate(SegmentationTask(build_finetune_config("tiny"), dataset, cases)).host
    fewer = finetune_estimate(SegmentationTask(build_finetune_config("tiny", overrides={"crop.samples": 1}),
                                               dataset, cases)).host
    assert fewer < asked
    monkeypatch.setenv(LIMIT_ENV, str((asked + fewer) / 2 / MARGIN / 1e9))
    out = tmp_path / "run"
    line = _one_error_line(["finetune", "--data", str(chest), "--preset", "tiny", "--fold", "0", "--out", str(out)],
                           capsys)
    assert f"--set crop.samples=1 would need about {fewer / 1e9:.2f} GB" in line
    assert not out.exists()


def test_dry_run_writes_nothing_and_predicts_the_time(model, native_ct, tmp_path, capsys):
    output = tmp_path / "out" / "seg.nii.gz"
    argv = ["infer", "--checkpoint", str(model), "--input", str(native_ct), "--output", str(output)]
    assert main([*argv, "--dry-run", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    grid = to_model_grid(sitk.ReadImage(str(native_ct)), (SPACING,) * 3)
    assert record["grid_size"] == list(grid.GetSize()) and record["fits"] and record["tile_batch"] == 2
    assert record["windows"] == count_windows(tuple(record["box_size"]), 32, 0.5) >= 20
    assert 0 < record["peak_gb"] < 1 and record["seconds"]["total"] > 0
    assert main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"windows: {record['windows']}, tile batch 2" in text and "predicted peak" in text
    assert main([*argv, "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    real = next(e for e in events if e["event"] == "step")["losses"]["seconds"]
    assert output.exists()
    if os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):  # other processes took the cores between the two timings
        pytest.skip(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: the time prediction "
                    "(timed a moment earlier) cannot be compared with the run's")
    assert 1 / 3 <= record["seconds"]["total"] / real <= 3, f"predicted {record['seconds']}, took {real} s"


def test_tile_batch_is_lowered_to_fit(model, native_ct, tmp_path, monkeypatch, capsys):
    predictor = SegmentationPredictor.from_checkpoint(model, InferenceSettings(device="cpu"))
    preflight = InferencePreflight(predictor)
    image, _ = read_input(native_ct)
    prepared = predictor.model_grid(image)
    one, two = (preflight.plan(image, prepared, False, b, {"host": 10**12}).estimate.host for b in (1, 2))
    assert two > one
    between = {"host": int((one + two) / 2 / MARGIN)}
    plan = preflight.plan(image, prepared, False, None, between)
    assert (plan.tile_batch, plan.auto_batch) == (1, True)
    assert preflight.plan(image, prepared, False, None, {"host": 10**12}).tile_batch == 2
    with pytest.raises(UserError, match="--sw-batch-size 1"):  # asked for explicitly: refused, not lowered
        check_volume(preflight.plan(image, prepared, False, 2, between), native_ct.name)
    monkeypatch.setenv(LIMIT_ENV, str(between["host"] / 1e9))
    output = tmp_path / "seg.nii.gz"
    assert main(["infer", "--checkpoint", str(model), "--input", str(native_ct), "--output", str(output),
                 "--progress", "json"]) == 0
    memory = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"memory"' in line]
    assert memory[0]["tile_batch"] == 1 and memory[0]["tile_batch_auto"] and output.exists()


class Counter(nn.Module):
    """Counts the windows the sliding window runs; predicts background everywhere."""

    def __init__(self):
        super().__init__()
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return torch.cat([torch.ones_like(x), torch.zeros_like(x)], 1)


@pytest.mark.parametrize("size,overlap", [((37, 20, 9), 0.5), ((64, 64, 64), 0.5), ((100, 33, 70), 0.25),
                                          ((32, 32, 32), 0.75)])
def test_window_count_is_monais(size, overlap):
    counter = Counter()
    sliding_window_probabilities(counter, torch.zeros(1, 1, *size), roi=16, overlap=overlap, sw_batch_size=3)
    assert count_windows(size, 16, overlap) == counter.windows


@pytest.mark.parametrize("method", ["mim", "mae", "hybridmim"])
def test_meta_device_trace_equals_a_real_one(method):
    """The estimate runs the step on the meta device; the same step on real CPU tensors holds the same bytes."""
    cfg = build_config("tiny", method, {"hybridmim.dropout": 0.0, "mask.roi": 32})  # HybridMIM's smallest ROI
    peaks = []
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = build_pretrainer(cfg)
        shape = (cfg.data.batch_size, 1, *(cfg.crop_size,) * 3)
        batch = meta_batch(shape) if device == "meta" else {"image": MetaTensor(torch.zeros(shape))}
        step = step_function(model, cfg, torch.device(device), torch.Generator().manual_seed(0))
        peaks.append(training_step_peak(model, step, batch).peak)
    assert peaks[0] == pytest.approx(peaks[1], rel=1e-4) and peaks[0] > 0  # a scalar or two may differ


def test_tracker_counts_new_storage_once_and_frees_it():
    x = torch.zeros(1000)

    def work():
        y = x * 2  # 4000 bytes
        z = y.view(10, 100).add_(1)  # a view and an in-place op: no new memory
        del y
        w = z + 1  # 4000 more while z lives
        return w
    assert traced(work).peak == 8000


def test_available_memory_reads_cgroup_limits_and_the_override(tmp_path, monkeypatch):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/job\n")
    job = tmp_path / "sys" / "job"
    job.mkdir(parents=True)
    (job / "memory.max").write_text(f"{3 * 2**30}\n")
    (job / "memory.current").write_text(f"{2**30}\n")
    (job / "memory.stat").write_text(f"anon 123\ninactive_file {2**29}\n")
    assert cgroup_available(tmp_path / "sys", membership) == 3 * 2**30 - 2**29  # page cache is reclaimable
    (job / "memory.max").write_text("max\n")
    assert cgroup_available(tmp_path / "sys", membership) is None
    v1 = tmp_path / "sys" / "memory" / "job"
    v1.mkdir(parents=True)
    membership.write_text("4:memory:/job\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert cgroup_available(tmp_path / "sys", membership) == 2**30
    monkeypatch.setenv(LIMIT_ENV, "0.5")
    assert available_memory_bytes("cpu") == 5 * 10**8
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(UserError, match=LIMIT_ENV):
        available_memory_bytes("cpu")


def test_model_grid_size_from_the_header_matches_resampling():
    image = sitk.Image([40, 30, 12], sitk.sitkInt16)
    image.SetSpacing((0.9, 1.3, 3.5))
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))  # permuted and flipped axes
    spacing = (1.5, 2.0, 3.0)
    assert model_grid_size(image.GetSize(), image.GetSpacing(), image.GetDirection(), spacing) == \
        tuple(to_model_grid(image, spacing).GetSize())


# --- the alternatives a refusal may name: each one a setting that validates and runs ------------------------

def _rebuilt(flags: str, build):
    """The config a user gets by pasting `flags` (`--set K=V ...`) after the same command."""
    return build(parse_sets(flags.replace("--set ", "").split()))


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
@pytest.mark.parametrize("method", ["mim", "mae", "hybridmim"])
def test_every_pretraining_alternative_validates_and_runs(method, preset, ct_dir):
    items = [{"image": str(path)} for path in sorted(ct_dir.glob("*_ct.nii.gz"))]
    for asked in ({}, {"data.batch_size": 4}):  # the preset's batch, and one with room to lower it
        cfg = build_config(preset, method, asked)
        offered = pretrain_alternatives(cfg)
        assert offered and all(flags.startswith("--set ") for flags, _ in offered)
        for flags, changed in offered:
            rebuilt = _rebuilt(flags, lambda sets, asked=asked: build_config(preset, method, {**asked, **sets}))
            assert rebuilt == changed, flags
            if method == "hybridmim":  # its contrastive term is exactly 0 with one crop per batch
                assert rebuilt.data.batch_size >= 2 and rebuilt.mask.roi % 32 == 0, flags
            if method != "mim":  # MiM's traces take minutes on base; its alternatives are traced by the refusals
                assert pretrain_estimate(rebuilt, items).host > 0, flags
        roi = [changed.mask.roi for _, changed in offered if changed.mask.roi != cfg.mask.roi]
        assert roi == sorted(roi, reverse=True) and all(r < cfg.mask.roi for r in roi)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
@pytest.mark.parametrize("task,backbone", [("segmentation", "hybrid"), ("classification", "hybrid"),
                                           ("segmentation", "swinunetr"), ("classification", "swinunetr")])
def test_every_finetuning_alternative_validates_and_runs(preset, task, backbone, chest):
    asked = {"model.backbone": backbone, "data.batch_size": 2}
    if backbone == "swinunetr":
        asked["model.roi"] = 64 if preset == "tiny" else 96  # SwinUNETR: divisible by 32, at least 64
    cfg = build_finetune_config(preset, task, overrides=asked)
    dataset = load_dataset(chest)
    job = SegmentationTask(cfg, dataset, select_cases(dataset, 0, None, 0))
    for flags, changed in finetune_alternatives(cfg):
        assert _rebuilt(flags, lambda sets: build_finetune_config(preset, task, overrides={**asked, **sets})) == changed
        if task == "segmentation" and backbone == "hybrid":  # SwinUNETR cannot be built on the meta device
            assert finetune_estimate(_with_config(job, changed)).host > 0, flags


def test_hybridmim_settings_that_cannot_train_are_refused(ct_dir, tmp_path, capsys):
    with pytest.raises(UserError, match=r"HybridMIM needs mask.roi divisible by 32.*got 48 \(e.g. --set mask.roi=32\)"):
        build_config("base", "hybridmim", {"mask.roi": 48})
    with pytest.raises(UserError, match="HybridMIM needs data.batch_size >= 2"):
        build_config("tiny", "hybridmim", {"data.batch_size": 1})
    with pytest.raises(UserError, match="HybridMIM on the hybrid encoder needs a patch of 16"):
        build_config("tiny", "hybridmim", {"hybridmim.backbone": "hybrid", "encoder.strides": [2, 2, 2, 1]})
    build_config("tiny", "mim", {"data.batch_size": 1})  # MiM and MAE train on one crop
    line = _one_error_line(["pretrain", "--data", str(ct_dir), "--method", "hybridmim", "--set", "data.batch_size=1",
                            "--out", str(tmp_path / "run")], capsys)
    assert "HybridMIM needs data.batch_size >= 2" in line and not (tmp_path / "run").exists()


def test_hybridmim_refusal_names_a_batch_that_trains(ct_dir, tmp_path, monkeypatch, capsys):
    """Too little memory for 4 crops: the refusal names the smallest batch HybridMIM trains with, 2, and that
    setting, pasted after the same command, runs."""
    items = [{"image": str(path)} for path in sorted(ct_dir.glob("*_ct.nii.gz"))]
    asked = pretrain_estimate(build_config("tiny", "hybridmim", {"data.batch_size": 4}), items).host
    fewer = pretrain_estimate(build_config("tiny", "hybridmim", {"data.batch_size": 2}), items).host
    assert fewer < asked
    monkeypatch.setenv(LIMIT_ENV, str((asked + fewer) / 2 / MARGIN / 1e9))
    command = ["pretrain", "--data", str(ct_dir), "--method", "hybridmim", "--steps", "1", "--progress", "none",
               "--set", "data.batch_size=4"]
    line = _one_error_line(command + ["--out", str(tmp_path / "refused")], capsys)
    assert "--set data.batch_size=2 would need about" in line and "batch_size=1" not in line
    flags = line.split("; ")[-1].split(" would need")[0].split()
    assert flags == ["--set", "data.batch_size=2"]
    assert main(command + flags + ["--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_finetune_counts_bf16_where_the_cpu_only_emulates_it(chest, monkeypatch):
    """bf16 autocast on a CPU without bf16 instructions converts in every kernel (measured: 1.8x the fp32 trace);
    with them the fp32 trace stays the bound. `auto` there runs fp32 and bf16 steps (training.precision)."""
    import engine.finetuning.preflight as finetune_preflight
    dataset = load_dataset(chest)
    cases = select_cases(dataset, 0, None, 0)

    def step_estimate(amp: str, fast: bool) -> int:
        monkeypatch.setattr(finetune_preflight, "cpu_has_fast_bf16", lambda: fast)
        cfg = build_finetune_config("tiny", overrides={"train.amp": amp})
        return dict(finetune_estimate(SegmentationTask(cfg, dataset, cases)).parts)["step"]

    fp32 = step_estimate("off", False)
    assert step_estimate("bf16", True) == fp32 == step_estimate("auto", True)
    assert step_estimate("bf16", False) > fp32 * 1.5


def test_bf16_allowance_doubles_a_small_step_and_is_capped_at_scale():
    """Measured: under CPU bf16 a MiM tiny step's peak doubled; at `base` size it did not grow (HybridMIM UNet with
    full reconstruction 9.2 GB against 13.1 GB in fp32), so a 24 GB machine is not told it needs 25 GB."""
    from engine.runtime.memory import Activations
    from engine.training.preflight import CPU_BF16_EXTRA_CAP, bf16_step
    small = Activations(20 * 2**20, 5 * 2**20)
    assert bf16_step(small) == Activations(40 * 2**20, 10 * 2**20)
    large = Activations(12 * 2**30, 2**30)
    assert bf16_step(large) == Activations(12 * 2**30 + CPU_BF16_EXTRA_CAP, 2**30 + CPU_BF16_EXTRA_CAP)


def test_uncertainty_is_a_phase_of_its_own_on_the_input_grid():
    """`--uncertainty` builds the entropy on the input grid after the labelmap: for a 512x512x134 CT segmented at 4 mm
    it is the peak (measured on a cropped CT: 155 MB estimated against 154 MB; without the phase 131 MB)."""
    from engine.inference.preflight import VolumeShape, buffer_phases
    shape = VolumeShape((512, 512, 134), 2, (128, 128, 134), (100, 80, 120))
    plain = buffer_phases(shape, 3, 64, tta=False, probabilities=False)
    with_map = buffer_phases(shape, 3, 64, tta=False, probabilities=False, uncertainty=True)
    assert "uncertainty" not in plain and {k: v for k, v in with_map.items() if k != "uncertainty"} == plain
    assert with_map["uncertainty"] > max(plain.values())
