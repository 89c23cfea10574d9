"""progress.png in every run folder: drawn from log.jsonl (losses, learning rate, validation scores) with every
checkpoint, for pre-training and fine-tuning runs alike."""
from __future__ import annotations

import json

from engine.training.progress_plot import PLOT, plot_progress, series

PNG = b"\x89PNG\r\n\x1a\n"


def test_series_split_losses_learning_rate_and_validation():
    records = [{"step": 1, "lr": 0.1, "seconds": 2.0, "loss": 3.0, "rec": 1.0, "grad_norm": 5.0},
               {"step": 2, "lr": 0.05, "seconds": 2.0, "loss": None, "rec": 0.5,
                "metrics": {"val_mean_dice": 0.4, "dice/liver": 0.4, "val_cases": 2}}]
    panels = series(records)
    assert panels["losses"] == {"loss": ([1], [3.0]), "rec": ([1, 2], [1.0, 0.5])}  # a NaN loss (null) is left out
    assert panels["lr"] == {"learning rate": ([1, 2], [0.1, 0.05])}
    assert panels["validation"] == {"val_mean_dice": ([2], [0.4]), "dice/liver": ([2], [0.4])}


def test_nothing_to_draw_draws_nothing(tmp_path):
    assert plot_progress(tmp_path) is None
    (tmp_path / "log.jsonl").write_text("")
    assert plot_progress(tmp_path) is None and not (tmp_path / PLOT).exists()


def _height(png: bytes) -> int:
    return int.from_bytes(png[20:24], "big")  # IHDR: width, then height, big-endian


def test_every_run_folder_has_its_progress_plot(lung_run, tiny_pretrain_run):
    pngs = {run: (run / PLOT).read_bytes() for run in (lung_run, tiny_pretrain_run)}
    for run, png in pngs.items():
        assert png.startswith(PNG) and len(png) > 5000, run
    records = [json.loads(line) for line in (lung_run / "log.jsonl").read_text().splitlines()]
    assert any("metrics" in record for record in records)
    # fine-tuning validates: three panels (losses, learning rate, validation); pre-training two
    assert _height(pngs[lung_run]) == 3 * _height(pngs[tiny_pretrain_run]) // 2
