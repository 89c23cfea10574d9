"""Where the slices of a DICOM series lie, from their headers alone, and what kind of stack they make.

`read_slice_tags` reads one file's Image Position and Orientation (Patient), frame of reference and acquisition
number with SimpleITK's header reader (no voxels). `classify` sorts the slices along their normal and says what the
stack is, in a `SeriesGeometry`:
- regular: read as it is;
- missing slices, non-uniform spacing, gantry tilt (parallel slices not stacked along their normal): resampled onto
  a regular grid at the true spacing over the true extent, so every voxel lies where it was acquired;
- duplicate positions, mixed orientations (or slice sizes), several frames of reference or overlapping
  acquisitions, slices without a position, and gaps wider than `MAX_FILLED` missing slices: refused.
The numbers in each sentence are the ones a user needs to find the problem in the files."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.errors import UserError

POSITION, ORIENTATION, FRAME, ACQUISITION = "0020|0032", "0020|0037", "0020|0052", "0020|0012"

REGULAR = "regular"
MISSING = "missing slices"
NON_UNIFORM = "non-uniform spacing"
TILTED = "gantry tilt"  # parallel slices, not stacked along their normal
DUPLICATE = "duplicate positions"
MIXED = "mixed orientations"  # slices not parallel, or of different sizes or pixel spacings
SEVERAL = "several scans"  # several frames of reference, or acquisitions that overlap
UNPLACED = "no position"
TOO_WIDE = "gap too wide"
RESAMPLED = (MISSING, NON_UNIFORM, TILTED)
REFUSED = (DUPLICATE, MIXED, SEVERAL, UNPLACED, TOO_WIDE)

SLICE_TOLERANCE = 0.1  # of the slice spacing: a slice this close to its place on the regular grid is in place
PIXEL_TOLERANCE = 0.1  # of the pixel spacing: in-plane shifts below this (or POSITION_FLOOR_MM) are rounding
POSITION_FLOOR_MM = 0.05  # positions are often written with one decimal
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
MAX_FILLED = 2  # missing slices in a row that are interpolated; a wider gap is refused
SHOWN = 3  # problems spelled out in one message; the rest are counted


@dataclass(frozen=True)
class SliceTags:
    """What one slice file's header says about where its pixels lie."""

    file: str
    position: tuple[float, float, float] | None  # Image Position (Patient): the first pixel's centre, LPS mm
    orientation: tuple[float, ...] | None  # Image Orientation (Patient): row and column direction cosines
    frame: str  # Frame of Reference UID
    acquisition: str  # Acquisition Number
    size: tuple[int, int]  # columns, rows
    spacing: tuple[float, float]  # mm between columns, between rows
    pixel_bytes: int  # bytes per pixel as SimpleITK reads it


