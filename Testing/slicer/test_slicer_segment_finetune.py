"""Segment and Fine-tune panels' logic on a real MRML scene: labelled cases in the scene become a dataset (segment
names -> label values, mismatches explained), a real `engine finetune` fills the plot tables and registers a model
that segments at once (`engine infer`), and the segments carry names, colours, terminology and the CT's geometry."""
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import slicer

from mimslicer_testing import loadLabelsAsSegmentation, loadVolume, renderSliceView
from MiMSlicerLib import finetuneDataset, hierarchy, segmentationImport, sliceViews, tasks, terminology
from MiMSlicerLib.sceneTransaction import SceneTransaction
from MiMSlicer import MiMSlicerLogic

CHEST_LABELS = {"heart": 1, "aorta": 2}


def addCase(path, labelPath, name, labels=CHEST_LABELS):
    volume = loadVolume(path, name)
    return volume, loadLabelsAsSegmentation(volume, labelPath, labels)


def underStudy(scene, volume):
    shNode = hierarchy.shNode(scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient 1")
    study = shNode.CreateStudyItem(patient, "CT chest")
    shNode.SetItemParent(hierarchy.itemFor(scene, volume), study)
    return study


# -- segmentation import -------------------------------------------------------------------------------------
def test_labelmap_becomes_named_coloured_segments_on_the_ct_grid(scene, chestCases):
    ct, labelPath = chestCases[0]
    volume = loadVolume(ct, "chest0")
    study = underStudy(scene, volume)
    labels = {"heart": 1, "aorta": 2, "Lung-Left": 3}  # the model knows a left lung; this crop has none
    with SceneTransaction(scene):
        node = segmentationImport.importLabelmap(scene, str(labelPath), volume, labels, "chest0 segmentation")
    segmentation = node.GetSegmentation()
    names = [n for n, _ in segmentationImport.segmentNamesAndColours(node)]
    assert names == ["heart", "aorta", "Lung-Left"]
    heart, aorta, lung = (segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(n)) for n in names)
    assert heart.GetColor() == pytest.approx(tuple(c / 255 for c in (206, 110, 84)))
    assert "80891009" in heart.GetTerminology() and "15825003" in aorta.GetTerminology()
    assert "39607008" in lung.GetTerminology() and "7771000^Left" in lung.GetTerminology()
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    expected = np.asarray(nib.load(str(labelPath)).dataobj).transpose(2, 1, 0)  # k, j, i like arrayFromVolume
    for name, value in labels.items():
        segmentID = segmentation.GetSegmentIdBySegmentName(name)
        array = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentID, volume)
        np.testing.assert_array_equal(array > 0, expected == value, err_msg=name)
    assert hierarchy.shNode(scene).GetItemParent(hierarchy.itemFor(scene, node)) == study
    assert scene.GetFirstNodeByName(segmentationImport.TEMP_LABELMAP_NAME) is None


def test_undeclared_label_values_are_refused_and_nothing_stays(scene, chestCases):
    volume = loadVolume(chestCases[0][0], "chest0")
    before = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        with SceneTransaction(scene):
            segmentationImport.importLabelmap(scene, str(chestCases[0][1]), volume, {"heart": 1}, "partial")
    assert scene.GetNumberOfNodes() == before


def test_terminology_knows_common_names():
    assert terminology.normaliseName("Lung_left") == terminology.normaliseName("left lung") == "left lung"
    assert "4147007" in terminology.terminologyEntry("GTV-1")
    assert terminology.terminologyEntry("my structure") == ""
    assert terminology.colourFor("my structure", 0) != terminology.colourFor("my other structure", 1)


# -- fine-tune dataset -----------------------------------------------------------------------------------------
def test_label_plan_explains_mismatches(scene, chestCases):
    addCase(*chestCases[0], "chest0")
    volume, segmentationNode = addCase(chestCases[1][0], chestCases[1][1], "chest1", {"Heart": 1, "aorta": 2})
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("aorta"))
    segmentation.AddEmptySegment("", "Segment_1")
    plan = finetuneDataset.planLabels(finetuneDataset.findLabelledCases(scene))
    assert plan.ok
    assert plan.labels == {"heart": 1, "aorta": 2, "Segment_1": 3}
    text = "\n".join(plan.warnings + plan.notes)
    assert "chest1 + chest1 labels has no 'aorta' segment" in text
    assert "'Segment_1' looks like a default name" in text and "'Segment_1' is empty" in text
    assert "'Heart' counted as 'heart'" in text
    assert not finetuneDataset.planLabels([]).ok


