"""Fine-tuning on real labelled CT (../shared/data/ct-2mm, cropped small): the CLI end to end (data index ->
finetune -> infer -> evaluate) on the tiny presets, from the MiM authors' checkpoint too, the loss going down, resume,
a frozen encoder, a time limit, the default recipe, augmentation that keeps left and right, and classification on
synthetic volumes."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from authors_format import MODEL_NAMES, authors_checkpoint, authors_pretrain_namespace, authors_state_dict
from engine_testing import crop_ct, require_shared_data, run_engine

from engine.cli import main
from engine.config.finetune import DEFAULT_PRESET, build_finetune_config
from engine.errors import UserError
from engine.finetuning.data import IMAGE, LABEL, segmentation_transforms
from engine.finetuning.run import FinetuneRequest, FinetuneResult, run_finetune
from engine.runtime.checkpoint import load_checkpoint

NO_AUGMENT = {"augment.flip": 0.0, "augment.rotate90": 0.0, "augment.intensity": 0.0}


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """Three crops of a real chest CT with heart (1) and aorta (2) labels, and their dataset.json (3 folds)."""
    data = require_shared_data()
    folder = tmp_path_factory.mktemp("chest")
    for name, size in (("a", (60, 60, 50)), ("b", (56, 64, 46)), ("c", (64, 56, 54))):
        crop_ct(data / "ts_chest_ct.nii.gz", folder / f"{name}_ct.nii.gz", size)
        crop_ct(data / "ts_chest_label.nii.gz", folder / f"{name}_label.nii.gz", size)
    dataset = folder / "dataset.json"
    run_engine("data", "index", str(folder), "-o", str(dataset), "--labels", "heart=1", "aorta=2", "--folds", "3")
    return dataset


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_end_to_end_on_real_ct(chest, tiny_pretrain_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--task", "segmentation", "--data", str(chest), "--preset", "tiny", "--steps", "3",
                 "--pretrained", str(tiny_pretrain_run / "checkpoint.pt"), "--fold", "0", "--train-cases", "1",
                 "--set", "val.every=2", "--out", str(run), "--progress", "json"]) == 0
    events = _events(capsys.readouterr().out)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["stage"] == "finetune" for e in steps)
    assert all(np.isfinite(e["losses"]["loss"]) for e in steps)
    validated = [e for e in steps if "metrics" in e]
    assert [e["step"] for e in validated] == [2, 3]  # every 2 steps, and after the last
    assert set(validated[-1]["metrics"]) == {"val_mean_dice", "dice/heart", "dice/aorta"}
    assert events[-1]["event"] == "done" and events[-1]["path"] == str(run / "model.pt")

    cases = json.loads((run / "cases.json").read_text())
    assert (cases["fold"], cases["train_cases"], len(cases["training"]), len(cases["validation"])) == (0, 1, 1, 1)
    report = json.loads((run / "weights.json").read_text())
    assert report["family"] == "mimslicer" and report["unexpected"] == []
    assert all(not k.startswith("encoder.") or k == "encoder.pos_embed" for k in report["missing"])
    assert yaml.safe_load((run / "config.yaml").read_text())["encoder"]["dims"] == [12, 24, 48, 96]
    model = load_checkpoint(run / "model.pt")
    assert model["kind"] == "segmentation" and model["labels"] == {"background": 0, "heart": 1, "aorta": 2}
    assert (model["spacing"], model["hu_window"], model["roi"]) == ([3.0, 3.0, 3.0], [-1000, 1000], 32)
    assert set(model["largest_component"]) <= {"heart", "aorta"}  # chosen on validation, applied by infer

    held_out = cases["validation"][0]  # not trained on
    pred = tmp_path / "pred" / "held_out.seg.nrrd"
    assert main(["infer", "--checkpoint", str(run / "model.pt"), "--input", held_out["image"],
                 "--output", str(pred), "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--ref", held_out["label"], "--labels", str(chest),
                 "--out", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["labels"]) == {"heart", "aorta"}
    scores = next(iter(metrics["cases"].values()))
    assert all(0.0 <= scores[name]["dice"] <= 1.0 for name in ("heart", "aorta"))
    ref = sitk.ReadImage(held_out["label"])
    out = sitk.ReadImage(str(pred))
    assert out.GetSize() == ref.GetSize() and np.allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-9)


def test_finetune_from_the_authors_checkpoint_then_infer(chest, tmp_path, capsys):
    """Their checkpoint-final.pth (tiny, their real format): the run uses the encoder variant that computes theirs,
    records it in config.yaml and model.pt, and `infer` rebuilds that network from model.pt."""
    authors = tmp_path / "checkpoint-final.pth"
    torch.save(authors_checkpoint(authors_state_dict("tiny", fill="random"),
                                  authors_pretrain_namespace(model_name=MODEL_NAMES["tiny"])), authors)
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(chest), "--preset", "tiny", "--steps", "1", "--pretrained", str(authors),
                 "--fold", "0", "--train-cases", "1", "--out", str(run), "--progress", "none"]) == 0
    report = json.loads((run / "weights.json").read_text())
    assert report["family"] == "mim-authors" and report["unexpected"] == []
    assert {"encoder.token_proj.weight", "encoder.pos_embed"} <= set(report["loaded"])
    encoder = yaml.safe_load((run / "config.yaml").read_text())["encoder"]
    assert (encoder["variant"], encoder["num_heads"], encoder["depths"]) == ("authors", 3, [2, 2, 2, 11])
    model = load_checkpoint(run / "model.pt")
    assert model["config"]["encoder"]["variant"] == "authors" and "encoder.token_proj.weight" in model["model"]
    held_out = json.loads((run / "cases.json").read_text())["validation"][0]
    assert main(["infer", "--checkpoint", str(run / "model.pt"), "--input", held_out["image"],
                 "--output", str(tmp_path / "pred.seg.nrrd"), "--progress", "none"]) == 0
    capsys.readouterr()


def test_a_few_steps_on_one_real_case_lower_the_loss(chest, tiny_pretrain_run, tmp_path):
    """Four steps on crops centred on the structures (background centres, drawn from the air around the body too,
    make four steps too few to compare)."""
    run = tmp_path / "run"
    settings = {**NO_AUGMENT, "val.every": 100, "train.lr": 2e-3, "crop.neg": 0.0}
    run_finetune(FinetuneRequest(str(chest), str(run), pretrained=str(tiny_pretrain_run / "checkpoint.pt"),
                                 preset="tiny", steps=4, fold=0, train_cases=1, progress="none", overrides=settings))
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4
    assert np.mean(losses[-2:]) < 0.85 * losses[0], losses


def test_resume_continues_and_freeze_keeps_the_encoder(chest, tiny_pretrain_run, tmp_path, capsys):
    run = tmp_path / "run"
    pretrained = load_checkpoint(tiny_pretrain_run / "checkpoint.pt")["model"]
    args = ["finetune", "--data", str(chest), "--pretrained", str(tiny_pretrain_run / "checkpoint.pt"), "--preset",
            "tiny", "--out", str(run), "--fold", "1", "--progress", "none", "--freeze-encoder"]
    assert main(args + ["--steps", "1"]) == 0
    assert main(args + ["--steps", "1"]) == 2  # the run folder is taken
    assert "already holds a run" in capsys.readouterr().err
    resume = ["finetune", "--data", str(chest), "--out", str(run), "--resume", "--steps", "2", "--progress", "none"]
    assert main(resume) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    final = load_checkpoint(run / "checkpoint.pt")
    assert final["step"] == 2 and final["config"]["freeze_encoder"] is True
    qkv = "encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(final["model"][qkv], pretrained[qkv])  # frozen
    assert load_checkpoint(run / "model.pt")["step"] == final["best"]["step"]  # model.pt: the best validation


def test_bad_requests_fail_clearly(chest, tmp_path):
    with pytest.raises(UserError, match="--train-cases 5"):
        run_finetune(FinetuneRequest(str(chest), str(tmp_path / "r"), train_cases=5, fold=0, progress="none"))
    with pytest.raises(UserError, match="Did you mean 'segmentation'"):
        run_finetune(FinetuneRequest(str(chest), str(tmp_path / "r"), task="segmentaton", progress="none"))
    with pytest.raises(UserError, match="unknown setting 'model.rio'"):
        run_finetune(FinetuneRequest(str(chest), str(tmp_path / "r"), overrides={"model.rio": 64}, progress="none"))
    assert main(["finetune", "--data", str(chest), "--out", str(tmp_path / "r"), "--resume"]) == 2


def test_classification_on_synthetic_volumes(tmp_path, capsys):
    rows = ["image,label,fold"]
    rng = np.random.default_rng(0)
    for i in range(4):
        hu = np.full((24, 24, 24), -1000, np.int16)
        hu[3:-3, 3:-3, 3:-3] = rng.normal(0, 20, (18, 18, 18)).astype(np.int16)
        if i % 2:
            hu[8:16, 8:16, 8:16] = 900  # "dense": a bright cube
        sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / f"v{i}.nii.gz"))
        rows.append(f"v{i}.nii.gz,{'dense' if i % 2 else 'clear'},{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["finetune", "--task", "classification", "--data", str(tmp_path / "labels.csv"), "--fold", "1",
                 "--preset", "tiny", "--steps", "2", "--out", str(run), "--progress", "json"]) == 0
    steps = [e for e in _events(capsys.readouterr().out) if e["event"] == "step"]
    assert set(steps[-1]["metrics"]) == {"val_auc", "val_accuracy", "val_cases"}
    assert steps[-1]["metrics"]["val_cases"] == 2
    model = load_checkpoint(run / "model.pt")
    assert model["kind"] == "classification" and model["classes"] == ["clear", "dense"]


@pytest.fixture(scope="module")
def pretrained_4mm(ct_dir, tmp_path_factory):
    """A tiny pre-training run on real CT at a spacing and window that no fine-tuning preset has."""
    out = tmp_path_factory.mktemp("pretrain4mm") / "run"
    run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "1", "--out", str(out),
               "--set", "data.spacing=[4,4,4]", "--set", "data.hu_window=[-500,500]", "--progress", "none")
    return out / "checkpoint.pt"


def _finetune_data_records(run):
    config = yaml.safe_load((run / "config.yaml").read_text())
    weights = json.loads((run / "weights.json").read_text())
    return config, weights


def test_fine_tuning_sees_the_spacing_and_window_of_pre_training(chest, pretrained_4mm, tmp_path):
    """No --set data.*: the tiny preset's 3 mm and [-1000, 1000] give way to the checkpoint's, silently."""
    run = tmp_path / "run"
    result = run_engine("finetune", "--data", str(chest), "--pretrained", str(pretrained_4mm), "--preset", "tiny",
                        "--steps", "1", "--fold", "0", "--train-cases", "1", "--out", str(run), "--progress", "none")
    assert "pre-trained" not in result.stderr, result.stderr
    config, weights = _finetune_data_records(run)
    seen = {"spacing": [4.0, 4.0, 4.0], "hu_window": [-500.0, 500.0]}
    assert config["data"]["spacing"] == seen["spacing"] and config["data"]["hu_window"] == seen["hu_window"]
    assert config["pretrained_data"] == seen
    assert weights["pretrained_data"] == seen and weights["data"] == seen
    model = load_checkpoint(run / "model.pt")
    assert (model["spacing"], model["hu_window"]) == (seen["spacing"], seen["hu_window"])  # what inference uses


def test_a_window_other_than_pre_trainings_is_warned_once_and_recorded(chest, pretrained_4mm, tmp_path):
    run = tmp_path / "run"
    result = run_engine("finetune", "--data", str(chest), "--pretrained", str(pretrained_4mm), "--preset", "tiny",
                        "--steps", "1", "--fold", "0", "--train-cases", "1", "--out", str(run), "--progress", "none",
                        "--set", "data.hu_window=[-175,250]")
    warnings = [line for line in result.stderr.splitlines() if "pre-trained" in line]
    assert len(warnings) == 1, result.stderr
    assert "data.hu_window=[-175.0, 250.0]" in warnings[0] and "hu_window [-500.0, 500.0]" in warnings[0]
    assert "spacing" not in warnings[0]  # the spacing still follows the checkpoint
    config, weights = _finetune_data_records(run)
    assert config["data"]["hu_window"] == [-175.0, 250.0] and config["data"]["spacing"] == [4.0, 4.0, 4.0]
    assert config["pretrained_data"] == {"spacing": [4.0, 4.0, 4.0], "hu_window": [-500.0, 500.0]}
    assert weights["data"] == {"spacing": [4.0, 4.0, 4.0], "hu_window": [-175.0, 250.0]}
    assert weights["pretrained_data"] == config["pretrained_data"]


def test_time_limit_is_honoured_and_recorded(chest, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["finetune", "--data", str(chest), "--preset", "tiny", "--fold", "0", "--out", str(run)]
    t0 = time.monotonic()
    assert main([*args, "--time-limit", "0.5", "--progress", "json"]) == 0
    elapsed = time.monotonic() - t0
    # the budget counts from reading the data; a little slack for the exit. Steps timed on cores that other work
    # shares can take several times longer later on, which no plan can foresee: there only the rest is checked
    oversubscribed = os.getloadavg()[0] > os.cpu_count()
    assert elapsed < 30 + 10 or oversubscribed, elapsed
    events = _events(capsys.readouterr().out)
    plans = [e for e in events if e["event"] == "plan"]  # the first, then any re-plan within the warm-up
    plan = plans[-1]
    steps = plan["steps"]
    assert steps >= 2 and plan["step_s"] > 0 and plan["validate_s"] > 0
    assert all("time_left_s" in e for e in events)
    left = [e["time_left_s"] for e in events]
    assert left == sorted(left, reverse=True) and left[0] <= 30
    assert all(e["total"] == steps for e in events if e["event"] in ("checkpoint", "done"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["steps"] == steps and config["train"]["time_limit"] == 0.5
    model = load_checkpoint(run / "model.pt")
    assert model["config"]["train"]["steps"] == steps
    done = events[-1]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert done["event"] == "done" and done["step"] == len(log) <= steps
    assert len(log) == steps or "time limit ended the run" in done["message"]

    # --resume keeps the steps the first run chose; it may not ask for another time limit
    assert main([*args, "--resume", "--time-limit", "1", "--progress", "none"]) == 2
    assert "drop --time-limit" in capsys.readouterr().err
    assert main([*args, "--resume", "--steps", str(len(log) + 1), "--progress", "none"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == len(log) + 1


def test_the_default_preset_is_the_cpu_recipe_not_the_test_preset(monkeypatch, tmp_path, capsys):
    asked = []
    monkeypatch.setattr("engine.finetuning.run.run_finetune",
                        lambda request: asked.append(request) or FinetuneResult(0, tmp_path / "model.pt", {}))
    assert main(["finetune", "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "r")]) == 0
    assert asked[0].preset == DEFAULT_PRESET == FinetuneRequest("d", "o").preset != "tiny"
    cfg = build_finetune_config(DEFAULT_PRESET)
    assert cfg.model.roi * cfg.data.spacing[0] >= 200  # a window wide enough to tell right from left (mm)
    assert 0 not in cfg.augment.flip_axes and 0 not in cfg.augment.rotate90_axes


def _two_sided_case(folder) -> dict:
    """A body whose right half (RAS x < 0 side) is labelled 1 and left half 2, on a 3 mm grid."""
    hu = np.zeros((20, 20, 30), np.int16)  # [z, y, x]
    label = np.zeros_like(hu, dtype=np.uint8)
    label[4:16, 4:16, 3:15], label[4:16, 4:16, 15:27] = 1, 2
    paths = {}
    for key, array in ((IMAGE, hu), (LABEL, label)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.0, 3.0, 3.0))
        paths[key] = str(folder / f"{key}.nii.gz")
        sitk.WriteImage(image, paths[key])
    return paths


def _label_sides(sample) -> float:
    """Mean x of label 1 minus mean x of label 2 (model grid): its sign says which side label 1 lies on."""
    label = np.asarray(sample[LABEL])[0]
    x = np.arange(label.shape[0])[:, None, None]
    return float((x * (label == 1)).sum() / (label == 1).sum() - (x * (label == 2)).sum() / (label == 2).sum())


def test_segmentation_augmentation_keeps_right_and_left_by_default(tmp_path):
    """Flip and rotate at every chance: the default axes never move a right-sided label to the left. With the old
    augmentation (a flip on every axis, rotations in the axial plane) this fails."""
    case = _two_sided_case(tmp_path)
    always = {"augment.flip": 1.0, "augment.rotate90": 1.0, "crop.samples": 4}
    cfg = build_finetune_config("tiny", overrides=always)
    truth = np.sign(_label_sides(segmentation_transforms(cfg, [0, 1, 2], train=False)(case)))
    train = segmentation_transforms(cfg, [0, 1, 2], train=True)
    train.set_random_state(seed=0)
    sides = [np.sign(_label_sides(sample)) for _ in range(5) for sample in train(case)]
    assert truth != 0 and all(side == truth for side in sides)
    old = build_finetune_config("tiny", overrides={**always, "augment.flip_axes": [0, 1, 2],
                                                   "augment.rotate90_axes": [0, 1]})
    old_train = segmentation_transforms(old, [0, 1, 2], train=True)
    old_train.set_random_state(seed=0)
    assert any(np.sign(_label_sides(sample)) != truth for _ in range(5) for sample in old_train(case))
