"""Per-voxel uncertainty of a segmentation: the normalised entropy of its mean softmax probabilities.

    H(x) = -sum_k p_k(x) log p_k(x) / log K,   in [0, 1]: 0 where one class has all the probability, 1 where all K
    classes are equally likely.

The probabilities are the ones the labelmap is the argmax of: the mean over flip test-time augmentation when it is
on, else the single pass, resampled linearly from the model grid onto the input image one channel at a time (as
`geometry.back_to_input` does), so the volume lies on exactly the input's grid and peaks where the labelmap's
boundaries are. Outside the model grid every channel reads 0, and the entropy is 0 there, as for the background
outside the body box, whose probabilities are one-hot."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from engine.imageio.geometry import resample_channel


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """probabilities [K, ...] (summing to 1 over K) -> normalised entropy [...] (float32, in [0, 1])."""
    total = np.zeros(probabilities.shape[1:], dtype=np.float32)
    for prob in probabilities:
        _add_entropy_term(total, prob)
    return _normalise(total, probabilities.shape[0])


def uncertainty_image(probabilities: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Normalised entropy of `probabilities` [K, X, Y, Z] (on `grid`) after each channel is resampled onto
    `reference`: a float32 image with the reference's size, origin, spacing and direction."""
    total = None
    for prob in probabilities:
        on_input = sitk.GetArrayFromImage(resample_channel(prob, grid, reference))  # [z, y, x]
        total = np.zeros(on_input.shape, dtype=np.float32) if total is None else total
        _add_entropy_term(total, on_input)
    image = sitk.GetImageFromArray(_normalise(total, probabilities.shape[0]))
    image.CopyInformation(reference)
    return image


def _add_entropy_term(total: np.ndarray, prob: np.ndarray) -> None:
    """total -= p log p, in place, with 0 log 0 = 0."""
    p = np.clip(prob, 0.0, 1.0).astype(np.float32, copy=False)
    total -= p * np.log(np.maximum(p, np.float32(1e-12)))


def _normalise(entropy: np.ndarray, classes: int) -> np.ndarray:
    if classes < 2:
        return np.zeros_like(entropy)
    return np.clip(entropy / np.float32(np.log(classes)), 0.0, 1.0).astype(np.float32, copy=False)