@dataclass(frozen=True)
class Grid:
    """A regular 3D grid, as SimpleITK describes one (direction row-major, columns along i, j, k)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": [round(s, 6) for s in self.spacing],
                "origin": [round(o, 6) for o in self.origin], "direction": [round(d, 9) for d in self.direction]}


@dataclass(frozen=True)
class SeriesGeometry:
    """What kind of stack a series is, why (one sentence per finding, with the numbers) and where it goes."""

    kinds: tuple[str, ...]  # (REGULAR,), or each finding's kind
    details: tuple[str, ...]  # one sentence per finding
    files: tuple[str, ...]  # sorted along the slice normal
    positions: np.ndarray | None = None  # [n] mm along the normal, ascending
    offsets: np.ndarray | None = None  # [n, 2] mm along rows, columns from the grid's origin (tilted series)
    grid: Grid | None = None  # where the voxels go; None when refused, or for a one-file series
    pixel_bytes: int = 2

    @property
    def refused(self) -> bool:
        return any(kind in REFUSED for kind in self.kinds)

    @property
    def resampled(self) -> bool:
        return not self.refused and any(kind in RESAMPLED for kind in self.kinds)

    def describe(self) -> str:
        return "; ".join(self.details)


def read_slice_tags(file: str) -> SliceTags:
    """One file's placement tags, from its header (no voxels read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise UserError(f"{file}: cannot read this DICOM file ({_last_line(err)})") from None
    tags = {key: reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
            for key in (POSITION, ORIENTATION, FRAME, ACQUISITION)}
    one_pixel = sitk.Image([1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
    return SliceTags(str(file), _numbers(tags[POSITION], 3), _numbers(tags[ORIENTATION], 6), tags[FRAME],
                     tags[ACQUISITION], tuple(reader.GetSize()[:2]), tuple(reader.GetSpacing()[:2]),
                     one_pixel.GetSizeOfPixelComponent() * reader.GetNumberOfComponents())


def _numbers(text: str, count: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return values if len(values) == count and all(np.isfinite(values)) else None


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unreadable")[:200]


def classify(slices: list[SliceTags]) -> SeriesGeometry:
    """The geometry of a series' slices: regular, resampled (and why) or refused (and why)."""
    if len(slices) < 2:  # one file (perhaps multi-frame): nothing to stack
        return SeriesGeometry((REGULAR,), (), tuple(s.file for s in slices), pixel_bytes=slices[0].pixel_bytes)
    refusal = _unplaced(slices) or _several_frames(slices) or _mixed(slices)
    if refusal:
        return SeriesGeometry((refusal[0],), (refusal[1],), tuple(s.file for s in slices))
    stack = Stack(slices)
    refusal = _overlapping_acquisitions(stack) or _duplicates(stack)
    if refusal:
        return SeriesGeometry((refusal[0],), (refusal[1],), stack.files)
    findings = [f for f in (_tilt(stack), _spacing(stack)) if f]
    kinds, details = tuple(f[0] for f in findings) or (REGULAR,), tuple(f[1] for f in findings)
    if TOO_WIDE in kinds:
        return SeriesGeometry(kinds, details, stack.files)
    tilted = TILTED in kinds
    return SeriesGeometry(kinds, details, stack.files, stack.t, stack.in_plane_offsets(tilted),
                          stack.grid(regular=kinds == (REGULAR,), tilted=tilted), slices[0].pixel_bytes)


class Stack:
    """Parallel slices sorted along their normal: t (mm along the normal), u and v (mm along rows and columns)."""

    def __init__(self, slices: list[SliceTags]):
        first = slices[0]
        self.row, self.column = np.array(first.orientation[:3]), np.array(first.orientation[3:])
        normal = np.cross(self.row, self.column)
        self.normal = normal / np.linalg.norm(normal)
        positions = np.array([s.position for s in slices])
        order = np.lexsort(([s.file for s in slices], positions @ self.normal))
        self.slices = [slices[i] for i in order]
        self.files = tuple(s.file for s in self.slices)
        self.t, self.u, self.v = (positions[order] @ axis for axis in (self.normal, self.row, self.column))
        self.size, self.pixel = first.size, first.spacing
        self.gaps = np.diff(self.t)
        moving = self.gaps[self.gaps > POSITION_FLOOR_MM / 10]
        self.spacing = float(np.median(moving)) if moving.size else 0.0  # the usual distance between slices

    @property
    def tolerance(self) -> float:
        return SLICE_TOLERANCE * self.spacing

    def in_plane_offsets(self, tilted: bool) -> np.ndarray:
        """[n, 2] mm of each slice's first pixel from the grid origin along rows and columns (0 unless tilted)."""
        if not tilted:
            return np.zeros((len(self.t), 2))
        return np.stack([self.u - self.u.min(), self.v - self.v.min()], axis=1)

    def grid(self, regular: bool, tilted: bool) -> Grid:
        """The regular grid: as SimpleITK reads a regular series, else at the usual spacing over the true extent
        (both end slices on it) and, when tilted, wide enough in-plane for every slice."""
        extent = self.t[-1] - self.t[0]
        count = len(self.t) if regular else int(round(extent / self.spacing)) + 1
        step = extent / (count - 1)
        offsets = self.in_plane_offsets(tilted)
        u0, v0 = (self.u.min(), self.v.min()) if tilted else (self.u[0], self.v[0])
        columns, rows = (n + int(np.ceil(offsets[:, a].max() / p - PIXEL_TOLERANCE))
                         for a, (n, p) in enumerate(zip(self.size, self.pixel)))
        origin = u0 * self.row + v0 * self.column + self.t[0] * self.normal
        direction = np.stack([self.row, self.column, self.normal], axis=1)
        return Grid((columns, rows, count), (*map(float, self.pixel), float(step)),
                    tuple(map(float, origin)), tuple(map(float, direction.ravel())))


def _unplaced(slices: list[SliceTags]) -> tuple[str, str] | None:
    lost = [s for s in slices if s.position is None or s.orientation is None
            or np.linalg.norm(np.cross(s.orientation[:3], s.orientation[3:])) < 0.5]  # rows along the columns
    if not lost:
        return None
    return UNPLACED, (f"{len(lost)} of {len(slices)} slice files have no readable Image Position/Orientation "
                      f"(Patient), first {Path(lost[0].file).name}: the slices cannot be placed")


def _several_frames(slices: list[SliceTags]) -> tuple[str, str] | None:
    frames = Counter(s.frame for s in slices if s.frame)
    if len(frames) < 2:
        return None
    listed = ", ".join(f"{uid} ({n} slices)" for uid, n in frames.most_common())
    return SEVERAL, (f"slices from {len(frames)} frames of reference in one series: {listed}; slices of different "
                     "scans cannot be stacked: put each scan in a folder of its own")


def _mixed(slices: list[SliceTags]) -> tuple[str, str] | None:
    groups: list[list[SliceTags]] = []
    for s in slices:
        home = next((g for g in groups if np.abs(np.subtract(g[0].orientation, s.orientation)).max()
                     <= ORIENTATION_TOLERANCE), None)
        if home is None:
            groups.append([s])
        else:
            home.append(s)
    if len(groups) > 1:
        groups.sort(key=len, reverse=True)
        listed = " and ".join(f"{len(g)} at ({', '.join(f'{c:g}' for c in np.round(g[0].orientation, 4))})"
                              f"{_first_file(g, groups)}" for g in groups[:SHOWN])
        return MIXED, (f"slices in {len(groups)} orientations: {listed}; slices that are not parallel cannot be "
                       "stacked into one volume")
    for what, key, show in (("sizes", lambda s: s.size, lambda v: f"{v[0]}x{v[1]}"),
                            ("pixel spacings", lambda s: tuple(np.round(s.spacing, 3)),
                             lambda v: f"{v[0]:g}x{v[1]:g} mm")):
        counts = Counter(key(s) for s in slices)
        if len(counts) > 1:
            listed = " and ".join(f"{n} of {show(v)}" for v, n in counts.most_common(SHOWN))
            odd = next(s for s in slices if key(s) != counts.most_common(1)[0][0])
            return MIXED, (f"slices of {len(counts)} {what}: {listed} (first odd one: {Path(odd.file).name}); "
                           "they cannot be stacked into one volume")
    return None


def _first_file(group: list[SliceTags], groups: list[list[SliceTags]]) -> str:
    return "" if group is groups[0] else f" (first: {Path(group[0].file).name})"


def _overlapping_acquisitions(stack: Stack) -> tuple[str, str] | None:
    by_acquisition: dict[str, list[float]] = {}
    for s, t in zip(stack.slices, stack.t):
        by_acquisition.setdefault(s.acquisition, []).append(float(t))
    if len(by_acquisition) < 2:
        return None
    ranges = sorted((min(ts), max(ts), number, len(ts)) for number, ts in by_acquisition.items())
    for (lo_a, hi_a, a, n_a), (lo_b, hi_b, b, n_b) in pairwise(ranges):
        if lo_b <= hi_a + stack.tolerance:
            return SEVERAL, (f"acquisitions {a or '(none)'} ({n_a} slices, {lo_a:.1f} to {hi_a:.1f} mm) and "
                             f"{b or '(none)'} ({n_b} slices, {lo_b:.1f} to {hi_b:.1f} mm) overlap in one series: "
                             "put each acquisition in a folder of its own")
    return None


def _duplicates(stack: Stack) -> tuple[str, str] | None:
    same = np.flatnonzero(stack.gaps <= stack.tolerance)
    if not same.size:
        return None
    if stack.spacing == 0.0:
        return DUPLICATE, f"all {len(stack.t)} slices lie at the same position, {stack.t[0]:.1f} mm along the normal"
    pairs = [f"{stack.t[k]:.1f} mm ({Path(stack.files[k]).name} and {Path(stack.files[k + 1]).name})"
             for k in same[:SHOWN]]
    more = f" and {same.size - SHOWN} more" if same.size > SHOWN else ""
    return DUPLICATE, (f"{same.size} pair(s) of slices at the same position: {', '.join(pairs)}{more}; "
                       "remove the extra copies")


def _tilt(stack: Stack) -> tuple[str, str] | None:
    """Parallel slices whose first pixels drift in-plane as they advance: a gantry tilt (or a shear)."""
    shift = np.stack([stack.u - stack.u[0], stack.v - stack.v[0]], axis=1)  # [n, 2] mm
    tolerance = max(PIXEL_TOLERANCE * min(stack.pixel), POSITION_FLOOR_MM)
    if np.abs(shift).max() <= tolerance:
        return None
    along = stack.t - stack.t[0]
    per_mm = np.linalg.lstsq(along[:, None], shift, rcond=None)[0][0]  # [2] in-plane mm per mm along the normal
    straight = np.abs(shift - along[:, None] * per_mm).max() <= tolerance
    largest = float(np.linalg.norm(shift, axis=1).max())
    if straight:
        angle = np.degrees(np.arctan(np.linalg.norm(per_mm)))
        return TILTED, (f"gantry tilt of {angle:.1f}°: each slice is shifted "
                        f"{np.linalg.norm(per_mm) * stack.spacing:.2f} mm in-plane from the one before "
                        f"({largest:.1f} mm over the series)")
    return TILTED, f"slices are not stacked along their normal: shifted in-plane by up to {largest:.1f} mm"


def _spacing(stack: Stack) -> tuple[str, str] | None:
    """Missing slices (gaps that are whole multiples of the usual spacing) or a non-uniform spacing."""
    d, t = stack.spacing, stack.t
    straight = t[0] + np.arange(len(t)) * (t[-1] - t[0]) / (len(t) - 1)
    if np.abs(t - straight).max() <= stack.tolerance:
        return None
    steps = np.round(stack.gaps / d).astype(int)
    if np.all(np.abs(stack.gaps - steps * d) <= stack.tolerance):
        return _missing(stack, steps)
    return _non_uniform(stack)


def _missing(stack: Stack, steps: np.ndarray) -> tuple[str, str]:
    d, t = stack.spacing, stack.t
    index = np.concatenate([[0], np.cumsum(steps)])  # each slice's place on the regular grid
    gaps = np.flatnonzero(steps > 1)
    sentences = []
    for k in gaps[:SHOWN]:
        first, last = index[k] + 2, index[k + 1]  # 1-based numbers of the missing slices
        which = f"slice {first}" if first == last else f"slices {first}-{last}"
        sentences.append(f"{which} missing: {stack.gaps[k]:.2f} mm between positions {t[k]:.1f} and "
                         f"{t[k + 1]:.1f}, expected {d:.2f}")
    more = f" (and {gaps.size - SHOWN} more gaps)" if gaps.size > SHOWN else ""
    text = "; ".join(sentences) + more
    if steps.max() - 1 > MAX_FILLED:
        return TOO_WIDE, (f"{text}: more than {MAX_FILLED} missing slices in a row are not filled in "
                          "(the interpolated slices would be invented anatomy)")
    return MISSING, text


def _non_uniform(stack: Stack) -> tuple[str, str]:
    d, t, gaps = stack.spacing, stack.t, stack.gaps
    worst = int(np.argmax(np.abs(gaps - d)))
    text = (f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm (usually {d:.2f}): "
            f"{gaps[worst]:.2f} mm between positions {t[worst]:.1f} and {t[worst + 1]:.1f}")
    if gaps.max() > (MAX_FILLED + 1) * d + stack.tolerance:
        widest = int(np.argmax(gaps))
        return TOO_WIDE, (f"{text}; the gap of {gaps[widest]:.2f} mm between positions {t[widest]:.1f} and "
                          f"{t[widest + 1]:.1f} is over {MAX_FILLED + 1} times the usual spacing: too wide to fill in")
    return NON_UNIFORM, text
