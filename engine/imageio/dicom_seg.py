"""A DICOM Segmentation object (highdicom) of a labelmap whose input was a DICOM series: one segment per label, named,
coded and coloured as the engine's .seg.nrrd, overlay and the Slicer module show it (the shared table,
imageio/terminology: SNOMED CT category, type and laterality modifier, and the recommended display colour; a name the
table does not know gets pydicom's code where one is obvious, else the generic 'Tissue'), its frames on the source
slices themselves (each slice's own position, orientation and pixel spacing, so an irregular series that inference
resampled gets its labels back on the slices it came from), and references to those slices' SOP instances, study and
frame of reference, as PACS viewers and 3D Slicer's DICOM module expect.

highdicom is an optional dependency (`pip install 'mimslicer-engine[dicom]'`); only `infer --dicom-seg` needs it."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import engine
from engine.errors import UserError
from engine.imageio.slices import SliceTags, read_slice_tags
from engine.imageio.terminology import colour_for, look_up
from engine.runtime.atomic import write_atomic

SEG_SERIES_NUMBER = 3001  # DICOM needs one; high, so the SEG sorts after the scanner's series
SIDES = {"left", "right", "l", "r", "lt", "rt"}
ALIASES = {"lungs": "Lung", "kidneys": "Kidney"}  # names the shared table does not know


def write_dicom_seg(labelmap: sitk.Image, source_files: Sequence[str], labels: dict[str, int],
                    path: str | Path) -> Path:
    """Write the DICOM SEG of `labelmap` (label values, any grid overlapping the series) over the slices
    `source_files` of one series; `labels`: foreground name -> value (one segment each, in value order)."""
    hd, pydicom = _highdicom()
    sources = [pydicom.dcmread(f) for f in source_files]
    segments = sorted(((name, value) for name, value in labels.items() if value != 0), key=lambda kv: kv[1])
    numbers = np.zeros(int(max(v for _, v in segments)) + 1, dtype=np.uint16)  # label value -> segment number
    for n, (_, value) in enumerate(segments, 1):
        numbers[value] = n
    frames = np.stack([numbers[slice_labels(labelmap, read_slice_tags(f))] for f in source_files])  # [F, rows, cols]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames.astype(np.uint8 if len(segments) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(n, name, hd, n - 1) for n, (name, _) in enumerate(segments, 1)],
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="MiMSlicer", manufacturer_model_name="mim-engine", software_versions=engine.__version__,
        device_serial_number="none", series_description="MiMSlicer segmentation", content_label="MIMSLICER")
    return write_atomic(path, lambda tmp: seg.save_as(tmp))


def slice_labels(labelmap: sitk.Image, tags: SliceTags) -> np.ndarray:
    """The labels on one source slice's own pixel grid, [rows, columns], by nearest neighbour (0 off the labelmap)."""
    row, column = np.array(tags.orientation[:3]), np.array(tags.orientation[3:])
    direction = np.column_stack([row, column, np.cross(row, column)])  # columns: the i, j, k axes
    plane = sitk.Image([tags.size[0], tags.size[1], 1], sitk.sitkUInt8)
    plane.SetSpacing((tags.spacing[0], tags.spacing[1], 1.0))
    plane.SetOrigin(tags.position)
    plane.SetDirection(tuple(direction.ravel()))
    resampled = sitk.Resample(labelmap, plane, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labelmap.GetPixelID())
    return sitk.GetArrayFromImage(resampled)[0]


def segment_description(number: int, name: str, hd, index: int = 0):
    """A segment named `name`, the `index`-th of the model's labels: the shared table's category, type, laterality
    (e.g. 'lung_right' -> Anatomical Structure, Lung, Right) and colour where it knows the structure; else
    pydicom's SNOMED CT code where the name (sides and separators aside) is one it knows, else 'Tissue', with the
    table's palette colour for that position."""
    from pydicom.sr.codedict import codes
    found = look_up(name)
    modifier = None
    if found is not None:
        category, kind, modifier = (None if c is None else hd.sr.CodedConcept(c[1], c[0], c[2]) for c in found[:3])
    else:
        key = _code_key(name)
        if key and key in codes.SCT:
            category, kind = codes.SCT.AnatomicalStructure, getattr(codes.SCT, key)
        else:
            category, kind = codes.SCT.Tissue, codes.SCT.Tissue
    algorithm = hd.AlgorithmIdentificationSequence(name="MiMSlicer engine", version=engine.__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    colour = hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in colour_for(name, index)))
    description = hd.seg.SegmentDescription(number, name, category, kind, hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                            algorithm_identification=algorithm, display_color=colour)
    if modifier is not None:  # DICOM's place for laterality: a modifier of the segmented property type
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def _code_key(name: str) -> str:
    """'lung_right' -> 'Lung', 'spinal-cord' -> 'SpinalCord', 'GTV' -> 'Tumor' (pydicom's SCT keywords)."""
    words = [w for w in re.split(r"[\s_\-.]+", name.lower()) if w and w not in SIDES]
    joined = "_".join(words)
    if joined in ALIASES:
        return ALIASES[joined]
    return "".join(w.capitalize() for w in words)


def _highdicom():
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise UserError("--dicom-seg needs highdicom: pip install 'mimslicer-engine[dicom]' (or pip install "
                        "highdicom)") from None
    return highdicom, pydicom
