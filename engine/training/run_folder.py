"""The run folder, written once for pre-training and fine-tuning: open (a new run, or --resume of the saved one),
prepare (config.yaml and the stage's own files, rank 0 only), the rank's seed, the DDP wrap, restore (weights,
optimiser and every random generator) and save (an atomic checkpoint.pt).

Folder: config.yaml, log.jsonl, checkpoint.pt (the latest training state, for --resume), progress.png (losses,
learning rate and validation scores so far, redrawn with every checkpoint), plus what the stage adds (fine-tuning:
cases.json, weights.json, model.pt, MODEL_CARD.md)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel

from engine.errors import UserError
from engine.runtime import distributed
from engine.runtime.atomic import remove_stale, write_json, write_text
from engine.runtime.checkpoint import load_checkpoint, save_checkpoint, unwrap
from engine.training.loop import trim_log
from engine.training.progress_plot import try_plot_progress

CHECKPOINT = "checkpoint.pt"
RANK_STRIDE = 7919  # a prime: ranks and resumed steps get distinct seeds


@dataclass
class RunFolder:
    """One run's folder, as seen by one process (`info`: its rank among torchrun's processes)."""

    path: Path
    kind: str  # the checkpoint kind this stage writes: "pretrain", "finetune-segmentation", ...
    info: distributed.DistInfo
    resumed: dict | None = None  # the checkpoint a --resume continues from

    @classmethod
    def open(cls, path: str | Path, kind: str, info: distributed.DistInfo, resume: bool) -> "RunFolder":
        """A new run refuses a folder that already holds one; --resume needs one, of the same kind."""
        folder = cls(Path(path), kind, info)
        checkpoint = folder.path / CHECKPOINT
        if not resume:
            if checkpoint.exists():
                raise UserError(f"{folder.path} already holds a run; pass --resume to continue it or choose "
                                "another --out")
            return folder
        if not checkpoint.exists():
            raise UserError(f"--resume: {checkpoint} does not exist; start without --resume")
        folder.resumed = load_checkpoint(checkpoint)
        if folder.resumed.get("kind") != kind:
            raise UserError(f"--resume: {checkpoint} is a '{folder.resumed.get('kind')}' run, not {kind}")
        return folder

    @property
    def start_step(self) -> int:
        return int(self.resumed["step"]) if self.resumed else 0

    @property
    def log_path(self) -> Path | None:
        """log.jsonl, written by rank 0 only."""
        return self.path / "log.jsonl" if self.info.is_main else None

    def prepare(self, config: dict, files: dict[str, dict] | None = None) -> None:
        """Rank 0 writes config.yaml and the stage's JSON `files`, drops what a killed run left behind; then every
        rank waits for it."""
        if self.info.is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                remove_stale(self.path, CHECKPOINT)
                self.write_config(config)
                for name, tree in (files or {}).items():
                    write_json(tree, self.path / name)
            except OSError as err:
                raise UserError(f"{self.path}: cannot write the run folder ({err.strerror})") from None
            trim_log(self.path / "log.jsonl", self.start_step)
        distributed.barrier()

    def write_config(self, config: dict) -> None:
        """config.yaml (rank 0; also when a time-limited run has fixed its number of steps)."""
        write_text(yaml.safe_dump(config, sort_keys=False), self.path / "config.yaml")

    def seed(self, seed: int) -> int:
        """Seed every generator (torch, numpy, random, MONAI) for this rank at this run's start step."""
        value = seed + RANK_STRIDE * self.info.rank + self.start_step
        set_determinism(seed=value)
        return value

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel under torchrun, the model itself otherwise."""
        if not self.info.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Weights, optimiser state and random generators of the resumed checkpoint (whatever number of processes
        wrote it); returns the checkpoint ({} for a new run)."""
        if self.resumed is None:
            return {}
        unwrap(model).load_state_dict(self.resumed["model"])
        if self.resumed.get("optimizer"):
            optimizer.load_state_dict(self.resumed["optimizer"])
        set_rng_states(self.resumed.get("rng"))
        return self.resumed

    def save(self, step: int, config: dict, model: nn.Module, optimizer, extra: dict | None = None) -> Path:
        """checkpoint.pt and progress.png (rank 0 writes; every rank gets the checkpoint's path)."""
        path = self.path / CHECKPOINT
        if self.info.is_main:
            save_checkpoint(path, kind=self.kind, config=config, model=model, step=step, optimizer=optimizer,
                            extra={"rng": rng_states(), "world_size": self.info.world_size, **(extra or {})})
            try_plot_progress(self.path)
        return path


def rng_states() -> dict:
    """Every random generator's state as plain data (loads with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict | None) -> None:
    if not states:
        return
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
