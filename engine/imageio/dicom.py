"""DICOM series folders: which series a folder holds, and reading its one series so that every voxel lies where it
was acquired.

The slices' geometry is classified from their headers before any voxel is read (`slices.classify`). A regular
series is read by SimpleITK as it always was. An irregular one is refused in one line with the numbers, or its
slices are read and put on a regular grid by `restack`: each grid slice is interpolated linearly along the normal
between the two acquired slices around it (an acquired slice that lies on the grid is copied as it is), and sampled
bilinearly in-plane at the grid's own pixel positions when the stack is tilted. SimpleITK's own reader would
instead stack the slices at their average spacing, placing each slice after a gap up to half a slice or more away
from where it was acquired."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.errors import UserError
from engine.imageio.slices import TILTED, Grid, SeriesGeometry, classify, read_slice_tags

AIR_HU = -1024.0  # what lies outside the scanner's field of view (and outside a tilted slice)
DICOM_MAGIC = b"DICM"  # at byte 128 of a DICOM Part 10 file
EXACT = 1e-4  # of a slice spacing: a grid slice this close to an acquired one is that slice


@dataclass(frozen=True)
class DicomVolume:
    """A DICOM series read onto a regular grid, with what was done to get there."""

    image: sitk.Image
    folder: Path
    uid: str
    geometry: SeriesGeometry

    @property
    def note(self) -> str:
        """One line: the series, and for a resampled one what was wrong and the grid it was put on."""
        head = f"{self.folder}: {series_name(self.uid)} ({len(self.geometry.files)} slices)"
        if not self.geometry.resampled:
            return head
        return f"{head}: {self.geometry.describe()}; {resampled_to(self.geometry)}"

    def record(self) -> dict:
        """For an output's JSON sidecar."""
        record = {"series": self.uid, "slices": len(self.geometry.files), "geometry": list(self.geometry.kinds),
                  "resampled": self.geometry.resampled}
        if self.geometry.resampled:
            record.update(details=list(self.geometry.details), message=self.note,
                          grid=self.geometry.grid.to_dict())
        return record


def series_name(uid: str) -> str:
    return f"DICOM series {uid}" if uid else "DICOM series (no Series Instance UID)"


def resampled_to(geometry: SeriesGeometry) -> str:
    grid = geometry.grid
    wide = f", {grid.size[0]}x{grid.size[1]} pixels to hold every tilted slice" if TILTED in geometry.kinds else ""
    return (f"resampled onto a regular grid of {grid.size[2]} slices {grid.spacing[2]:.2f} mm apart{wide}, "
            "linearly between the acquired slices")


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == DICOM_MAGIC
    except OSError:
        return False


def dicom_folders(root: Path) -> list[Path]:
    """The folders under `root` (itself included) that directly hold DICOM files."""
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    return [f for f in folders if any(p.is_file() and is_dicom_file(p) for p in f.iterdir())]


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """Series UID -> slice files (in SimpleITK's order), for the DICOM series directly in `folder`."""
    with _quiet_itk():  # ITK warns on stderr when a folder holds no series
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
        return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}


def series_geometry(folder: Path) -> tuple[str, SeriesGeometry]:
    """The folder's one series and its geometry, from the slice headers alone; refused series raise a UserError."""
    uid, files = _one_series(folder)
    geometry = classify([read_slice_tags(f) for f in files])
    if geometry.refused:
        raise UserError(f"{folder}: {series_name(uid)}: {geometry.describe()}")
    return uid, geometry


def series_grid(folder: Path) -> tuple[Grid, int]:
    """The grid a series will be read onto, and its bytes per voxel, without reading voxels."""
    _, geometry = series_geometry(folder)
    if geometry.grid is not None:
        return geometry.grid, 4 if geometry.resampled else geometry.pixel_bytes
    reader = sitk.ImageFileReader()  # one file: SimpleITK's reading of it
    reader.SetFileName(geometry.files[0])
    reader.ReadImageInformation()
    size = tuple(reader.GetSize()) + (1,) * (3 - reader.GetDimension())
    return Grid(size[:3], tuple(reader.GetSpacing())[:3], tuple(reader.GetOrigin())[:3],
                tuple(reader.GetDirection())[:9]), geometry.pixel_bytes


