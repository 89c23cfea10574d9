"""The shared training loop: NaN guard, accumulation, schedule, checkpoints every N steps."""
import itertools
import json
import re

import pytest
import torch

from engine.cli import parse_sets
from engine.config.finetune import build_finetune_config
from engine.config.pretrain import build_config
from engine.config.sections import TrainConfig
from engine.errors import TrainingDiverged
from engine.runtime.progress import Progress
from engine.training.loop import LoopHooks, train_loop
from engine.training.optim import warmup_cosine


def _run(tmp_path, step_fn, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []
    cfg = TrainConfig(**{"steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "lr": 0.1, **cfg})
    batches = iter(itertools.repeat(torch.ones(2, 3)))
    hooks = LoopHooks(Progress("none"), save=lambda s: saved.append(s) or tmp_path, log_path=tmp_path / "log.jsonl")
    result = train_loop(model, opt, cfg, batches, lambda b, p: step_fn(model, b), torch.device("cpu"), 0, hooks)
    return result, saved, model


def test_nan_loss_stops_with_a_clear_message_before_saving(tmp_path):
    def step_fn(model, batch):
        loss = model(batch).mean() * float("nan")
        yield {"loss": loss}, loss
    with pytest.raises(TrainingDiverged, match=r"loss 'loss' became nan at step 1.*--set train.lr=.*--set train.amp=off") as err:
        _run(tmp_path, step_fn)
    assert not (tmp_path / "log.jsonl").exists()
    # the advice works as written: every --set it names is a setting of both stages, of the right type
    flags = re.findall(r"--set (\S+?)\)?[;,]?(?:\s|$)", str(err.value))
    assert flags == ["train.lr=...", "train.amp=off"]
    sets = parse_sets([flag.replace("...", "5e-4") for flag in flags])  # the README's lower learning rate
    for cfg in (build_config("tiny", "mim", sets), build_finetune_config("tiny", overrides=sets)):
        assert (cfg.train.lr, cfg.train.amp) == (5e-4, "off")


def test_checkpoints_every_n_steps_and_at_the_end(tmp_path):
    def step_fn(model, batch):
        loss = (model(batch) - 1).pow(2).mean()
        yield {"loss": loss}, loss
    result, saved, _ = _run(tmp_path, step_fn, steps=5)
    assert result.step == 5 and saved == [2, 4, 5]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert log[-1]["loss"] < log[0]["loss"]


def test_accumulation_averages_micro_batches(tmp_path):
    calls = []

    def step_fn(model, batch):
        calls.append(1)
        loss = model(batch).mean()
        yield {"loss": loss}, loss
    _run(tmp_path, step_fn, steps=2, accumulate=3)
    assert len(calls) == 6


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01
