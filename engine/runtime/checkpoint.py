"""Checkpoints hold plain data only (config dict, state dicts, step, optimiser state) and load with
`torch.load(weights_only=True)`, so opening one can never run code. Writes are atomic (runtime.atomic)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from engine.errors import UserError
from engine.runtime.atomic import write_atomic

FORMAT = "mimslicer-checkpoint/1"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, *, kind: str, config: dict, model: nn.Module, step: int, optimizer=None,
                    extra: dict | None = None) -> Path:
    """Atomically: the format tag, kind, config, weights (unwrapped), step, optimiser state and `extra`."""
    payload = {
        "format": FORMAT,
        "kind": kind,
        "config": config,
        "model": unwrap(model).state_dict(),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    payload.update(extra or {})
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load one of our checkpoints without unpickling code; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused to unpickle: this file holds Python objects, which could run code when "
                        "loaded; MiMSlicer checkpoints hold plain data only") from None
    except Exception as err:  # zip reader errors, EOF...: a truncated, corrupt or non-torch file
        raise UserError(f"{path}: not a loadable checkpoint (truncated, corrupt or not a torch file: "
                        f"{type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a MiMSlicer checkpoint (no '{FORMAT}' format tag)")
    return ckpt


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What a checkpoint is, in plain JSON (for programs that do not import torch, like the Slicer module)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    data = cfg.get("data") or {}
    info = {"path": str(Path(path).resolve()), "format": ckpt["format"], "kind": ckpt.get("kind"),
            "step": ckpt.get("step"), "preset": cfg.get("preset"), "method": cfg.get("method"),
            "task": cfg.get("task"), "spacing": data.get("spacing"), "hu_window": data.get("hu_window"),
            "parameters": int(sum(t.numel() for t in ckpt["model"].values() if hasattr(t, "numel")))}
    heavy = {"format", "kind", "config", "model", "optimizer", "rng", "step"}
    for key, value in ckpt.items():  # what fine-tuning adds for inference: labels, spacing, roi, metrics...
        if key not in heavy and not hasattr(value, "numel"):
            info[key] = value
    return {k: v for k, v in info.items() if v is not None}
