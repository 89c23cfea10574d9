"""The label-efficiency study runner on tiny settings and real labelled CT (../shared/data/ct-2mm, cropped around
each tumour): it runs end to end through the CLI, records which cases every run used, never lets a test case
into training (checked on the outputs, and the runner's own guard is shown to fire), resumes without redoing
finished runs, and writes the CSV, the plot and the table."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from engine_testing import require_shared_data

from engine.cli import main
from engine.errors import UserError
from engine.study import runs as study_runs
from engine.study.config import load_study_config
from engine.study.data import HeldOutViolation, check_held_out
from engine.study.report import markdown_table, write_plot
from engine.study.run import run_label_efficiency

LABELLED = ("mirp_lung1_001", "pycerr_pat_1", "pycerr_pat_2", "pycerr_pat_3")  # mirp: GTV 1 + cord, lungs 2..4
TEST = ["pycerr_pat_3"]
GRID = {"inits": ["mim", "mae", "scratch"], "train_cases": [1, 2], "seeds": [0, 1]}


def crop_around_tumour(ct: sitk.Image, label: sitk.Image, size: int = 36) -> tuple[sitk.Image, sitk.Image]:
    """A cube of `size` voxels centred on the GTV (value 1), same geometry as the original."""
    zyx = np.argwhere(sitk.GetArrayViewFromImage(label) == 1).mean(0).astype(int)
    start = [int(min(max(0, c - size // 2), n - size)) for c, n in zip(zyx[::-1], label.GetSize())]
    box = tuple(slice(s, s + size) for s in start)
    return ct[box], label[box]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Four labelled lung-tumour crops and one unlabelled crop, named as in ct-2mm."""
    source = require_shared_data()
    folder = tmp_path_factory.mktemp("study-data")
    for name in LABELLED:
        ct, label = crop_around_tumour(sitk.ReadImage(str(source / f"{name}_ct.nii.gz")),
                                       sitk.ReadImage(str(source / f"{name}_label.nii.gz")))
        sitk.WriteImage(ct, str(folder / f"{name}_ct.nii.gz"))
        sitk.WriteImage(label, str(folder / f"{name}_label.nii.gz"))
    unlabelled = sitk.ReadImage(str(source / "pyradiomics_lung2_ct.nii.gz"))
    sitk.WriteImage(unlabelled[50:86, 50:86, 50:86], str(folder / "unlabelled_ct.nii.gz"))
    return folder


def write_config(folder, data, **changes) -> str:
    tree = {"study": "label-efficiency", "data": str(data), "out": str(folder / "unused"),
            "task": {"label": "tumour", "cases": {name: 1 for name in LABELLED}, "test": TEST},
            "pretrain": {"preset": "tiny", "steps": 2}, "finetune": {"preset": "tiny", "steps": 2},
            "evaluate": {"overlap": 0.0}, **GRID, **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture(scope="module")
def study(cases, tmp_path_factory):
    """One tiny study through the CLI: 2 pre-trainings, 12 fine-tuning runs."""
    folder = tmp_path_factory.mktemp("study")
    config = write_config(folder, cases)
    assert main(["study", "label-efficiency", "--config", config, "--out", str(folder / "out"),
                 "--progress", "none"]) == 0
    return folder / "out", config


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_runs_end_to_end_and_writes_csv_plot_table(study):
    out, _ = study
    rows = read_csv(out / "results.csv")
    assert len(rows) == 3 * 2 * 2
    assert {(r["init"], r["n_cases"], r["seed"]) for r in rows} == {
        (i, str(n), str(s)) for i in GRID["inits"] for n in GRID["train_cases"] for s in GRID["seeds"]}
    for row in rows:
        assert 0.0 <= float(row["mean_dice"]) <= 1.0 and float(row["dice_pycerr_pat_3"]) == float(row["mean_dice"])
        assert row["test_cases"] == "pycerr_pat_3" and row["finetune_steps"] == "2"
        assert row["pretrain_steps"] == ("0" if row["init"] == "scratch" else "2")
    assert (out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results_table.md").read_text(encoding="utf-8")
    assert table.startswith("**Test Dice") and "| initialisation | 1 case | 2 cases |" in table
    assert "MiM pre-trained" in table and "Paired difference" in table and "train_dice" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_cases"] == TEST and summary["pretrain"]["mim"]["steps"] == 2


def test_records_cases_and_never_trains_on_a_test_case(study):
    out, _ = study
    pool = sorted(set(LABELLED) - set(TEST))
    for row in read_csv(out / "results.csv"):
        used = json.loads((out / "runs" / row["run"] / "finetune" / "cases.json").read_text())
        names = [case["name"] for case in used["training"]]
        assert row["train_cases"].split(";") == names and len(names) == int(row["n_cases"])
        assert set(names) <= set(pool)
        assert not {case["name"] for case in used["validation"]} & set(TEST)
        assert all("pycerr_pat_3" not in case["image"] for case in used["training"] + used["validation"])
    rows = read_csv(out / "results.csv")
    for n in GRID["train_cases"]:  # every arm trains on the same cases for a given (cases, seed): paired
        for seed in GRID["seeds"]:
            drawn = {r["train_cases"] for r in rows if (r["n_cases"], r["seed"]) == (str(n), str(seed))}
            assert len(drawn) == 1


def test_labels_are_derived_and_never_read_in_pretraining(study, cases):
    out, _ = study
    derived = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "data" / "labels" / "mirp_lung1_001_label.nii.gz")))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(cases / "mirp_lung1_001_label.nii.gz")))
    assert set(np.unique(original)) > {0, 1} and set(np.unique(derived)) == {0, 1}
    assert np.array_equal(derived == 1, original == 1)
    volumes = [item["image"] for item in json.loads((out / "data" / "pretrain.json").read_text())["training"]]
    assert len(volumes) == len(LABELLED) + 1 and not any("_label" in v for v in volumes)
    assert not (out / "runs" / "scratch_n1_seed0" / "finetune" / "weights.json").exists()
    assert json.loads((out / "runs" / "mae_n1_seed0" / "finetune" / "weights.json").read_text())["unexpected"] == []


