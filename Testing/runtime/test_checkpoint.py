"""Checkpoints: plain data that loads with weights_only=True; foreign pickles are refused without running."""
import pickle

import pytest
import torch

from engine.config.pretrain import build_config, config_from_dict
from engine.errors import UserError
from engine.models import build_pretrainer
from engine.runtime.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_with_weights_only(tmp_path):
    cfg = build_config("tiny", "mim")
    model = build_pretrainer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(__import__("engine.masking", fromlist=["x"]).make_mim_views(
        torch.rand(1, 1, 64, 64, 64), cfg.mask, 16, torch.Generator().manual_seed(0)))["loss"].backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.pt", kind="pretrain", config=cfg.to_dict(), model=model, step=7, optimizer=opt)
    raw = torch.load(path, weights_only=True)  # the strict loader accepts it: nothing but plain data inside
    assert raw["step"] == 7
    ckpt = load_checkpoint(path)
    assert config_from_dict(ckpt["config"]) == cfg
    clone = build_pretrainer(config_from_dict(ckpt["config"]))
    clone.load_state_dict(ckpt["model"])
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = torch.optim.AdamW(clone.parameters())
    opt2.load_state_dict(ckpt["optimizer"])
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "mimslicer-checkpoint/1", "model": _Payload(str(target))}, f)
    with pytest.raises(UserError, match="refused to unpickle"):
        load_checkpoint(path)
    assert not target.exists()


def test_truncated_and_foreign_files_get_clear_errors(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", kind="pretrain", config={}, model=torch.nn.Linear(2, 2), step=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a MiMSlicer checkpoint"):
        load_checkpoint(foreign)


def test_info_describes_a_checkpoint_as_json(tiny_pretrain_run):
    import json

    from engine_testing import run_engine
    info = json.loads(run_engine("info", "--checkpoint", str(tiny_pretrain_run / "checkpoint.pt")).stdout)
    assert info["kind"] == "pretrain" and info["method"] == "mim" and info["preset"] == "tiny" and info["step"] == 2
    assert info["parameters"] > 1000 and info["spacing"] == [3.0, 3.0, 3.0]
