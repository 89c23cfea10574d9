"""Lists of volumes: a folder of volumes (and of DICOM series folders) or a MONAI decathlon JSON, as items
[{"image": path, ...}]."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from engine.errors import UserError
from engine.imageio.dicom import dicom_folders
from engine.imageio.volumes import is_volume_file

log = logging.getLogger(__name__)

LABEL_NAME = re.compile(r"(_label|_labels|_seg|_mask)(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", re.IGNORECASE)


def resolve_datalist(path: str | Path, section: str = "training", check_exists: bool = True) -> list[dict]:
    """Items [{"image": path, ...}] from a folder of volumes or a decathlon JSON (relative paths resolved)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        items = _folder_items(path)
    elif path.suffix.lower() == ".json":
        items = _json_items(path, section)
    else:
        raise UserError(f"{path}: --data takes a folder of volumes or a dataset JSON")
    missing = [it["image"] for it in items if not Path(it["image"]).exists()]
    if missing and check_exists:
        raise UserError(f"{path}: {len(missing)} listed image(s) do not exist, first: {missing[0]}")
    return items


def _folder_items(folder: Path) -> list[dict]:
    """Every volume file under `folder` (label files skipped), then every folder holding DICOM files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_volume_file(p) and "labelsTr" not in p.parts)
    images = [p for p in files if not LABEL_NAME.search(p.name)]
    if len(images) < len(files):
        log.info("%s: skipped %d label file(s)", folder, len(files) - len(images))
    images += dicom_folders(folder)
    if not images:
        raise UserError(f"{folder}: no volumes found (looked for {', '.join(('.nii.gz', '.nii', '.nrrd', '.mha'))} "
                        "files and DICOM series folders)")
    return [{"image": str(p)} for p in images]


def _json_items(path: Path, section: str) -> list[dict]:
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable dataset JSON ({err})") from None
    entries = tree.get(section) if isinstance(tree, dict) else None
    if not entries:
        raise UserError(f"{path}: no '{section}' list of {{\"image\": ...}} entries")
    items = []
    for entry in entries:
        entry = {"image": entry} if isinstance(entry, str) else dict(entry)
        if "image" not in entry:
            raise UserError(f"{path}: an entry of '{section}' has no 'image': {entry}")
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                entry[key] = str((path.parent / entry[key]).resolve())
        items.append(entry)
    return items
