"""torchrun with 2 CPU processes (gloo): same parameters on both ranks, a checkpoint that resumes on 1 process,
and sharding that covers every volume exactly once per epoch."""
import json
import subprocess
import sys

import pytest
import torch
from engine_testing import REPO, run_engine

from engine.errors import UserError
from engine.runtime.distributed import ShardSampler


@pytest.mark.parametrize("size,world", [(5, 2), (7, 3), (4, 4), (1, 1)])
def test_shards_cover_every_volume_once_per_epoch(size, world):
    for epoch in range(3):
        seen = []
        for rank in range(world):
            sampler = ShardSampler(size, rank, world, seed=11)
            sampler.set_epoch(epoch)
            shard = list(sampler)
            assert len(shard) == len(sampler)
            seen += shard
        assert sorted(seen) == list(range(size))
    a, b = ShardSampler(size, 0, world, seed=11), ShardSampler(size, 0, world, seed=11)
    b.set_epoch(1)
    if size > world:
        assert list(a) != list(b) or size <= 2, "each epoch reshuffles"


def test_more_processes_than_volumes_is_refused():
    with pytest.raises(UserError, match="3 processes"):
        ShardSampler(2, 0, 3)


def test_two_cpu_processes_stay_in_sync_and_resume_on_one(ct_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "engine", "pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "2",
           "--set", "train.accumulate=2", "--out", str(out), "--progress", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1, "only rank 0 reports"
    assert done[0]["processes"] == 2 and done[0]["ranks_in_sync"] is True
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"]), "saved unwrapped"
    resumed = run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "3", "--out", str(out),
                         "--resume", "--progress", "json")
    steps = [json.loads(line)["step"] for line in resumed.stdout.splitlines() if '"step"' in line and '"event": "step"' in line]
    assert steps == [3]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_finetune_under_torchrun_with_two_processes(tmp_path):
    from engine_testing import CT_2MM, crop_ct, require_shared_data
    require_shared_data()
    folder = tmp_path / "cases"
    folder.mkdir()
    for name, size in (("a", (48, 48, 40)), ("b", (44, 52, 40)), ("c", (52, 44, 44))):
        crop_ct(CT_2MM / "ts_chest_ct.nii.gz", folder / f"{name}_ct.nii.gz", size)
        crop_ct(CT_2MM / "ts_chest_label.nii.gz", folder / f"{name}_label.nii.gz", size)
    dataset = tmp_path / "dataset.json"
    run_engine("data", "index", str(folder), "-o", str(dataset), "--labels", "heart=1", "aorta=2", "--folds", "3")
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine",
           "finetune", "--data", str(dataset), "--fold", "0", "--preset", "tiny", "--steps", "2", "--out", str(out),
           "--progress", "json", "--set", "model.feature_size=6"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    done = [json.loads(line) for line in result.stdout.splitlines() if '"done"' in line]
    assert len(done) == 1 and done[0]["processes"] == 2 and done[0]["ranks_in_sync"] is True
    assert (out / "model.pt").exists() and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
