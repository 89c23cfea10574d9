"""A segmentation a person can judge at a glance: axial CT slices with reference (dashed) and predicted (solid)
contours per label, radiological convention (patient's right on the left, anterior up); and the same slices with the
model's uncertainty (`infer --uncertainty`) over the CT, with its mean where the prediction is right and wrong."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from engine.imageio.terminology import label_colours  # noqa: E402
from engine.imageio.volumes import read_image  # noqa: E402


def contour_colours(labels: dict[str, int]) -> dict[str, str]:
    """{name: '#rrggbb'} of each label (background excluded): the shared table's colours, by position in value order,
    the same as the engine's .seg.nrrd and the Slicer module give the structure."""
    return {name: to_hex(rgb) for name, rgb in label_colours(labels).items()}


def write_overlay(ct: sitk.Image, pred_path: str | Path, ref_path: str | Path | None, labels: dict[str, int],
                  out: str | Path, dice: dict[str, float] | None = None, slices: int = 3) -> Path:
    """ct: the CT as read; pred/ref: labelmaps on its grid. Slices through the reference (or prediction)."""
    ct_lps = _lps(ct)
    pred = _lps(read_image(pred_path))
    ref = _lps(read_image(ref_path)) if ref_path else None
    ks = _pick_slices(ref if ref is not None else pred, slices)
    colours = contour_colours(labels)
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 4.6), squeeze=False, facecolor="black")
    for ax, k in zip(axes[0], ks):
        ax.imshow(_axial(ct_lps, k), cmap="gray", vmin=-160, vmax=240, interpolation="bilinear",
                  aspect=_aspect(ct))
        for name, colour in colours.items():
            value = labels[name]
            if ref is not None:
                _contour(ax, _axial(ref, k) == value, colour, "dashed")
            _contour(ax, _axial(pred, k) == value, colour, "solid")
        ax.set_title(f"axial slice {k}", color="white", fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color=colour, label=f"{name}" + (f"  Dice {dice[name]:.2f}" if dice and name in dice else ""))
               for name, colour in colours.items()]
    handles += [Line2D([], [], color="white", linestyle="dashed", label="reference"),
                 Line2D([], [], color="white", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), facecolor="black",
               labelcolor="white", frameon=False, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.12, wspace=0.02)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)
    return Path(out)


def _lps(image: sitk.Image) -> np.ndarray:
    """Voxel array [i, j, k] with i increasing to the patient's left, j to posterior, k to superior (DICOM's LPS):
    array[:, :, k].T is then an axial slice in radiological convention, as imshow draws it."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")).transpose(2, 1, 0)


def _aspect(image: sitk.Image) -> float:
    spacing = sitk.DICOMOrient(image, "LPS").GetSpacing()
    return spacing[1] / spacing[0]


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    return volume[:, :, k].T


def _pick_slices(label: np.ndarray, n: int) -> list[int]:
    ks = np.nonzero(label.reshape(-1, label.shape[2]).any(0))[0]
    if ks.size == 0:
        return [label.shape[2] // 2]
    return sorted({int(ks[int(round(q * (ks.size - 1)))]) for q in np.linspace(0.2, 0.8, n)})


def _contour(ax, mask: np.ndarray, colour: str, style: str) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linestyles=style, linewidths=1.3)


UNCERTAINTY_SHOWN_FROM = 0.25  # below this the CT shows through (the background of a 2-class model sits near 0.2)


def uncertainty_where_wrong(pred: np.ndarray, ref: np.ndarray, uncertainty: np.ndarray) -> dict[str, float]:
    """Mean uncertainty over the voxels where the prediction differs from the reference, and over those where it
    agrees (every voxel of the volume: the easy background included)."""
    wrong = pred != ref
    return {"wrong": float(uncertainty[wrong].mean()) if wrong.any() else float("nan"),
            "right": float(uncertainty[~wrong].mean()) if (~wrong).any() else float("nan"),
            "wrong_voxels": int(wrong.sum())}


def write_uncertainty_overlay(ct: sitk.Image, pred_path: str | Path, ref_path: str | Path | None,
                              uncertainty_path: str | Path, labels: dict[str, int], out: str | Path,
                              slices: int = 3) -> Path:
    """Axial slices: the CT, the uncertainty over it (inferno, 0 to 1, see-through under UNCERTAINTY_SHOWN_FROM),
    predicted (solid) and reference (dashed) contours, a colour bar; the title gives the mean uncertainty where the
    prediction is wrong and where it is right (when there is a reference)."""
    ct_lps, pred = _lps(ct), _lps(read_image(pred_path))
    ref = _lps(read_image(ref_path)) if ref_path else None
    unc = _lps(read_image(uncertainty_path))
    ks = _pick_slices(ref if ref is not None else pred, slices)
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks) + 0.8, 4.8), squeeze=False, facecolor="black")
    shown = None
    for ax, k in zip(axes[0], ks):
        ax.imshow(_axial(ct_lps, k), cmap="gray", vmin=-160, vmax=240, interpolation="bilinear", aspect=_aspect(ct))
        u = _axial(unc, k)
        shown = ax.imshow(np.ma.masked_less(u, UNCERTAINTY_SHOWN_FROM), cmap="inferno", vmin=0.0, vmax=1.0,
                          alpha=0.75, interpolation="nearest", aspect=_aspect(ct))
        for name, value in sorted(labels.items(), key=lambda kv: kv[1]):
            if ref is not None:
                _contour(ax, _axial(ref, k) == value, "#3cb44b", "dashed")
            _contour(ax, _axial(pred, k) == value, "#42d4f4", "solid")
        ax.set_title(f"axial slice {k}", color="white", fontsize=10)
        ax.set_axis_off()
    bar = fig.colorbar(shown, ax=list(axes[0]), fraction=0.02, pad=0.01)
    bar.set_label("uncertainty (normalised entropy)", color="white", fontsize=9)
    bar.ax.tick_params(colors="white", labelsize=8)
    if ref is not None:
        mean = uncertainty_where_wrong(pred, ref, unc)
        fig.suptitle(f"mean uncertainty where the prediction is wrong {mean['wrong']:.2f}, where it is right "
                     f"{mean['right']:.2f} ({mean['wrong_voxels']} voxels wrong)", color="white", fontsize=10)
    handles = [Line2D([], [], color="#42d4f4", label="prediction"),
               Line2D([], [], color="#3cb44b", linestyle="dashed", label="reference")]
    fig.legend(handles=handles, loc="lower center", ncol=2, facecolor="black", labelcolor="white", frameon=False,
               fontsize=9)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)
    return Path(out)
