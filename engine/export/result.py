"""What an export wrote, and its check against the engine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportResult:
    files: list[Path]
    check: dict | None = None  # the comparison with the engine, when a check image was given (ONNX: always)
