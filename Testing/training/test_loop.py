"""The shared training loop: NaN guard, skipped steps, accumulation, schedule, checkpoints every N steps, and the
time budget's arithmetic."""
import itertools
import json
import re
import time

import pytest
import torch

from engine.cli import parse_sets
from engine.config.finetune import build_finetune_config
from engine.config.pretrain import build_config
from engine.config.sections import TrainConfig
from engine.errors import TrainingDiverged
from engine.runtime.progress import Progress
from engine.training.budget import TimeBudget
from engine.training.loop import MAX_SKIPPED, LoopHooks, train_loop
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


def _overflowing_gradients(bad_steps):
    """A step function whose loss stays finite but whose gradients overflow at the given (1-based) calls."""
    calls = itertools.count(1)

    def step_fn(model, batch):
        loss = (model(batch) - 1).pow(2).mean()
        scale = float("inf") if next(calls) in bad_steps else 1.0
        yield {"loss": loss}, loss * scale
    return step_fn


def test_a_step_with_non_finite_gradients_is_skipped_and_logged(tmp_path):
    _, _, model = _run(tmp_path, _overflowing_gradients(set()), steps=3)
    reference = [p.detach().clone() for p in model.parameters()]
    (tmp_path / "log.jsonl").unlink()
    _, _, model = _run(tmp_path, _overflowing_gradients({2}), steps=3)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in log] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(reference, model.parameters()))  # one update fewer


def test_gradients_that_stay_non_finite_stop_the_run(tmp_path):
    with pytest.raises(TrainingDiverged, match=f"not finite for {MAX_SKIPPED} steps in a row"):
        _run(tmp_path, _overflowing_gradients(set(range(1, 100))), steps=10)


def test_train_amp_off_survives_yaml():
    assert TrainConfig(amp=False).amp == "off"  # `--set train.amp=off` is YAML's false


def test_within_the_warm_up_the_total_follows_the_latest_pace():
    """Slow first steps (another program on the cores) then fast ones: the total fixed at the probe is fixed again
    at the fast pace; a change under 5 % is not taken."""
    budget = _budget(100.0, spent=0.0, validate_every=None, checkpoint_every=1000, probe=3)
    for seconds in (5.0, 4.0, 4.0):
        budget.record_step(seconds)
    first = budget.plan(3, validate_s=0.0, save_s=0.0)
    assert 15 <= first <= 28  # about 97 s at 4 s a step
    for seconds in (1.0, 1.0, 1.0):
        budget.record_step(seconds)
    again = budget.replan(6)
    assert again is not None and again > 3 * first  # about 91 s at 1 s a step
    budget.record_step(1.02)
    assert budget.replan(7) is None and budget.steps == again


def _budget(seconds, spent, **kw) -> TimeBudget:
    return TimeBudget(seconds, time.monotonic() - spent, **kw)


def test_the_budget_fits_steps_validations_and_checkpoints_in_what_is_left():
    budget = _budget(100.0, spent=10.0, validate_every=10, checkpoint_every=5)
    for seconds in (5.0, 1.0, 1.0, 1.0):  # the first step's one-off cost is left out
        budget.record_step(seconds)
    assert budget.step_s == pytest.approx(1.0)
    steps = budget.plan(4, validate_s=3.0, save_s=0.5)
    # left 90 s - margin 3 - last validation 3 - last save 0.5 = 83.5 s for steps 5..N, the validations at 10, 20, ...
    # and the checkpoints at 5, 10, ... before step N: N = 64 costs 60 + 6 x 3 + 12 x 0.5 = 84 s; N = 63 costs 83 s
    assert steps == 63
    assert not budget.overdue(steps)
    slow = _budget(100.0, spent=10.0, validate_every=10)
    for seconds in (1.0, 1.0, 1.0):
        slow.record_step(seconds)
    slow.plan(2, validate_s=3.0, save_s=0.5)
    slow.started -= 75.0  # 85 s spent: 15 s left, enough for one more step and the last validation at the plan's pace
    assert not slow.overdue(3)
    slow.record_step(4.0)  # ... but not at four times that pace
    assert slow.overdue(4)
    late = _budget(100.0, spent=97.0, validate_every=10)
    late.record_step(1.0)
    late.record_step(1.0)
    assert late.plan(2, validate_s=3.0, save_s=0.5) == 2  # nothing more fits: stop now
    assert late.overdue(2)
