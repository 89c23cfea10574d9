"""The bf16 autocast path on real CT, forced, so it runs in CI on any CPU (autocast works on every x86 CPU; only
CPUs with AVX-512 BF16 make it fast, and those are where `train.amp: auto` turns it on): every method of
pre-training and fine-tuning, over several seeds, keep finite losses that go down."""
from __future__ import annotations

import json

import numpy as np
import pytest
from engine_testing import crop_ct, require_shared_data, run_engine

from engine.finetuning.run import FinetuneRequest, run_finetune
from engine.pretraining.run import PretrainRequest, run_pretrain

BF16 = {"train.amp": "bf16"}
SEEDS = (0, 1, 2)


def _losses(run, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "log.jsonl").read_text().splitlines()]


def _goes_down(losses: list[float]) -> bool:
    return np.mean(losses[-2:]) < losses[0]


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """Two crops of a real chest CT with heart (1) and aorta (2) labels, and their dataset.json."""
    data = require_shared_data()
    folder = tmp_path_factory.mktemp("bf16-chest")
    for name, size in (("a", (60, 60, 50)), ("b", (56, 64, 46))):
        crop_ct(data / "ts_chest_ct.nii.gz", folder / f"{name}_ct.nii.gz", size)
        crop_ct(data / "ts_chest_label.nii.gz", folder / f"{name}_label.nii.gz", size)
    dataset = folder / "dataset.json"
    run_engine("data", "index", str(folder), "-o", str(dataset), "--labels", "heart=1", "aorta=2", "--folds", "2")
    return dataset


@pytest.mark.parametrize("seed", SEEDS)
def test_finetuning_under_bf16_stays_finite_and_learns(chest, seed, tmp_path):
    run = tmp_path / "run"
    overrides = {**BF16, "augment.flip": 0.0, "augment.rotate90": 0.0, "augment.intensity": 0.0, "val.every": 100,
                 "train.lr": 2e-3}
    run_finetune(FinetuneRequest(str(chest), str(run), preset="tiny", steps=6, fold=0, train_cases=1, seed=seed,
                                 progress="none", overrides=overrides))
    losses = _losses(run, "loss")
    assert np.all(np.isfinite(losses)) and _goes_down(losses), losses
    grad_norms = _losses(run, "grad_norm")
    assert np.all(np.isfinite(grad_norms)) and max(grad_norms) < 1e3, grad_norms  # no garbage gradient (oneDNN)


@pytest.mark.parametrize("method, loss, steps", [("mim", "rec_l1", 6), ("mae", "rec_l1", 6), ("hybridmim", "rec", 4)])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_pretraining_under_bf16_stays_finite_and_learns(ct_dir, method, loss, steps, seed, tmp_path):
    run = tmp_path / "run"
    run_pretrain(PretrainRequest(str(ct_dir), str(run), method=method, preset="tiny", steps=steps, seed=seed,
                                 progress="none", overrides={**BF16, "train.lr": 1e-3, "train.warmup_steps": 1}))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float)), records
    assert max(r["grad_norm"] for r in records) < 1e3, [r["grad_norm"] for r in records]
    assert _goes_down([r[loss] for r in records]), [r[loss] for r in records]
