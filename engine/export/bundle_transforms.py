"""The three places where MONAI's transforms, as an exported bundle chains them, would not compute what
`engine infer` computes, and the small transforms that make them agree:

1. The model grid. Both keep voxel 0 and interpolate trilinearly at the same points, but MONAI's Spacingd makes
   round((n - 1) * old / new + 1) voxels per axis, the engine (`imageio.geometry.to_model_grid`, SimpleITK)
   round(n * old / new), and SimpleITK reads up to half a voxel past the last voxel as the last voxel. So the
   bundle pads one voxel at the far end of each axis as a copy of the last (MONAI's BorderPadd, mode "edge")
   before Spacingd, and `EngineGridd` cuts Spacingd's grid, now never smaller, to the engine's size: value for
   value the engine's grid, so the body box and every sliding window fall at the same place. Invertd undoes both,
   the cut voxels coming back as copies of the last kept ones, as SimpleITK reads the probabilities. Half a voxel
   or more past a grid's last voxel SimpleITK reads the default instead: air for the CT (EngineGridd writes it
   there), zero probabilities, so background, on the way back (`PastEngineGridd`).
2. Outside the body's box, the engine sets the background probability to 1 before resampling back; MONAI's
   inverse of CropForegroundd pads every channel with 0. `append_box_channel` (before Invertd) adds a channel of
   ones over the box; after Invertd it is the box's resampled indicator m, and `background_outside_box` adds
   1 - m to the background: by linearity, the engine's background.
3. Precision: the bundle runs float32; `engine infer` uses bf16 autocast on CPUs with fast bf16. Not changed here
   (a portable bundle should not depend on the CPU it runs on)."""
from __future__ import annotations

import numpy as np
import torch
from monai.transforms import BorderPad, Crop, InvertibleTransform, MapTransform
from monai.utils import TraceKeys
from nibabel.orientations import io_orientation

from engine.imageio.geometry import AIR_HU
from engine.inference.postprocess import keep_largest_components

RESAMPLE = "SpatialResample"  # the operation MONAI's Spacingd records
EPSILON = 1e-6  # voxels: a position this close to SimpleITK's edge of a grid (index size - 0.5) counts as outside
FAR_PADDING = 1  # voxels BorderPadd adds at the far end of each axis before Spacingd


def engine_grid(image, far_padding: int = FAR_PADDING) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For the image a Spacingd has just resampled (a MetaTensor [C, ...]; `far_padding` voxels added to each axis
    before): the size `to_model_grid` gives it, and per axis the first model voxel at or past half a voxel beyond
    the input's last voxel (SimpleITK reads air there)."""
    op = image.applied_operations[-1]
    if op["class"] != RESAMPLE:
        raise ValueError(f"EngineGridd goes right after Spacingd; the last operation is {op['class']}")
    old = np.linalg.norm(np.asarray(op["extra_info"]["src_affine"], dtype=float)[:3, :3], axis=0)
    new = np.linalg.norm(np.asarray(image.affine, dtype=float)[:3, :3], axis=0)
    n = np.asarray(op["orig_size"], dtype=float) - far_padding
    size = tuple(int(s) for s in np.maximum(1, np.round(n * old / new)))
    return size, tuple(int(np.ceil((k - 0.5) * o / w - EPSILON)) for k, o, w in zip(n, old, new))


class EngineGridd(MapTransform, InvertibleTransform):
    """Cut Spacingd's grid at the far end of each axis to the engine's size, air where SimpleITK reads air (see the
    module's note 1)."""

    def __init__(self, keys, far_padding: int = FAR_PADDING, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.far_padding = far_padding
        self.crop = Crop()

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            (size, past_input), current = engine_grid(d[key], self.far_padding), d[key].shape[1:]
            if any(c < s for c, s in zip(current, size)):
                raise ValueError(f"Spacingd made {tuple(current)} voxels, fewer than the engine's {size}: pad the "
                                 f"far end by {self.far_padding} voxel(s) before Spacingd")
            d[key] = self.crop(d[key], tuple(slice(0, s) for s in size))  # spatial axes
            for axis, first in enumerate(past_input):
                _set_from(d[key], axis, first, AIR_HU)
        return d

    def inverse(self, data):
        """Back to Spacingd's size, the cut voxels filled with the last kept ones: SimpleITK, resampling the
        engine's probabilities back, reads less than half a voxel past the grid's last voxel as that voxel."""
        d = dict(data)
        for key in self.key_iterator(d):
            cropped = self.crop.pop_transform(d[key])[TraceKeys.EXTRA_INFO]["cropped"]
            padder = BorderPad(cropped, mode="edge")
            with padder.trace_transform(False):
                d[key] = padder(d[key])
        return d


def _set_from(tensor, axis: int, first: int, value: float, far_end: bool = True) -> None:
    """tensor [C, ...]: `value` from index `first` to the end of spatial `axis` (or, `far_end` False, over as many
    voxels from its start)."""
    n = tensor.shape[axis + 1]
    if first < n:
        index = [slice(None)] * tensor.ndim
        index[axis + 1] = slice(first, None) if far_end else slice(0, n - first)
        tensor[tuple(index)] = value


def append_box_channel(probabilities: torch.Tensor) -> torch.Tensor:
    """[K, ...] softmax over the body's box -> [K + 1, ...], the last channel all ones (see the module's note 2)."""
    return torch.cat([probabilities, torch.ones_like(probabilities[:1])])


def background_outside_box(probabilities: torch.Tensor) -> torch.Tensor:
    """[K + 1, ...] after Invertd -> [K, ...]: background + 1 - (the box's indicator), the indicator dropped."""
    background = probabilities[:1] + 1.0 - probabilities[-1:]
    return torch.cat([background, probabilities[1:-1]])


class PastEngineGridd(MapTransform):
    """Probabilities on the input grid [K, ...] (after Invertd) set to 0, so background, at the input voxels that lie
    half a voxel or more past the far end of the engine's model grid: where SimpleITK reads zeros when
    `engine infer` resamples its probabilities back (the last input voxel or two along an axis, if any)."""

    def __init__(self, keys, spacing, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spacing = [float(v) for v in spacing]  # the model's, along R, A, S

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = d[key]
            affine = np.asarray(probabilities.affine, dtype=float)
            for axis, (ras, sign) in enumerate(io_orientation(affine)):  # input axis -> RAS axis, same way or not
                n, old = probabilities.shape[axis + 1], float(np.linalg.norm(affine[:3, axis]))
                ratio = old / self.spacing[int(ras)]
                first = int(np.ceil((max(1, round(n * ratio)) - 0.5) / ratio - EPSILON))  # counted along RAS
                _set_from(probabilities, axis, first, 0.0, far_end=sign > 0)
        return d


class KeepLargestComponentsd(MapTransform):
    """A channel-index map [1, ...] (after argmax) with only the largest face-connected component kept of each of
    `channels`: the post-processing that `engine infer` applies to the labels model.pt lists (chosen on validation),
    with the same function."""

    def __init__(self, keys, channels, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = [int(c) for c in channels]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            index = d[key]
            kept = keep_largest_components(np.asarray(index[0].cpu().numpy()), self.channels)
            index[0] = torch.as_tensor(kept, dtype=index.dtype)
        return d
