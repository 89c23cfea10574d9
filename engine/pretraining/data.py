"""Pre-training data: volumes read with our reader, brought to RAS at the preset spacing, windowed to [0, 1],
cropped to the body, cached, then random crops of side 2R (MiM) or R."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from monai import transforms as T
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset

from engine.config.sections import DataConfig
from engine.runtime.distributed import DistInfo
from engine.training.batches import endless_batches

if TYPE_CHECKING:
    from engine.config.pretrain import PretrainConfig
from engine.imageio.geometry import body_select
from engine.imageio.volumes import SimpleITKReader, read_image

log = logging.getLogger(__name__)
# files in a folder that hold labels, not images (nnU-Net's labelsTr, *_label, *_seg, *_mask)
IN_MEMORY_CACHE_MAX = 32  # volumes; beyond this, set data.cache_dir for a persistent cache


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
        T.CropForegroundd(keys, source_key=keys[0], select_fn=body_select(cfg.hu_window),
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


def batches(items: list[dict], cfg: PretrainConfig, start_step: int, info: DistInfo) -> Iterator:
    """Endless batches of random crops of this rank's share of `items` (drop_last: every batch is full)."""
    dataset = pretrain_dataset(items, cfg.data, cfg.crop_size)
    return endless_batches(dataset, cfg.data.batch_size, cfg.train.seed, start_step, info, drop_last=True,
                           workers=cfg.data.workers)
