"""infer --dicom-seg: a DICOM Segmentation object over a real CT series (0.98 x 0.98 x 3 mm slices), read back with
highdicom, for a regular series and for one missing a slice (which inference resamples): it references every source
slice, the study and the frame of reference, names and codes one segment per label, and holds, slice by slice, the
labelmap written beside it; an input that is not a DICOM series is refused in one line; label names map to SNOMED CT
codes where obvious."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from engine_testing import STUDY_UID, real_ct_series

from engine.cli import main

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder, _ = real_ct_series(tmp_path_factory.mktemp("dicom") / "series")
    return folder


@pytest.mark.parametrize("missing_slice", [False, True])
def test_seg_references_the_series_and_holds_the_labelmap(series, lung_run, missing_slice, tmp_path, capsys):
    if missing_slice:  # slice 12 of 24 lost: the engine fills it in on a regular grid; the SEG keeps to the 23 files
        copy = tmp_path / "series"
        copy.mkdir()
        for f in sorted(series.iterdir()):
            if f.name != "s012.dcm":
                (copy / f.name).write_bytes(f.read_bytes())
        series = copy
    out = tmp_path / "pred" / "chest.seg.nrrd"
    assert main(["infer", "--checkpoint", str(lung_run / "model.pt"), "--input", str(series), "--output", str(out),
                 "--dicom-seg", "--progress", "none"]) == 0
    capsys.readouterr()
    seg_path = tmp_path / "pred" / "chest.dcm"
    sidecar = json.loads((tmp_path / "pred" / "chest.json").read_text())
    assert sidecar["dicom_seg"] == seg_path.name and sidecar["dicom"]["resampled"] == missing_slice
    seg = hd.seg.segread(seg_path)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in sorted(series.iterdir()))}
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == STUDY_UID
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(sources)
    segments = {n: seg.get_segment_description(n) for n in seg.segment_numbers}
    assert [d.SegmentLabel for d in segments.values()] == ["lung_right", "lung_left"]  # model.pt's, in value order
    assert all(d.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008" for d in segments.values())  # Lung
    sides = [d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning
             for d in segments.values()]
    assert sides == ["Right", "Left"]
    labelmap = sitk.ReadImage(str(out))
    values = sitk.GetArrayFromImage(labelmap)  # [k, j, i]; each source slice lies on a slice k of this grid
    assert values.any()  # a real chest crop: lung found
    for uid, ds in sources.items():
        k = labelmap.TransformPhysicalPointToIndex(tuple(float(v) for v in ds.ImagePositionPatient))[2]
        frame = seg.get_pixels_by_source_instance([uid], combine_segments=True)[0]  # [rows, columns]: segment numbers
        assert np.array_equal(frame, values[k]), uid


def test_seg_is_refused_for_a_volume_file(lung_run, held_out_case, tmp_path, capsys):
    out = tmp_path / "case.nii.gz"
    assert main(["infer", "--checkpoint", str(lung_run / "model.pt"), "--input", held_out_case["image"],
                 "--output", str(out), "--dicom-seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dicom-seg needs a DICOM series folder" in err and not out.exists()


def test_label_names_get_the_shared_tables_codes_sides_and_colours():
    """The SEG codes and colours a structure as the .seg.nrrd, the overlay and the Slicer module do."""
    from engine.imageio.dicom_seg import segment_description
    from engine.imageio.terminology import colour_for
    names = ("liver", "Spleen", "kidney_left", "spinal-cord", "GTV", "lesion_7", "Lung-Right", "thing", "lungs")
    codes = {name: segment_description(i + 1, name, hd, i) for i, name in enumerate(names)}
    kinds = {name: d.SegmentedPropertyTypeCodeSequence[0].CodeValue for name, d in codes.items()}
    assert kinds == {"liver": "10200004", "Spleen": "78961009", "kidney_left": "64033007", "spinal-cord": "2748008",
                     "GTV": "4147007", "lesion_7": "4147007", "Lung-Right": "39607008", "thing": "85756007",
                     "lungs": "39607008"}
    assert codes["liver"].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert codes["GTV"].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert codes["thing"].SegmentLabel == "thing"

    def side(name):
        kind = codes[name].SegmentedPropertyTypeCodeSequence[0]
        return [m.CodeMeaning for m in kind.get("SegmentedPropertyTypeModifierCodeSequence", [])]
    assert side("kidney_left") == ["Left"] and side("Lung-Right") == ["Right"] and side("liver") == []
    for i, name in enumerate(names):
        shown = hd.color.CIELabColor.from_dicom_value(codes[name].RecommendedDisplayCIELabValue).to_rgb()
        expected = tuple(round(255 * c) for c in colour_for(name, i))
        assert max(abs(a - b) for a, b in zip(shown, expected)) <= 2, name  # Lab round trip