def read_dicom(folder: Path, max_voxels: int) -> DicomVolume:
    """The folder's one series on a regular grid (see the module's docstring); refused series raise a UserError,
    before any voxel is read, as does a grid of more than `max_voxels`."""
    uid, geometry = series_geometry(folder)
    if geometry.grid is not None and math.prod(geometry.grid.size) > max_voxels:
        size = "x".join(map(str, geometry.grid.size))
        raise UserError(f"{folder}: {series_name(uid)} would be {size} voxels, more than this machine can hold")
    stack = _read_slices(folder, uid, geometry.files)
    image = restack(stack, geometry) if geometry.resampled else stack
    return DicomVolume(image, folder, uid, geometry)


def _one_series(folder: Path) -> tuple[str, list[str]]:
    series = dicom_series(folder)
    if not series:
        raise UserError(f"{folder}: no DICOM series in this folder (volume files are read one by one: pass a file)")
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({len(files)} slices)" for uid, files in sorted(series.items(),
                                                                                   key=lambda kv: -len(kv[1])))
        raise UserError(f"{folder}: {len(series)} DICOM series in this folder: {listed}; "
                        "put the one to segment in a folder of its own")
    return next(iter(series.items()))


def _read_slices(folder: Path, uid: str, files: tuple[str, ...]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        with _quiet_itk():  # its "non uniform sampling" warning: we classified the series ourselves
            return reader.Execute()
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or ["unreadable"]
        raise UserError(f"{folder}: cannot read {series_name(uid)} ({lines[-1][:200]})") from None


@contextmanager
def _quiet_itk():
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def restack(stack: sitk.Image, geometry: SeriesGeometry) -> sitk.Image:
    """The slices of `stack` (in `geometry.files` order) on `geometry.grid`, as float32."""
    grid, t = geometry.grid, geometry.positions
    acquired = sitk.GetArrayViewFromImage(stack)  # [n, rows, columns]
    out = np.empty(grid.size[::-1], np.float32)  # [k, j, i]
    for m, at in enumerate(t[0] + np.arange(grid.size[2]) * grid.spacing[2]):
        k = min(int(np.searchsorted(t, at, side="right")) - 1, len(t) - 2)
        w = (at - t[k]) / (t[k + 1] - t[k])  # 0 at slice k, 1 at slice k + 1
        if w < EXACT:
            out[m] = _plane(acquired, k, geometry)
        elif w > 1 - EXACT:
            out[m] = _plane(acquired, k + 1, geometry)
        else:
            out[m] = (1 - w) * _plane(acquired, k, geometry) + w * _plane(acquired, k + 1, geometry)
    image = sitk.GetImageFromArray(out)
    image.SetOrigin(grid.origin), image.SetSpacing(grid.spacing), image.SetDirection(grid.direction)
    return image


def _plane(acquired: np.ndarray, k: int, geometry: SeriesGeometry) -> np.ndarray:
    """Acquired slice k [rows, columns] at the grid's in-plane pixel positions (air where it has no pixel)."""
    grid = geometry.grid
    if not geometry.offsets[k].any() and acquired.shape[1:] == grid.size[1::-1]:
        return acquired[k].astype(np.float32)
    source = sitk.GetImageFromArray(acquired[k].astype(np.float32))
    source.SetSpacing(grid.spacing[:2])
    source.SetOrigin(tuple(float(o) for o in geometry.offsets[k]))  # mm along rows, columns from the grid origin
    plane = sitk.Resample(source, grid.size[:2], sitk.Transform(2, sitk.sitkIdentity), sitk.sitkLinear, (0.0, 0.0),
                          grid.spacing[:2], (1.0, 0.0, 0.0, 1.0), AIR_HU, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(plane)
