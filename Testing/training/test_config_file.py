"""--config FILE.yaml for `pretrain` and `finetune`: a run's saved config.yaml starts a new run with the same
settings (--steps and --set on top), and clashes with a preset, a method, --resume or other weights are refused."""
from __future__ import annotations

import pytest
import yaml
from engine_testing import run_engine

from engine.cli import main
from engine.errors import UserError
from engine.finetuning.run import FinetuneRequest, run_finetune


def _config(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _without_steps(tree: dict) -> dict:
    return {**tree, "train": {k: v for k, v in tree["train"].items() if k != "steps"}}


def test_a_finetune_run_config_starts_a_new_run_with_its_settings(lung_run, lung_data, tmp_path):
    saved = _config(lung_run)
    assert saved["train"]["lr"] == 0.002 and saved["augment"]["flip"] == 0.0  # the run's --set, not the preset's
    new = tmp_path / "again"
    run_engine("finetune", "--data", str(lung_data), "--config", str(lung_run / "config.yaml"), "--steps", "1",
               "--fold", "0", "--out", str(new), "--progress", "none", "--set", "val.overlap=0.5")
    again = _config(new)
    assert again["train"]["steps"] == 1 and again["val"]["overlap"] == 0.5
    assert _without_steps({**again, "val": saved["val"]}) == _without_steps(saved)
    assert (new / "model.pt").is_file() and (new / "MODEL_CARD.md").is_file()


def test_a_pretrain_run_config_starts_a_new_run_with_its_settings(tiny_pretrain_run, ct_dir, tmp_path):
    saved = _config(tiny_pretrain_run)
    new = tmp_path / "again"
    run_engine("pretrain", "--data", str(ct_dir), "--config", str(tiny_pretrain_run / "config.yaml"), "--steps", "1",
               "--out", str(new), "--progress", "none", "--set", "train.seed=3")
    again = _config(new)
    assert again["train"]["steps"] == 1 and again["train"]["seed"] == 3
    assert _without_steps({**again, "train": {**again["train"], "seed": 0}}) == _without_steps(saved)


def test_config_clashes_are_refused_clearly(lung_run, lung_data, tiny_pretrain_run, ct_dir, tmp_path, capsys):
    config = str(lung_run / "config.yaml")
    base = ["finetune", "--data", str(lung_data), "--out", str(tmp_path / "r"), "--progress", "none"]
    assert main(base + ["--config", config, "--preset", "small"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(ct_dir), "--out", str(tmp_path / "p"), "--method", "mae",
                 "--config", str(tiny_pretrain_run / "config.yaml")]) == 2
    assert "drop --method" in capsys.readouterr().err
    assert main(base + ["--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(base + ["--config", config, "--task", "classification"]) == 2
    assert "pass --task segmentation" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**_config(lung_run), "trian": {"lr": 0.1}}))
    assert main(base + ["--config", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown setting 'trian'" in capsys.readouterr().err
    with pytest.raises(UserError, match="--config starts a new run"):
        run_finetune(FinetuneRequest(str(lung_data), str(lung_run), resume=True, config=config, progress="none"))
    with pytest.raises(UserError, match="describes encoder"):  # a pre-training of another size than the config's
        (tmp_path / "wide.yaml").write_text(yaml.safe_dump(
            {**_config(lung_run), "encoder": {**_config(lung_run)["encoder"], "dims": [24, 48, 96, 192]}}))
        run_finetune(FinetuneRequest(str(lung_data), str(tmp_path / "w"), config=str(tmp_path / "wide.yaml"),
                                     pretrained=str(tiny_pretrain_run / "checkpoint.pt"), progress="none"))
