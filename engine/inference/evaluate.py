"""Dice, HD95 (mm) and normalised surface Dice (NSD) per label between predicted and reference labelmaps; a table
for people and JSON for programs. A label absent from both volumes is reported as absent (null), not as 1 or 0.

Dice is MONAI's `compute_dice`. HD95 and NSD follow MONAI's `compute_hausdorff_distance(percentile=95)` and
`compute_surface_dice` definitions (surface voxels = mask minus its 6-connected erosion, voxels outside the array
counting as background; exact Euclidean distances in mm between surface-voxel centres; HD95 the larger of the two
directed 95th percentiles; NSD the share of both surfaces' voxels within `tolerance` mm of the other surface) but use
SimpleITK's Maurer distance map, since MONAI's needs scipy.

A label present in one volume and missing from the other (a structure missed entirely, or predicted where the
reference has none) is a *miss*: Dice 0, NSD 0, and HD95 the image diagonal (size x spacing per axis, in mm, the
largest distance the image can hold) instead of no value, so that misses weigh on the mean instead of dropping out
of it; each such score carries `"missed": true` and the means count them."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice

from engine.data.labelled import case_name
from engine.errors import UserError
from engine.imageio.geometry import grid_difference
from engine.imageio.labelmap import sidecar_path
from engine.imageio.volumes import is_volume_file, read_image
from engine.runtime.atomic import write_json

DEFAULT_TOLERANCE_MM = 2.0  # NSD tolerance: about one voxel of the usual 1.5-2 mm training grids


def label_scores(pred: np.ndarray, ref: np.ndarray, value: int, spacing,
                 tolerance: float = DEFAULT_TOLERANCE_MM) -> dict:
    """Dice, HD95 and NSD of one label value in two [z, y, x] (or any 3D) arrays on the same grid; `spacing` per
    array axis (mm). A miss (the label in one array only) scores HD95 = the image diagonal and `missed: true`."""
    p, r = pred == value, ref == value
    scores = {"pred_voxels": int(p.sum()), "ref_voxels": int(r.sum()), "dice": None, "hd95": None, "nsd": None,
              "missed": False}
    if not p.any() and not r.any():
        return scores  # absent from both: no score
    diagonal = image_diagonal(p.shape, spacing)
    box = _union_box(p, r)
    p, r = np.ascontiguousarray(p[box]), np.ascontiguousarray(r[box])
    p_t, r_t = (torch.from_numpy(m)[None, None].float() for m in (p, r))
    scores["dice"] = float(compute_dice(p_t, r_t, include_background=True, ignore_empty=False)[0, 0])
    if p.any() and r.any():
        to_r, to_p = surface_distances(p, r, spacing)
        scores["hd95"], scores["nsd"] = _hd95(to_r, to_p), _nsd(to_r, to_p, tolerance)
    else:
        scores.update(hd95=diagonal, nsd=0.0, missed=True)
    return scores


def image_diagonal(shape, spacing) -> float:
    """The diagonal (mm) of an array of `shape` with `spacing` per axis: the HD95 a missed structure scores."""
    return float(np.linalg.norm(np.multiply(shape, spacing)))


def hausdorff95(p: np.ndarray, r: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile surface distance (mm) of two non-empty boolean arrays; `spacing` per array axis."""
    return _hd95(*surface_distances(p, r, spacing))


