"""One PNG a person can read: rows = levels (one parent -> child chain), columns = input, masked input,
reconstruction, error. Axial slices in radiological convention (patient's right on the left, anterior up);
each parent row outlines, in yellow, the block its child row was cut from."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from engine.masking import LevelViews  # noqa: E402

COLUMNS = ("input", "masked input", "reconstruction", "|error|")
DISPLAY_HU = (-1000.0, 600.0)
ERROR_HU = 400.0  # the error panel's scale: 0 to this many HU


BODY_HU = -500.0  # denser than this is body (not air, not padding)


def chain(levels: list[LevelViews], body_level: float | None = None) -> list[int]:
    """View indices of one lineage: view 0 of the first level, then at each level below the child of the view
    above with the most body in it (voxels above `body_level`, in the views' [0, 1] scale; None: the first child).
    A child cut from the edge of the crop can be all air or padding, which shows nothing."""
    picked = [0]
    for views in levels[1:]:
        children = np.nonzero(views.parent.numpy() == picked[-1])[0]
        if body_level is None:
            picked.append(int(children[0]))
            continue
        body = [(views.images[c] > body_level).float().mean().item() for c in children]
        picked.append(int(children[int(np.argmax(body))]))
    return picked


def write_montage(path: Path, levels: list[LevelViews], results: list[dict], hu_window, names: list[str]) -> Path:
    lo, hi = hu_window
    picked = chain(levels, (BODY_HU - lo) / (hi - lo))
    fig, axes = plt.subplots(len(levels), 4, figsize=(12, 3.1 * len(levels)), squeeze=False, facecolor="black")
    for row, (views, res, v) in enumerate(zip(levels, results, picked)):
        child_box = _child_box(levels, row, picked)
        k = _slice_index(child_box, views.images.shape[-1])
        hu = lambda x: x * (hi - lo) + lo  # noqa: E731
        panels = [hu(views.images[v, 0].cpu().numpy()), hu(res["masked"][v, 0].numpy()),
                  hu(res["reconstruction"][v, 0].numpy()), None]
        panels[3] = np.abs(panels[2] - panels[0])
        mask = res["mask"][v, 0].numpy()
        for col, img in enumerate(panels):
            ax = axes[row, col]
            shown = _show(ax, img, k, col, mask)
            if col == 3:
                _colour_bar(fig, ax, shown)
            if child_box is not None and col < 3:
                _outline(ax, child_box, views.images.shape[-1])
            ax.set_axis_off()
            if row == 0:
                ax.set_title(COLUMNS[col], color="white", fontsize=12)
        axes[row, 0].text(-0.06, 0.5, f"{names[row]}\nview {v}\nloss {float(res['loss'][v]):.3f}",
                          transform=axes[row, 0].transAxes, color="white", fontsize=10, ha="right", va="center")
    fig.subplots_adjust(left=0.1, right=0.93, top=0.94, bottom=0.01, wspace=0.03, hspace=0.05)
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)
    return path


def _child_box(levels, row, picked):
    if row + 1 >= len(levels):
        return None
    return levels[row + 1].box_in_parent[picked[row + 1]].numpy()  # [2, 3] start, stop in this view's voxels


def _slice_index(child_box, roi: int) -> int:
    if child_box is None:
        return roi // 2
    return int((child_box[0, 2] + child_box[1, 2]) // 2)


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    """volume[i, j, k] in RAS -> a 2D image with the patient's right on the left and anterior at the top."""
    return volume[:, :, k].T[::-1, ::-1]


def _show(ax, img, k, col, mask):
    if col == 3:
        return ax.imshow(_axial(img, k), cmap="magma", vmin=0, vmax=ERROR_HU, interpolation="nearest")
    shown = ax.imshow(_axial(img, k), cmap="gray", vmin=DISPLAY_HU[0], vmax=DISPLAY_HU[1], interpolation="nearest")
    if col == 1:
        overlay = np.zeros((*_axial(mask, k).shape, 4))
        overlay[..., 2] = 1.0
        overlay[..., 3] = 0.35 * _axial(mask, k)
        ax.imshow(overlay, interpolation="nearest")
    return shown


def _colour_bar(fig, ax, shown) -> None:
    """The error panel's scale, in HU, beside it (white on the black figure)."""
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("|error| HU", color="white", fontsize=9)
    bar.ax.tick_params(colors="white", labelsize=8)
    bar.outline.set_edgecolor("white")


def _outline(ax, box, roi: int) -> None:
    """Outline box (start, stop in (i, j, k) voxels) on an axial image drawn by `_axial`."""
    (i0, j0, _), (i1, j1, _) = box
    x0, y0 = roi - i1 - 0.5, roi - j1 - 0.5
    ax.add_patch(Rectangle((x0, y0), i1 - i0, j1 - j0, fill=False, edgecolor="yellow", linewidth=1.5))