def test_dataset_export_keeps_each_ct_grid_and_label_values(scene, chestCases, tmp_path):
    for n, (ct, label) in enumerate(chestCases):
        addCase(ct, label, f"chest{n}")
    cases = finetuneDataset.findLabelledCases(scene)
    before = scene.GetNumberOfNodes()
    path = finetuneDataset.exportDataset(scene, cases, finetuneDataset.planLabels(cases), str(tmp_path / "ds"))
    assert scene.GetNumberOfNodes() == before  # no scratch nodes left
    dataset = json.loads(open(path).read())
    assert dataset["labels"] == {"background": 0, "heart": 1, "aorta": 2}
    assert len(dataset["training"]) == 1 and len(dataset["validation"]) == 1
    for record, (ct, label) in zip(dataset["training"] + dataset["validation"], chestCases):
        written, original = nib.load(tmp_path / "ds" / record["label"]), nib.load(str(label))
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
        np.testing.assert_allclose(nib.load(tmp_path / "ds" / record["image"]).affine, nib.load(str(ct)).affine, atol=1e-4)


# -- real fine-tuning and segmenting -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(mimFolders, chestCases, pretrainedCheckpoint):
    """Fine-tune from scene nodes through the module's Logic (2 steps, one validation); keep what it produced."""
    slicer.mrmlScene.Clear(0)
    for n, (ct, label) in enumerate(chestCases):
        addCase(ct, label, f"chest{n}")
    logic = MiMSlicerLogic()
    cases = logic.labelledCases()
    task = logic.startFinetune(cases, str(pretrainedCheckpoint), "heart and aorta", preset="tiny", steps=2)
    logic.wait(timeout=600)
    plot = task.plot
    return {"task": task, "logic": logic, "loss": plot.column(plot.lossTable, "loss") if plot else None,
            "dice": {c: plot.column(plot.diceTable, c) for c in ("val_mean_dice", "dice/heart", "dice/aorta")}
            if plot else None, "chart": plot.chart if plot else None}


def test_finetune_from_scene_nodes_fills_the_plot_and_registers_a_model(finetuned, mimFolders):
    task = finetuned["task"]
    assert task.state == tasks.DONE, task.message
    assert len(finetuned["loss"]) == 2 and np.all(np.isfinite(finetuned["loss"]))
    dice = finetuned["dice"]
    assert len(dice["val_mean_dice"]) >= 1 and 0 <= dice["val_mean_dice"][-1] <= 1
    assert not math.isnan(dice["dice/heart"][-1]) and not math.isnan(dice["dice/aorta"][-1])
    assert finetuned["chart"].GetNumberOfPlotSeriesNodes() == 4  # loss, mean Dice, Dice per label
    entry = finetuned["logic"].catalogue.get(task.result["id"])
    assert entry["task"] == "segmentation" and entry["labels"] == CHEST_LABELS and entry["source"] == "user"
    assert entry["spacing"] == [3.0, 3.0, 3.0] and entry["trainingCases"] == 2
    modelFile = finetuned["logic"].catalogue.localFile(entry)
    assert os.path.isfile(modelFile) and str(mimFolders["home"]) in modelFile
    assert sorted(os.listdir(os.path.dirname(modelFile))) == ["config.yaml", "model.pt"]  # no training state
    assert not list(mimFolders["temp"].iterdir())


def test_registered_model_segments_at_once(finetuned, jobsFolder, scene, chestCases, tmp_path):
    entry = finetuned["logic"].catalogue.get(finetuned["task"].result["id"])
    volume = loadVolume(chestCases[1][0], "chest1")
    study = underStudy(scene, volume)
    logic = MiMSlicerLogic()
    parameters = logic.getParameterNode()
    parameters.SetParameter("Model", entry["id"])
    model = logic.selectedModel(parameters)
    assert model.canSegment and model.exists
    task = logic.startSegmentation(volume, model.path, labels=model.labels, uncertainty=True)
    logic.wait(timeout=300)
    assert task.state == tasks.DONE, task.message
    node = task.result
    # the uncertainty: on the CT's grid, 0..1, coloured, in front of the CT with the segments, beside it in the tree
    shown = task.uncertaintyNode
    assert shown is not None and shown.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert np.allclose(shown.GetSpacing(), volume.GetSpacing()) and np.allclose(shown.GetOrigin(), volume.GetOrigin())
    values = slicer.util.arrayFromVolume(shown)
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > values.min()
    display = shown.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetWindow() == pytest.approx(1.0)
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == volume.GetID() and composite.GetForegroundVolumeID() == shown.GetID()
    assert hierarchy.shNode(scene).GetItemParent(hierarchy.itemFor(scene, shown)) == study
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    sliceViews.focus(scene, [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)], bounds[1] - bounds[0])
    picture = renderSliceView(scene, "Red", tmp_path / "segment_uncertainty_red.png")
    assert len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)) > 20  # the CT with colours over it
    assert [n for n, _ in segmentationImport.segmentNamesAndColours(node)] == ["heart", "aorta"]
    assert "80891009" in node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("heart")).GetTerminology()
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    assert hierarchy.shNode(scene).GetItemParent(hierarchy.itemFor(scene, node)) == study
    assert node.GetAttribute(finetuneDataset.MODEL_OUTPUT_ATTRIBUTE)  # never silently a training label
    anyVoxels = sum(int(slicer.util.arrayFromSegmentBinaryLabelmap(node, node.GetSegmentation().GetNthSegmentID(i),
                                                                     volume).sum()) for i in range(2))
    assert anyVoxels > 0
    assert "chest1" in task.message and "heart" in task.message
