"""Volume I/O through SimpleITK, and a MONAI `ImageReader` built on it.

Arrays follow MONAI's convention: axes (x, y, z) = (i, j, k), affine maps voxel (i, j, k) to RAS millimetres."""
from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from engine.errors import UserError
from engine.imageio.dicom import DicomVolume, read_dicom, series_grid

log = logging.getLogger(__name__)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_volume_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def read_image(path: str | os.PathLike, max_voxels: int | None = None) -> sitk.Image:
    """Read a 3D scalar volume (a file, or a folder holding one DICOM series), or raise a UserError that names the
    file and what is wrong with it.

    The header is read first: a volume whose header claims more voxels than `max_voxels` (default: what fits in
    half of this machine's memory as float32) is refused before anything is allocated. An irregular DICOM series is
    refused or resampled (`dicom.read_dicom`); a resampled one is reported once, in one line."""
    if Path(path).is_dir():
        volume = read_dicom(Path(path), max_voxels or _memory_voxels())
        if volume.geometry.resampled:
            _say_once(volume.note)
        return volume.image
    path = _volume_path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_floats(path)  # ITK's NIfTI reader turns NaN into 0 without a word
    if path.name.lower().endswith(".gz"):
        _check_gzip(path)  # ITK fills a truncated gzip stream with zeros instead of failing
    try:
        image = _header_reader(path, max_voxels).Execute()
    except RuntimeError as err:
        raise UserError(f"{path}: cannot read this volume ({_reason(err)})") from None
    _check_finite(path, image)
    return image


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume file's header says, without its voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_bytes: int  # bytes per voxel once read

    @property
    def voxels(self) -> int:
        return math.prod(self.size)


def read_header(path: str | os.PathLike) -> VolumeHeader:
    """The header of a volume file (or the grid a DICOM series folder will be read onto), checked as `read_image`
    checks it, without reading its voxels."""
    if Path(path).is_dir():
        grid, pixel_bytes = series_grid(Path(path))
        return VolumeHeader(grid.size, grid.spacing, grid.direction, pixel_bytes)
    path = _volume_path(path)
    try:
        reader = _header_reader(path, None)
    except RuntimeError as err:
        raise UserError(f"{path}: cannot read this volume ({_reason(err)})") from None
    one_voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    direction = np.array(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3]  # 4D: one time point
    return VolumeHeader(tuple(reader.GetSize()[:3]), tuple(reader.GetSpacing()[:3]),
                        tuple(map(float, direction.ravel())),
                        one_voxel.GetSizeOfPixelComponent() * reader.GetNumberOfComponents())


@cache
def _say_once(note: str) -> None:
    log.warning(note)


def _volume_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    return path


def _header_reader(path: Path, max_voxels: int | None) -> sitk.ImageFileReader:
    """A reader that has read and checked the header (3D scalar, a size this machine can hold, valid spacing)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    _check_header(path, reader, max_voxels)
    return reader


def _check_nifti_floats(path: Path) -> None:
    try:
        image = nib.load(str(path))
    except Exception:  # not readable by nibabel: SimpleITK will say what is wrong
        return
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return
    try:
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(image.dataobj))))
    except (EOFError, OSError, ValueError, zlib.error) as err:
        raise UserError(f"{path}: the file is truncated or corrupt ({_reason(err)})") from None
    if bad:
        raise UserError(f"{path}: {bad} voxel(s) are NaN or infinite")


def _check_gzip(path: Path) -> None:
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path}: the compressed file is truncated or corrupt ({_reason(err)})") from None


def _check_header(path: Path, reader: sitk.ImageFileReader, max_voxels: int | None) -> None:
    dim, size = reader.GetDimension(), reader.GetSize()
    if dim == 4 and size[3] == 1:
        return
    if dim != 3:
        raise UserError(f"{path}: expected a 3D volume, found {dim}D {tuple(size)}")
    if reader.GetNumberOfComponents() != 1:
        raise UserError(f"{path}: has {reader.GetNumberOfComponents()} values per voxel (a 4D or vector image); "
                        "expected a 3D scalar volume")
    voxels = int(np.prod(np.array(size, dtype=np.float64)))
    limit = max_voxels or _memory_voxels()
    if voxels > limit:
        raise UserError(f"{path}: the header claims {size[0]}x{size[1]}x{size[2]} voxels ({voxels * 4 / 2**30:.1f} GiB "
                        f"as float32), more than this machine can hold; refusing to allocate it")
    if any(s <= 0 or not np.isfinite(s) for s in reader.GetSpacing()):
        raise UserError(f"{path}: invalid voxel spacing {reader.GetSpacing()}")


def _check_finite(path: Path, image: sitk.Image) -> None:
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
    if bad:
        raise UserError(f"{path}: {bad} voxel(s) are NaN or infinite")


def _memory_voxels() -> int:
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages * page / 2 / 4)
    except (ValueError, OSError, AttributeError):
        return 2**33


def _reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unreadable")[:200]


def affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> RAS mm affine of a SimpleITK image."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def array_xyz(image: sitk.Image, dtype=np.float32) -> np.ndarray:
    """Voxel array with axes (x, y, z), without a float64 copy."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).astype(dtype, copy=False).transpose(2, 1, 0))


def write_nifti(array_xyz_: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a volume atomically: to a temporary name beside the target, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # same suffix, so nibabel compresses alike
    image = nib.Nifti1Image(np.asarray(array_xyz_), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(tmp))
    os.replace(tmp, path)
    return path


class SimpleITKReader(ImageReader):
    """MONAI reader for NIfTI, NRRD and MetaImage files via SimpleITK (no ITK-Python needed)."""

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(is_volume_file(n) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> Any:
        if isinstance(data, (list, tuple)):
            return [read_image(d) for d in data]
        return read_image(data)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        if isinstance(img, list):
            if len(img) != 1:
                raise UserError("SimpleITKReader reads one volume per item")
            img = img[0]
        affine = affine_ras(img)
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.array(img.GetSize()),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "pixdim": np.array([1.0, *img.GetSpacing(), 1, 1, 1, 1]),
        }
        return array_xyz(img), meta


def read_input(path: str | Path) -> tuple[sitk.Image, DicomVolume | None]:
    """A volume file, or a folder holding one DICOM series (with what reading it took, for the user and the output's
    sidecar). A folder with several series is refused (naming them): which one to segment is the user's call."""
    path = Path(path)
    if path.is_file():
        return read_image(path), None
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    volume = read_dicom(path, _memory_voxels())
    return volume.image, volume
