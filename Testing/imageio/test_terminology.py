"""One name, one colour: the shared table (engine/imageio/terminology.py) gives a structure the same colour in the
engine's .seg.nrrd and in its overlay PNG (the Slicer side is Testing/slicer/test_slicer_terminology.py)."""
from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import SimpleITK as sitk
from engine_testing import CT_2MM, require_shared_data

from engine.imageio.labelmap import write_labelmap
from engine.imageio.terminology import PALETTE, colour_for, label_colours, terminology_entry
from engine.inference.overlay import contour_colours, write_overlay


def _kind(rgb):
    """'red', 'green' or '' by hue (saturated colours only)."""
    h, s, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    hue = h * 360
    if s < 0.3:
        return ""
    return "red" if hue >= 330 or hue <= 30 else "green" if 75 <= hue <= 165 else ""


def test_no_red_next_to_green_in_the_palette():
    pairs = [(PALETTE[i], PALETTE[(i + 1) % len(PALETTE)]) for i in range(len(PALETTE))]  # neighbours, wrapping
    assert not [p for p in pairs if {_kind(p[0]), _kind(p[1])} == {"red", "green"}]
    assert len(set(PALETTE)) == len(PALETTE)


def test_known_and_unknown_names():
    assert colour_for("Liver", 3) == colour_for("liver", 0)  # a known structure keeps its colour at any position
    assert colour_for("my structure", 0) != colour_for("my structure", 1)
    assert "^7771000^Left" in terminology_entry("kidney_left") and "^64033007^Kidney" in terminology_entry("kidney_left")
    assert terminology_entry("my structure") == ""
    assert contour_colours({"background": 0, "liver": 1})["liver"] == "#dd8265"


def test_a_structures_left_and_right_are_told_apart_everywhere():
    """Slicer's table gives both lungs one colour, and a left-right swap would not show: the left takes the
    complementary hue at the same lightness and saturation; the right and unsided names keep the table's colour."""
    import colorsys
    lung = tuple(c / 255 for c in (197, 165, 145))
    assert colour_for("Lung-Right", 0) == colour_for("lung", 4) == pytest.approx(lung)
    left = colour_for("lung_left", 1)
    assert [round(255 * c) for c in left] == [145, 177, 197]
    (h_r, l_r, s_r), (h_l, l_l, s_l) = colorsys.rgb_to_hls(*lung), colorsys.rgb_to_hls(*left)
    assert (l_l, s_l) == pytest.approx((l_r, s_r)) and abs((h_l - h_r) % 1.0 - 0.5) < 1e-6
    labels = {"background": 0, "lung_right": 1, "lung_left": 2, "kidney_right": 3, "kidney_left": 4}
    assert len(set(contour_colours(labels).values())) == 4  # the overlay's legend keeps them apart too


@pytest.fixture(scope="module")
def labelled_crop(tmp_path_factory):
    """ts_chest (real CT, heart 1 / aorta 2 of its label file) cropped around the heart, plus a third structure
    the table does not know (a box of the heart's voxels relabelled 3)."""
    require_shared_data()
    folder = tmp_path_factory.mktemp("crop")
    ct = sitk.ReadImage(str(CT_2MM / "ts_chest_ct.nii.gz"))[60:140, 20:100, 40:90]
    label = sitk.ReadImage(str(CT_2MM / "ts_chest_label.nii.gz"))[60:140, 20:100, 40:90]
    array = sitk.GetArrayFromImage(label).astype(np.uint8)
    assert {1, 2} <= set(np.unique(array).tolist())
    box = np.zeros_like(array, bool)
    box[20:30, 30:50, 30:50] = True
    array[box & (array == 1)] = 3
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(label)
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"))
    sitk.WriteImage(out, str(folder / "label.nii.gz"))
    return folder, {"heart": 1, "aorta": 2, "my structure": 3}


def test_seg_nrrd_and_overlay_give_a_structure_the_same_colour(labelled_crop, tmp_path):
    folder, labels = labelled_crop
    label = sitk.ReadImage(str(folder / "label.nii.gz"))
    seg = write_labelmap(label, tmp_path / "pred.seg.nrrd", labels)
    written = sitk.ReadImage(str(seg))
    from_nrrd = {written.GetMetaData(f"Segment{n}_Name"): tuple(float(c) for c in
                                                                 written.GetMetaData(f"Segment{n}_Color").split())
                 for n in range(3)}
    expected = label_colours(labels)
    assert set(from_nrrd) == set(expected)
    for name, colour in expected.items():
        assert np.allclose(from_nrrd[name], colour, atol=1e-6), name
        assert contour_colours(labels)[name] == "#" + "".join(f"{round(c * 255):02x}" for c in colour)
    assert "TerminologyEntry:" not in written.GetMetaData("Segment2_Tags")  # "my structure": no code, no tag
    assert json.loads((tmp_path / "pred.json").read_text())["labels"] == labels

    png = write_overlay(sitk.ReadImage(str(folder / "ct.nii.gz")), seg, None, labels, tmp_path / "overlay.png")
    import matplotlib.image
    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).reshape(-1, 3)
    for name, hex_colour in contour_colours(labels).items():  # each contour (and legend line) drawn in its colour
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(1) <= 3).sum() >= 20, name
