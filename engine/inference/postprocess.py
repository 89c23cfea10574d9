"""Post-processing chosen by validation, as nnU-Net chooses it: a label whose validation Dice rises when only its
largest connected component is kept gets that at inference too (model.pt lists it under `largest_component`).

A lung, a liver or a kidney is one connected piece; what a network adds elsewhere (a hollow CT couch that looks like
air inside the body, speckles) is not. Labels of structures that come in several pieces (lesions, vertebrae) keep
every component, since removing any lowers their Dice."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def keep_largest_component(labelmap: np.ndarray, value) -> np.ndarray:
    """`labelmap` with every voxel of `value` outside its largest face-connected component set to 0 (a copy)."""
    mask = sitk.GetImageFromArray((labelmap == value).astype(np.uint8))
    ranked = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask)))  # 1 = largest
    out = labelmap.copy()
    out[(labelmap == value) & (ranked != 1)] = 0
    return out


def keep_largest_components(labelmap: np.ndarray, values) -> np.ndarray:
    for value in values:
        labelmap = keep_largest_component(labelmap, value)
    return labelmap


def helps(before: np.ndarray, after: np.ndarray, margin: float = 1e-3) -> list[bool]:
    """Per label, whether keeping the largest component raised the validation Dice by more than `margin` (NaN, a
    label absent everywhere, never counts as a gain)."""
    return [bool(a > b + margin) for b, a in zip(before, after)]