def surface_dice(p: np.ndarray, r: np.ndarray, spacing, tolerance: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalised surface Dice of two non-empty boolean arrays: the share of both surfaces' voxels that lie within
    `tolerance` mm of the other surface."""
    return _nsd(*surface_distances(p, r, spacing), tolerance)


def surface_distances(p: np.ndarray, r: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(distances from p's surface voxels to r's surface, from r's to p's), in mm; both arrays non-empty."""
    p_edge, r_edge = _surface(p), _surface(r)
    return _distance_to(r_edge, spacing)[p_edge], _distance_to(p_edge, spacing)[r_edge]


def _hd95(to_r: np.ndarray, to_p: np.ndarray) -> float:
    return float(max(np.percentile(to_r, 95), np.percentile(to_p, 95)))


def _nsd(to_r: np.ndarray, to_p: np.ndarray, tolerance: float) -> float:
    return float(((to_r <= tolerance).sum() + (to_p <= tolerance).sum()) / (to_r.size + to_p.size))


def _surface(mask: np.ndarray) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    eroded = sitk.BinaryErode(image, [1, 1, 1], sitk.sitkCross, 0, 1, False)  # voxels outside count as background
    return mask & ~sitk.GetArrayViewFromImage(eroded).astype(bool)


def _distance_to(edge: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from every voxel to the nearest voxel of `edge` (0 on it)."""
    image = sitk.GetImageFromArray(edge.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # array axes are SimpleITK's reversed
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)


def _union_box(p: np.ndarray, r: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    idx = np.argwhere(p | r)
    lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + 1 + margin, p.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def evaluate_images(pred: sitk.Image, ref: sitk.Image, labels: dict[str, int],
                    tolerance: float = DEFAULT_TOLERANCE_MM) -> dict[str, dict]:
    check_same_grid(pred, ref)
    p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)  # [z, y, x]
    spacing = tuple(reversed(ref.GetSpacing()))  # matches the [z, y, x] axes
    return {name: label_scores(p, r, value, spacing, tolerance) for name, value in labels.items() if value != 0}


def check_same_grid(pred: sitk.Image, ref: sitk.Image) -> None:
    difference = grid_difference(ref, pred)
    if difference:
        what, a, b = difference
        raise UserError(f"prediction {what} {list(b)} differs from the reference's {list(a)}; both must lie on the "
                        "same grid")


def resolve_labels(labels_path: str | None, pred_path: Path, ref: sitk.Image, pred: sitk.Image) -> dict[str, int]:
    """Names from --labels (a dataset.json or a sidecar), else the prediction's sidecar, else 'label_<value>'."""
    if labels_path:
        if not Path(labels_path).is_file():
            raise UserError(f"{labels_path}: no such labels file")
        names = _names_in(Path(labels_path))
        if not names:
            raise UserError(f"{labels_path}: no 'labels' mapping such as {{\"liver\": 1}}")
        return names
    sidecar = _sidecar(pred_path)
    names = _names_in(sidecar) if sidecar is not None and sidecar.is_file() else {}
    if names:
        return names
    values = set(np.unique(sitk.GetArrayViewFromImage(ref))) | set(np.unique(sitk.GetArrayViewFromImage(pred)))
    return {f"label_{int(v)}": int(v) for v in sorted(values) if v != 0}


def _names_in(path: Path) -> dict[str, int]:
    """Foreground {name: value} of a JSON's 'labels' (nnU-Net {"liver": 1} or decathlon {"1": "liver"})."""
    try:
        names = json.loads(path.read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{path}: not a readable JSON with 'labels'") from None
    if not isinstance(names, dict):
        return {}
    if all(str(k).isdigit() for k in names):
        names = {v: int(k) for k, v in names.items()}
    return {str(k): int(v) for k, v in names.items() if int(v) != 0}


def _sidecar(path: Path) -> Path | None:
    try:
        return sidecar_path(path)
    except UserError:
        return None


def pair_files(pred: Path, ref: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference): two files, or two folders matched by case name."""
    if pred.is_file() and ref.is_file():
        return [(case_name(ref), pred, ref)]
    if pred.is_dir() and ref.is_dir():
        refs = {case_name(p): p for p in sorted(ref.iterdir()) if is_volume_file(p)}
        pairs = [(case_name(p), p, refs[case_name(p)]) for p in sorted(pred.iterdir())
                 if is_volume_file(p) and case_name(p) in refs]
        if not pairs:
            raise UserError(f"no prediction in {pred} matches a reference in {ref} by case name")
        return pairs
    for path in (pred, ref):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
    raise UserError("--pred and --ref must both be files or both be folders")


def run_evaluate(pred: str | os.PathLike, ref: str | os.PathLike, labels: str | None = None,
                 out: str | os.PathLike | None = None, tolerance: float = DEFAULT_TOLERANCE_MM) -> dict:
    """Scores per case and label, and their means, as {"labels", "tolerance_mm", "cases", "mean"}; JSON at `out`."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance must be a distance >= 0 mm, got {tolerance}")
    cases = {}
    names: dict[str, int] = {}
    for case, p_path, r_path in pair_files(Path(pred), Path(ref)):
        p_img, r_img = read_image(p_path), read_image(r_path)
        names = resolve_labels(labels, p_path, r_img, p_img)
        cases[case] = evaluate_images(p_img, r_img, names, tolerance)
    result = {"labels": names, "tolerance_mm": tolerance, "cases": cases, "mean": _means(cases)}
    if out:
        write_json(result, out)
    return result


def _means(cases: dict) -> dict:
    """Per label: the mean of each metric over the cases that score it (misses included, at their stated maximum),
    and how many of those cases were misses."""
    means = {}
    for name in {n for scores in cases.values() for n in scores}:
        scored = [s[name] for s in cases.values() if name in s and s[name]["dice"] is not None]
        for metric in ("dice", "hd95", "nsd"):
            vals = [s[metric] for s in scored if s[metric] is not None]
            means.setdefault(name, {})[metric] = float(np.mean(vals)) if vals else None
        means[name].update(cases=len(scored), missed=sum(bool(s.get("missed")) for s in scored))
    return means


def format_table(result: dict) -> str:
    """Cases then means, one row per label; a missed structure's HD95 (the image diagonal) is marked '*'."""
    nsd = f"NSD@{result.get('tolerance_mm', DEFAULT_TOLERANCE_MM):g}mm"
    rows = [("case", "label", "Dice", "HD95 mm", nsd, "missed", "ref vox", "pred vox")]
    for case, scores in result["cases"].items():
        for name, s in scores.items():
            missed = bool(s.get("missed"))
            rows.append((case, name, _fmt(s["dice"], "absent"), _fmt(s["hd95"]) + ("*" if missed else ""),
                         _fmt(s.get("nsd")), "yes" if missed else "", str(s["ref_voxels"]), str(s["pred_voxels"])))
    for name in result["labels"]:
        s = result["mean"].get(name, {})
        count = f"{s['missed']}/{s['cases']}" if s.get("cases") else ""
        rows.append(("mean", name, _fmt(s.get("dice"), "absent"), _fmt(s.get("hd95")), _fmt(s.get("nsd")), count,
                     "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if any(s.get("missed") for scores in result["cases"].values() for s in scores.values()):
        lines.append("* missed (in one volume only): HD95 = the image diagonal, NSD = 0, Dice = 0")
    return "\n".join(lines)


def _fmt(value, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.4f}" if math.isfinite(value) else str(value)
