"""`train.amp: auto` on a CPU with bf16 instructions measures which precision is faster on the run's own first
steps and keeps it (engine/training/precision.py)."""
import itertools
import json
import time

import pytest
import torch

from engine.config.sections import TrainConfig
from engine.runtime import device as device_module
from engine.runtime.progress import Progress
from engine.training.loop import LoopHooks, train_loop
from engine.training.precision import MIN_GAIN, ROUNDS, PrecisionTrial


def _feed(trial: PrecisionTrial, fp32_s: list[float], bf16_s: list[float]) -> dict:
    decision = None
    for a, b in zip(fp32_s, bf16_s):
        assert trial.dtype() is None
        assert trial.record(a) is None
        assert trial.dtype() is torch.bfloat16
        decision = trial.record(b)
    return decision


def test_the_faster_precision_is_kept_and_first_steps_do_not_count():
    # the first step of each precision pays one-off costs: a huge first bf16 step must not decide
    decision = _feed(PrecisionTrial(), [5.0, 1.0, 1.1], [50.0, 0.6, 0.7])
    assert decision == {"fp32_step_s": 1.0, "bf16_step_s": 0.6, "chosen": "bf16"}
    trial = PrecisionTrial()
    decision = _feed(trial, [5.0, 1.0, 1.0], [1.0, 1.2, 1.3])  # bf16 slower, as MiM base on one EPYC
    assert decision["chosen"] == "off" and trial.dtype() is None
    assert trial.record(0.1) is None and trial.dtype() is None  # decided once, for the rest of the run


def test_bf16_must_be_clearly_faster():
    tie = 1 - MIN_GAIN / 2
    assert _feed(PrecisionTrial(), [1.0] * ROUNDS, [tie] * ROUNDS)["chosen"] == "off"
    assert _feed(PrecisionTrial(), [1.0] * ROUNDS, [1 - 2 * MIN_GAIN] * ROUNDS)["chosen"] == "bf16"


@pytest.mark.parametrize("slow_under", ["bf16", "fp32"])
def test_the_loop_tries_both_and_keeps_the_faster(tmp_path, monkeypatch, slow_under):
    """A real train_loop with `amp: auto` on a CPU that claims bf16: the step function sees autocast alternate, then
    stay on the precision that was faster (made slower on purpose with a sleep)."""
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: True)
    seen = []

    def step_fn(batch, progress):
        bf16 = torch.is_autocast_enabled("cpu")
        seen.append(bf16)
        if bf16 == (slow_under == "bf16"):
            time.sleep(0.05)
        loss = model(batch).pow(2).mean()
        yield {"loss": loss}, loss

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = TrainConfig(steps=10, warmup_steps=1, checkpoint_every=100, lr=0.01, amp="auto")
    hooks = LoopHooks(Progress("none"), save=lambda s: tmp_path, log_path=tmp_path / "log.jsonl")
    train_loop(model, opt, cfg, iter(itertools.repeat(torch.ones(2, 3))), step_fn, torch.device("cpu"), 0, hooks)
    trial_steps = 2 * ROUNDS
    assert seen[:trial_steps] == [False, True] * ROUNDS
    assert set(seen[trial_steps:]) == {slow_under == "fp32"}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["amp"] for r in log[:trial_steps]] == ["off", "bf16"] * ROUNDS
    decision = log[trial_steps - 1]["amp_trial"]
    assert decision["chosen"] == ("bf16" if slow_under == "fp32" else "off")
    assert all("amp_trial" not in r for r in log[trial_steps:])


def test_no_trial_where_the_precision_is_known(tmp_path, monkeypatch):
    """`off`, an explicit `bf16`, and `auto` on a CPU without bf16 instructions run one precision from step 1."""
    for setting, flags, expected in (("off", True, False), ("bf16", False, True), ("auto", False, False)):
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda flags=flags: flags)
        seen = []

        def step_fn(batch, progress):
            seen.append(torch.is_autocast_enabled("cpu"))
            loss = model(batch).pow(2).mean()
            yield {"loss": loss}, loss

        model = torch.nn.Linear(3, 1)
        cfg = TrainConfig(steps=7, warmup_steps=1, checkpoint_every=100, lr=0.01, amp=setting)
        hooks = LoopHooks(Progress("none"), save=lambda s: tmp_path, log_path=None)
        train_loop(model, torch.optim.SGD(model.parameters(), lr=0.01), cfg, iter(itertools.repeat(torch.ones(2, 3))),
                   step_fn, torch.device("cpu"), 0, hooks)
        assert seen == [expected] * 7, setting


def test_the_bench_reports_the_precision_the_trial_kept(tmp_path):
    """`engine bench` times a run by the steps in the precision `auto` kept, not the trial's mixture."""
    from engine.bench.training import step_figures
    trial = [{"step": i + 1, "seconds": s, "amp": a} for i, (s, a) in
             enumerate(zip([9.0, 9.0, 2.0, 1.0, 2.1, 1.1], ["off", "bf16"] * ROUNDS))]
    trial[-1]["amp_trial"] = {"fp32_step_s": 2.0, "bf16_step_s": 1.0, "chosen": "bf16"}
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in trial))
    assert step_figures(log, 1)["step_s"] == 1.0  # no step after the trial: the trial's own figure
    log.write_text(log.read_text() + "".join(json.dumps({"step": 7 + i, "seconds": s}) + "\n"
                                             for i, s in enumerate([0.9, 0.95, 1.0])))
    figures = step_figures(log, 1)
    assert figures["step_s"] == 0.95 and figures["amp_trial"]["chosen"] == "bf16" and len(figures["steps_s"]) == 9
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"step": i, "seconds": s}) + "\n" for i, s in enumerate([5.0, 1.0, 3.0])))
    assert step_figures(plain, 1) == {"steps_s": [5.0, 1.0, 3.0], "step_s": 2.0}
