"""Dataset descriptors (a folder of volumes or a MONAI decathlon JSON) and the MONAI transforms of each stage."""
from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path

import numpy as np
from monai import transforms as T
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset

from engine.config import DataConfig
from engine.errors import UserError
from engine.imageio import SimpleITKReader, is_volume_file, read_image

log = logging.getLogger(__name__)
# files in a folder that hold labels, not images (nnU-Net's labelsTr, *_label, *_seg, *_mask)
IN_MEMORY_CACHE_MAX = 32  # volumes; beyond this, set data.cache_dir for a persistent cache
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
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_volume_file(p) and "labelsTr" not in p.parts)
    images = [p for p in files if not LABEL_NAME.search(p.name)]
    if len(images) < len(files):
        log.info("%s: skipped %d label file(s)", folder, len(files) - len(images))
    if not images:
        raise UserError(f"{folder}: no volumes found (looked for {', '.join(('.nii.gz', '.nii', '.nrrd', '.mha'))})")
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


class LoadVolumed(T.MapTransform):
    """Load volumes with our SimpleITK reader into MetaTensors (RAS affine). Unlike MONAI's LoadImaged, it never
    falls back to another reader, so a bad file gives our one clear error instead of a second reader's."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array, meta = SimpleITKReader().get_data(read_image(d[key]))
            meta["filename_or_obj"] = str(d[key])
            d[key] = MetaTensor(array, meta=meta)  # the affine travels in meta["affine"]
        return d


def preprocess_transforms(cfg: DataConfig, keys=("image",)) -> list:
    """Deterministic part: load, RAS, resample, HU window -> [0, 1], crop to the body."""
    lo, hi = cfg.hu_window
    return [
        LoadVolumed(keys),
        T.EnsureChannelFirstd(keys, channel_dim="no_channel"),
        T.Orientationd(keys, axcodes="RAS", labels=None),
        T.Spacingd(keys, pixdim=tuple(cfg.spacing), mode="bilinear"),
        T.ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        T.CropForegroundd(keys, source_key=keys[0], select_fn=partial(_denser_than, level=(-500.0 - lo) / (hi - lo)),
                          allow_smaller=True),
        T.EnsureTyped(keys, dtype=np.float32, track_meta=True),
    ]


def pretrain_dataset(items: list[dict], cfg: DataConfig, crop: int):
    """Random crops of side `crop` (2R for MiM), padded where a volume is smaller."""
    random_part = [
        T.SpatialPadd(["image"], spatial_size=(crop,) * 3, mode="constant", value=0.0),
        T.RandSpatialCropd(["image"], roi_size=(crop,) * 3, random_size=False),
    ]
    items = [{"image": it["image"]} for it in items]
    transform = T.Compose(preprocess_transforms(cfg) + random_part)
    if cfg.cache_dir:  # preprocessed volumes on disk, reused across runs (large datasets)
        Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=cfg.cache_dir)
    if len(items) <= IN_MEMORY_CACHE_MAX:  # small datasets: preprocess once, keep in memory
        return CacheDataset(items, transform, num_workers=None, progress=False)
    return Dataset(items, transform)


def _denser_than(x, level: float):
    """Foreground for cropping: the body, i.e. voxels denser than -500 HU (`level` is that HU once windowed)."""
    return x > level
