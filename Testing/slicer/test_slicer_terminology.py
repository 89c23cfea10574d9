"""One name, one colour in Slicer too: the module reads the engine's table (not a copy), and a .seg.nrrd written by the
engine, read by Slicer's own segmentation storage node into the real MRML scene, has the module's segment names,
colours and terminology."""
import json
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
from mimslicer_testing import DATA, REPO
from MiMSlicerLib import terminology

LABELS = {"heart": 1, "aorta": 2, "left kidney": 4, "my structure": 7}


def test_the_module_uses_the_engines_table():
    assert os.path.samefile(terminology.TABLE_FILE, REPO / "engine" / "imageio" / "terminology.py")
    assert terminology._table.__name__ == "MiMSlicerLib._engineTerminology"  # by its path: no `engine` package
    assert terminology.colourFor("Liver", 5) == terminology.colourFor("liver", 0)


def _engineSegNrrd(tmp_path):
    """ts_chest's heart/aorta crop, two more values, written by the engine's own writer in a separate process."""
    label = sitk.ReadImage(str(DATA / "ts_chest_label.nii.gz"))[60:120, 20:80, 40:80]
    array = sitk.GetArrayFromImage(label).astype(np.uint8)
    array[array > 2] = 0
    array[:4, :10, :10], array[-4:, -10:, -10:] = 4, 7
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(label)
    source = tmp_path / "label.nii.gz"
    sitk.WriteImage(image, str(source))
    out = tmp_path / "pred.seg.nrrd"
    script = ("import sys, json, SimpleITK as sitk; from engine.imageio.labelmap import write_labelmap; "
              "write_labelmap(sitk.ReadImage(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", script, str(source), str(out), json.dumps(LABELS)], cwd=REPO, check=True)
    return out


def test_an_engine_seg_nrrd_loads_with_the_modules_names_colours_and_terminology(scene, tmp_path):
    path = _engineSegNrrd(tmp_path)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "engine output")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), "Slicer's storage node could not read the engine's .seg.nrrd"
    segmentation = node.GetSegmentation()
    ordered = sorted(LABELS.items(), key=lambda kv: kv[1])
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        [name for name, _ in ordered]
    for index, (name, value) in enumerate(ordered):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        assert np.allclose(segment.GetColor(), terminology.colourFor(name, index), atol=1e-5), name
        assert segment.GetLabelValue() == value
        # a structure the table does not know gets Slicer's default, as a segment the module adds gets it
        expected = terminology.terminologyEntry(name) or _entry(_defaultSegment(scene))
        assert _entry(segment) == expected, name
    assert "^80891009^Heart" in terminology.terminologyEntry("heart")
    assert "^24028007^Right" not in terminology.terminologyEntry("left kidney")
    assert "^7771000^Left" in segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("left kidney"))\
        .GetTerminology()
    assert terminology.terminologyEntry("my structure") == ""


def _entry(segment):
    return segment.GetTerminology() if hasattr(segment, "GetTerminology") else \
        segment.GetTag(segment.GetTerminologyEntryTagName())


def _defaultSegment(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "default")
    segmentation = node.GetSegmentation()
    return segmentation.GetSegment(segmentation.AddEmptySegment("x", "x", (1.0, 0.0, 0.0)))
