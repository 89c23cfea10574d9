"""TensorBoard: a 2-step fine-tune on real chest CT writes event files whose scalars match log.jsonl, with the
validation's slice pictures; without the tensorboard package, nothing is written and one info line says so."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
from engine_testing import TRAIN

from engine.cli import main
from engine.training.tensorboard import FOLDER, TensorBoardLog

pytest.importorskip("tensorboard")


def test_finetune_writes_the_logged_values_and_validation_slices(lung_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator
    out = tmp_path / "run"
    sets = [arg for key, value in TRAIN.items() for arg in ("--set", f"{key}={value}")]
    assert main(["finetune", "--data", str(lung_data), "--preset", "tiny", "--steps", "2", "--fold", "0",
                 "--out", str(out), "--progress", "none", *sets]) == 0
    capsys.readouterr()
    assert list((out / FOLDER).glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / FOLDER), size_guidance={SCALARS: 0, IMAGES: 0}).Reload()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for name in ("loss", "lr", "grad_norm", "metrics/val_mean_dice"):
        logged = [(r["step"], r[name] if "/" not in name else r["metrics"]["val_mean_dice"]) for r in records
                  if name.split("/")[0] in r]
        seen = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in seen] == [s for s, _ in logged], name
        assert [v for _, v in seen] == pytest.approx([v for _, v in logged], rel=1e-6), name
    pictures = events.Tags()["images"]
    assert pictures == ["validation/case_0"]  # one held-out case (fold 0)
    picture = events.Images("validation/case_0")[-1]
    assert picture.step == 2 and picture.width == picture.height > 16  # the square crop on the tiny preset's grid
    if os.environ.get("MIM_TEST_PICTURES"):  # to look at it: the middle slice, prediction red, reference green
        Path(os.environ["MIM_TEST_PICTURES"]).write_bytes(picture.encoded_image_string)


def test_without_tensorboard_nothing_is_written_and_one_line_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with caplog.at_level(logging.INFO, logger="engine.training.tensorboard"):
        assert TensorBoardLog.open(tmp_path) is None
    assert [r.levelname for r in caplog.records] == ["INFO"] and "tensorboard" in caplog.records[0].message
    assert not (tmp_path / FOLDER).exists()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    """A killed run logged steps 1-3, its checkpoint is of step 2: the resumed run's step 3 replaces the old one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    first = TensorBoardLog.open(tmp_path, 0)
    for step in (1, 2, 3):
        first.scalars({"step": step, "loss": float(step), "metrics": {"dice": 0.5}, "skipped": True, "note": "x"})
    first.close()
    # a resumed run is a later process: its event file is named after a later second. Within one second the names
    # sort by the writer's counter, which puts "...9" after "...10" in a long test session.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    resumed = TensorBoardLog.open(tmp_path, 2)
    resumed.scalars({"step": 3, "loss": 30.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / FOLDER)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert sorted(events.Tags()["scalars"]) == ["loss", "metrics/dice"]  # flags and words are not scalars
