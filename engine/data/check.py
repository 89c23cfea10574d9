"""`data check`: verify every volume of a dataset before a long run (in parallel), and `data cache`: pre-build
the persistent preprocessing cache. Both read a folder of volumes or a dataset JSON. An irregular DICOM series is a
problem when the commands would refuse it, and a note when they would resample it (`imageio.dicom`)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.data.datalist import resolve_datalist
from engine.errors import UserError
from engine.imageio.geometry import grid_difference
from engine.imageio.volumes import read_image, read_input
from engine.pretraining.data import pretrain_dataset

SANE_SPACING_MM = (0.05, 20.0)
MIN_SIDE = 8
SECTIONS = ("training", "validation", "test")


@dataclass
class CaseReport:
    image: str
    label: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what reading took that a user should know (a resampled series)
    size: list[int] | None = None
    spacing: list[float] | None = None


def check_dataset(path: str, workers: int = 2) -> dict:
    """Every entry of every section, checked; returns {"cases", "ok", "problems", "reports"}."""
    items, declared = _entries(path)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # SimpleITK reads without holding the GIL
        reports = list(pool.map(lambda item: check_case(item, declared), items))
    bad = [r for r in reports if r.problems]
    return {"cases": len(reports), "ok": len(reports) - len(bad), "problems": sum(len(r.problems) for r in bad),
            "notes": sum(len(r.notes) for r in reports), "reports": [r.__dict__ for r in reports]}


def _entries(path: str) -> tuple[list[dict], set[int] | None]:
    p = Path(path)
    if p.suffix.lower() != ".json":
        return resolve_datalist(p, check_exists=False), None
    items = []
    for section in SECTIONS:
        try:
            items += resolve_datalist(p, section=section, check_exists=False)
        except UserError:
            continue
    if not items:
        raise UserError(f"{p}: no {'/'.join(SECTIONS)} entries with an 'image'")
    labels = json.loads(p.read_text()).get("labels")
    declared = {int(v) for v in labels.values()} if isinstance(labels, dict) else None
    return items, declared


def check_case(item: dict, declared: set[int] | None) -> CaseReport:
    report = CaseReport(str(item["image"]), item.get("label"))
    image = _read_image(item["image"], report)
    if image is not None:
        report.size, report.spacing = list(image.GetSize()), [round(s, 4) for s in image.GetSpacing()]
        _check_geometry(image, report)
    if item.get("label"):
        label = _read(item["label"], report)
        if label is not None:
            _check_label(label, image, declared, report)
    return report


def _read_image(path, report: CaseReport) -> sitk.Image | None:
    """A volume file or a DICOM series folder; a resampled series is noted."""
    try:
        image, dicom = read_input(path)
    except UserError as err:
        report.problems.append(str(err))
        return None
    if dicom is not None and dicom.geometry.resampled:
        report.notes.append(dicom.note)
    return image


def _read(path, report: CaseReport) -> sitk.Image | None:
    try:
        return read_image(path)
    except UserError as err:
        report.problems.append(str(err))
        return None


def _check_geometry(image: sitk.Image, report: CaseReport) -> None:
    lo, hi = SANE_SPACING_MM
    if not all(lo <= s <= hi for s in image.GetSpacing()):
        report.problems.append(f"{report.image}: voxel spacing {report.spacing} mm is outside [{lo}, {hi}] mm")
    if min(image.GetSize()) < MIN_SIDE:
        report.problems.append(f"{report.image}: size {report.size} has a side under {MIN_SIDE} voxels")


def _check_label(label: sitk.Image, image: sitk.Image | None, declared: set[int] | None, report: CaseReport) -> None:
    values = np.unique(sitk.GetArrayViewFromImage(label))
    if not np.all(np.equal(np.mod(values, 1), 0)):
        report.problems.append(f"{report.label}: label values are not whole numbers")
        return
    if declared is not None:
        extra = sorted(set(values.astype(int).tolist()) - declared - {0})
        if extra:
            report.problems.append(f"{report.label}: label values {extra} are not declared in the dataset's labels")
    if image is not None and grid_difference(image, label):
        report.problems.append(f"{report.label}: its grid (size {label.GetSize()}, spacing "
                               f"{tuple(round(s, 3) for s in label.GetSpacing())}, origin "
                               f"{tuple(round(o, 2) for o in label.GetOrigin())}) differs from its image's")


def format_report(report: dict) -> str:
    """A summary line, then `  - <problem>` (would be refused) and `  ~ <note>` (would be resampled) lines."""
    resampled = f"; {report['notes']} DICOM series will be resampled (~)" if report.get("notes") else ""
    lines = [f"{report['cases']} case(s): {report['ok']} fine, {report['cases'] - report['ok']} with problems"
             + resampled]
    for case in report["reports"]:
        lines += [f"  - {problem}" for problem in case["problems"]]
        lines += [f"  ~ {note}" for note in case.get("notes", [])]
    return "\n".join(lines)


def build_cache(path: str, cache_dir: str, preset: str = "base", method: str = "mim", workers: int = 2) -> int:
    """Run the deterministic preprocessing of every volume once into `cache_dir` (MONAI PersistentDataset)."""
    from dataclasses import replace

    from engine.config.pretrain import build_config
    cfg = build_config(preset, method)
    items = resolve_datalist(path)
    dataset = pretrain_dataset(items, replace(cfg.data, cache_dir=cache_dir), cfg.crop_size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(dataset.__getitem__, range(len(items))))
    return len(items)
