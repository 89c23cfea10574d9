"""TensorBoard event files beside log.jsonl, when the `tensorboard` package is importable: every value of every log
record as a scalar (losses, learning rate, seconds, gradient norm, validation metrics), and at fine-tuning
validation a few CT slices with prediction against reference. log.jsonl stays the record the engine reads back; the
events are for looking at a run with `tensorboard --logdir RUN/tensorboard`. Without the package nothing is written,
and one info line says so."""
from __future__ import annotations

import logging
import math
from numbers import Real
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
FOLDER = "tensorboard"  # inside the run folder


class TensorBoardLog:
    """A SummaryWriter on `RUN/tensorboard/`; events of steps after `start_step` that an earlier (killed) process
    wrote are purged, as `loop.trim_log` drops those records from log.jsonl."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run_folder: Path, start_step: int = 0) -> "TensorBoardLog | None":
        """The run's event writer, or None (with one info log line) when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard events (log.jsonl has every value)")
            return None
        return cls(SummaryWriter(str(Path(run_folder) / FOLDER), purge_step=start_step + 1))

    def scalars(self, record: dict) -> None:
        """Every finite number of a log record (nested dicts as 'metrics/val_mean_dice'), at its step."""
        step = record["step"]
        for name, value in _numbers(record):
            if name != "step":
                self.writer.add_scalar(name, value, step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """RGB images [3, H, W] in [0, 1], by name."""
        for name, image in images.items():
            self.writer.add_image(name, image, step, dataformats="CHW")

    def close(self) -> None:
        self.writer.close()


def _numbers(record: dict, prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
            yield prefix + key, float(value)


def slice_preview(image01: np.ndarray, prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The middle axial slice of a windowed CT [X, Y, Z] in RAS (values in [0, 1]) as RGB [3, Y, X] in radiological
    convention as the montage and overlay show it (anterior up, the patient's right on the left), with the foreground
    of the prediction in red and of the reference in green (both: yellow), half transparent."""
    k = image01.shape[2] // 2
    ct = np.clip(image01[:, :, k], 0.0, 1.0).T[::-1, ::-1]
    pred, ref = (np.asarray(m[:, :, k] > 0).T[::-1, ::-1] for m in (prediction, reference))
    rgb = np.repeat(ct[None], 3, axis=0).astype(np.float32)
    for channel, mask in ((0, pred), (1, ref)):
        rgb[channel][mask] = 0.5 * rgb[channel][mask] + 0.5
    return rgb
