"""A pre-training process killed with SIGKILL resumes from its last checkpoint to the same step count;
SIGTERM stops cleanly after saving."""
import json
import signal
import subprocess
import sys

import torch
from engine_testing import REPO, run_engine


def _start(ct_dir, out, steps):
    cmd = [sys.executable, "-m", "engine", "pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", str(steps),
           "--set", "train.checkpoint_every=1", "--out", str(out), "--progress", "json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _wait_for_checkpoint(proc, step):
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "checkpoint" and event["step"] >= step:
            return event["step"]
    raise AssertionError(f"no checkpoint event; stderr: {proc.stderr.read()[-2000:]}")


def test_sigkill_then_resume_reaches_the_same_step_count(ct_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start(ct_dir, out, steps=50)
    _wait_for_checkpoint(proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]  # intact: written by rename
    assert 2 <= saved < 50
    result = run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", str(saved + 2),
                        "--out", str(out), "--resume", "--progress", "json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["step"] == saved and events[-1]["event"] == "done" and events[-1]["step"] == saved + 2
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, saved + 3)), "the log has each step once, even after the kill"
    assert not list(out.glob(".*tmp*")), "no temporary file of the killed run is left"


def test_sigterm_saves_and_stops_cleanly(ct_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start(ct_dir, out, steps=500)
    _wait_for_checkpoint(proc, 1)
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    done = json.loads(rest.strip().splitlines()[-1])
    assert done["event"] == "done" and "resume" in done["message"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == done["step"] < 500
