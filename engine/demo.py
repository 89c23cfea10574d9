"""The main job (`make demo`): sample CTs -> MiM pre-training -> reconstruction montage of a sample case."""
from __future__ import annotations

import time
from pathlib import Path

from engine.data import resolve_datalist
from engine.pretrain import CHECKPOINT, run_pretrain
from engine.reconstruct import run_reconstruct
from engine.sample_data import fetch_sample_data


def run_demo(out: str, preset: str = "small", steps: int | None = None, data: str | None = None,
             progress: str = "bar") -> dict:
    out_dir = Path(out)
    t0 = time.perf_counter()
    if data is None:
        fetch_sample_data(out_dir / "sample-data")
        data = str(out_dir / "sample-data")
    image = resolve_datalist(data)[0]["image"]
    run_dir = out_dir / "pretrain"
    result = run_pretrain(data, str(run_dir), method="mim", preset=preset, steps=steps,
                          resume=(run_dir / CHECKPOINT).exists(), progress=progress)
    index = run_reconstruct(str(run_dir / CHECKPOINT), image, str(out_dir / "reconstruction"), progress=progress)
    summary = {
        "data": data, "checkpoint": str(run_dir / CHECKPOINT), "steps": result.step,
        "final_losses": {k: round(v, 4) for k, v in result.last_losses.items()},
        "reconstruction": str(out_dir / "reconstruction" / "index.json"),
        "montage": str(out_dir / "reconstruction" / index["montage"]),
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    print("\nMiM demo finished in", s["minutes"], "min")
    print(f"  sample CTs          {s['data']}")
    print(f"  pre-trained model   {s['checkpoint']}  ({s['steps']} steps; last losses {s['final_losses']})")
    print(f"  reconstructions     {s['reconstruction']}  (NIfTI per level and view, open them in Slicer)")
    print(f"  montage             {s['montage']}  (rows: coarse, middle, fine)")
