"""The one atomic write: a temporary file beside the target (same folder, same suffix), then a rename over it, so
a reader never sees half a file and a killed process leaves the old file intact. JSON is written with non-finite
numbers as `null` (valid JSON that every reader accepts), never as `NaN`."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

STALE = ".tmp*"  # glob prefix of temporary files left by a process killed while writing


def temporary_path(path: Path) -> Path:
    """`.tmp<pid>.<name>`: hidden, unique per process, and with the target's suffix (writers choose by suffix)."""
    return path.with_name(f".tmp{os.getpid()}.{path.name}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a temporary file, which then replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale(folder: Path, name: str) -> None:
    """Delete the temporary files of `name` that a killed process left in `folder`."""
    for stale in folder.glob(f"{STALE}.{name}"):
        stale.unlink(missing_ok=True)


def json_safe(value):
    """NaN and infinities as None (JSON null), recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(tree: Any) -> str:
    return json.dumps(json_safe(tree), indent=1, allow_nan=False) + "\n"


def write_json(tree: Any, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json_text(tree)))


def write_text(text: str, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