def test_rerun_skips_finished_runs(study, tmp_path, monkeypatch):
    out, config = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was started again")
    monkeypatch.setattr(study_runs, "run_pretrain", refuse)
    monkeypatch.setattr(study_runs, "run_finetune", refuse)
    run_label_efficiency(config, out=str(copy), progress="none")
    assert read_csv(copy / "results.csv") == read_csv(out / "results.csv")


def test_interrupted_run_continues_alone(study, tmp_path, monkeypatch):
    out, config = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "runs" / "mim_n2_seed0" / "result.json").unlink()  # killed after fine-tuning, before scoring
    calls = []
    real = study_runs.run_finetune

    def counting(request):
        calls.append(request)
        return real(request)
    monkeypatch.setattr(study_runs, "run_finetune", counting)
    run_label_efficiency(config, out=str(copy), progress="none")
    assert len(calls) == 1 and calls[0].resume and calls[0].train_cases == 2 and calls[0].seed == 0
    assert (copy / "runs" / "mim_n2_seed0" / "result.json").exists()


def test_guard_stops_a_run_whose_training_reached_a_test_case(study, tmp_path, monkeypatch):
    out, config = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run = copy / "runs" / "scratch_n1_seed0"
    (run / "result.json").unlink()
    real = study_runs.run_finetune

    def leaky(request):  # as if case selection had drawn the test case
        result = real(request)
        cases = json.loads((run / "finetune" / "cases.json").read_text())
        cases["training"].append({"name": "renamed", "image": str(cases_dir(copy) / "pycerr_pat_3_ct.nii.gz")})
        (run / "finetune" / "cases.json").write_text(json.dumps(cases))
        return result
    monkeypatch.setattr(study_runs, "run_finetune", leaky)
    with pytest.raises(HeldOutViolation, match="renamed"):
        run_label_efficiency(config, out=str(copy), progress="none")
    assert not (run / "result.json").exists()


def cases_dir(out) -> Path:
    return Path(yaml.safe_load((out / "study.yaml").read_text())["data"])


def test_check_held_out_by_name_and_by_file(tmp_path):
    test = [{"name": "t", "image": str(tmp_path / "t_ct.nii.gz")}]
    check_held_out([{"name": "a", "image": str(tmp_path / "a_ct.nii.gz")}], test)
    with pytest.raises(HeldOutViolation):
        check_held_out([{"name": "t", "image": str(tmp_path / "other.nii.gz")}], test)
    with pytest.raises(HeldOutViolation):
        check_held_out([{"name": "x", "image": str(tmp_path / "sub" / ".." / "t_ct.nii.gz")}], test)


def test_bad_settings_are_refused(cases, study, tmp_path):
    with pytest.raises(UserError, match="training pool has 3"):
        load_study_config(write_config(tmp_path, cases, train_cases=[1, 4]))
    with pytest.raises(UserError, match="not in task.cases"):
        load_study_config(write_config(tmp_path, cases), {"task.test": ["nobody"]})
    with pytest.raises(UserError, match="may not set"):
        load_study_config(write_config(tmp_path, cases), {"finetune.overrides": {"train": {"steps": 9}}})
    out, config = study
    with pytest.raises(UserError, match="finetune differ"):
        run_label_efficiency(config, out=str(out), overrides={"finetune.steps": 3}, progress="none")
    for preset in ("tiny", "cpu", "gpu"):
        assert load_study_config(preset).task.test


def test_report_shows_every_seed(tmp_path):
    rows = [{"init": init, "n_cases": n, "seed": seed, "mean_dice": 0.1 * n + 0.01 * seed + (init == "mim") * 0.2
             - (init == "mim" and seed == 2) * 0.25, "train_dice": 0.5 if init == "mim" else None}
            for n in (1, 2, 4) for seed in (0, 1, 2) for init in ("mim", "scratch")]
    table = markdown_table(rows)
    assert "| MiM pre-trained | 0.227 ± 0.136 (0.070–0.310, n=3) |" in table
    assert "| from scratch | 0.110 ± 0.010 (0.100–0.120, n=3) |" in table
    # paired by (cases, seed): +0.2, +0.2, -0.05 -> mean +0.117, higher in 2 of 3 seeds
    assert "| MiM pre-trained | +0.117 (-0.050 to +0.200; 2/3) |" in table
    assert "| MiM pre-trained | 0.500 ± 0.000 (0.500–0.500, n=3) |" in table  # train_dice; scratch's are missing
    assert "| from scratch | n/a | n/a | n/a |" in table
    png = write_plot(rows, tmp_path / "plot.png", "synthetic")
    assert png.read_bytes()[:4] == b"\x89PNG"
