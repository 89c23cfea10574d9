"""Fine-tuning data: cases read onto the model grid (`geometry.to_model_grid`, the same path inference takes), cropped
to the body, padded to the ROI, their foreground and background voxels listed once, cached in memory; then random
crops centred on foreground or background with light augmentation that keeps left and right."""
from __future__ import annotations

import math

import numpy as np
import torch
from monai import transforms as T
from monai.data import CacheDataset

from engine.config.finetune import FinetuneConfig
from engine.imageio.geometry import body_select, image_array, label_to_grid, to_model_grid, window
from engine.imageio.volumes import array_xyz, read_image

IMAGE, LABEL = "image", "label"
FG, BG = LABEL + "_fg_indices", LABEL + "_bg_indices"  # FgBgToIndicesd's keys


class LoadCase:
    """{"image": path[, "label": path]} -> windowed image [1, X, Y, Z] in [0, 1] and label channel indices
    [1, X, Y, Z] on the model grid (label values mapped to 0..K-1 in the order of `label_values`)."""

    def __init__(self, spacing, hu_window, label_values: list[int] | None = None):
        self.spacing, self.hu_window = tuple(spacing), tuple(hu_window)
        self.lut = None
        if label_values is not None:
            self.lut = np.zeros(max(label_values) + 1, dtype=np.float32)
            self.lut[np.asarray(label_values)] = np.arange(len(label_values), dtype=np.float32)

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        grid = to_model_grid(read_image(item[IMAGE]), self.spacing)
        out[IMAGE] = window(image_array(grid), self.hu_window)[None]
        if self.lut is not None and isinstance(item.get(LABEL), str):
            values = array_xyz(label_to_grid(read_image(item[LABEL]), grid), np.int64)
            known = (values >= 0) & (values < len(self.lut))  # undeclared values (refused by verify_cases) -> 0
            out[LABEL] = np.where(known, self.lut[np.clip(values, 0, len(self.lut) - 1)], 0.0)[None]
        return out


def _crop_body(keys, hu_window) -> T.CropForegroundd:
    return T.CropForegroundd(keys, source_key=IMAGE, select_fn=body_select(hu_window),
                             margin=2, allow_smaller=True)


def segmentation_transforms(cfg: FinetuneConfig, label_values: list[int], train: bool) -> T.Compose:
    """Training: everything up to the voxel lists is deterministic (CacheDataset computes it once per case); the
    crops then pick their centres from those lists. Background centres are drawn from every voxel that is not
    foreground, air outside the body included, so that the network learns air as background."""
    keys, roi, a = [IMAGE, LABEL], (cfg.model.roi,) * 3, cfg.augment
    steps = [LoadCase(cfg.data.spacing, cfg.data.hu_window, label_values), _crop_body(keys, cfg.data.hu_window)]
    if not train:
        return T.Compose([*steps, T.EnsureTyped(keys, dtype=torch.float32, track_meta=False)])
    if cfg.crop.air_margin:
        steps.append(T.BorderPadd(keys, spatial_border=cfg.crop.air_margin, mode="constant"))  # 0: the window's low end, air
    steps += [
        T.SpatialPadd(keys, spatial_size=roi, mode="constant"),
        T.FgBgToIndicesd(LABEL),
        T.EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        T.RandCropByPosNegLabeld(keys, label_key=LABEL, spatial_size=roi, pos=cfg.crop.pos, neg=cfg.crop.neg,
                                 num_samples=cfg.crop.samples, fg_indices_key=FG, bg_indices_key=BG),
        T.DeleteItemsd([FG, BG]),
        *(T.RandFlipd(keys, prob=a.flip, spatial_axis=axis) for axis in a.flip_axes),
        T.RandRotate90d(keys, prob=a.rotate90, max_k=3, spatial_axes=tuple(a.rotate90_axes)),
        T.RandScaleIntensityd(IMAGE, factors=a.intensity_amount, prob=a.intensity),
        T.RandShiftIntensityd(IMAGE, offsets=a.intensity_amount, prob=a.intensity),
    ]
    return T.Compose(steps)


def classification_transforms(cfg: FinetuneConfig, train: bool) -> T.Compose:
    """The body, resized whole to ROI^3 (the classifier sees the full field of view)."""
    roi, a = (cfg.model.roi,) * 3, cfg.augment
    steps = [LoadCase(cfg.data.spacing, cfg.data.hu_window), _crop_body([IMAGE], cfg.data.hu_window),
             T.Resized(IMAGE, spatial_size=roi, mode="trilinear"),
             T.EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False)]
    if train:
        steps += [*(T.RandFlipd(IMAGE, prob=a.flip, spatial_axis=axis) for axis in a.flip_axes),
                  T.RandScaleIntensityd(IMAGE, factors=a.intensity_amount, prob=a.intensity),
                  T.RandShiftIntensityd(IMAGE, offsets=a.intensity_amount, prob=a.intensity)]
    return T.Compose(steps)


def steps_per_epoch(n_cases: int, batch_size: int) -> int:
    """Optimiser steps for every training case to be drawn once."""
    return math.ceil(n_cases / batch_size)


def cached(items: list[dict], transform: T.Compose) -> CacheDataset:
    """Everything before the first random transform is computed once and kept in memory."""
    return CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
