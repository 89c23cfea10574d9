"""Explore panel logic against a real MRML scene and real `engine reconstruct` runs: every view lands at its true
physical place, fine views inside middle views inside the coarse view, and what the slice views show follows the
level / view / layer chosen."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import slicer

from mimslicer_testing import REPO, loadVolume, renderSliceView, sampleVolumeAt, voxelCentres
from MiMSlicerLib import hierarchy, reconstruction, tasks, volumeIO
from MiMSlicerLib.sceneTransaction import SceneTransaction


@pytest.fixture(scope="module")
def engineOutput(tmp_path_factory, chestCt, pretrainedCheckpoint):
    """One `engine reconstruct` output folder, run from the command line."""
    out = tmp_path_factory.mktemp("reconstruct") / "out"
    subprocess.run([sys.executable, "-m", "engine", "reconstruct", "--checkpoint", str(pretrainedCheckpoint),
                    "--image", str(chestCt), "--out", str(out), "--seed", "3", "--progress", "none"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return out


def test_reconstruct_task_places_every_view_in_the_source_space(jobsFolder, scene, chestCt, pretrainedCheckpoint,
                                                                 tmp_path):
    volume = loadVolume(chestCt, "chest")
    volume.GetDisplayNode().SetWindowLevel(1000, 0)
    nodesBefore = scene.GetNumberOfNodes()
    task = tasks.ReconstructTask(scene, volume, str(pretrainedCheckpoint), seed=0).start()
    assert task.wait(timeout=300) == tasks.DONE, task.message
    result = task.result
    assert [lv.name for lv in result.levels] == ["coarse", "middle", "fine"]
    assert scene.GetNumberOfNodes() == nodesBefore + len(result.nodes()) + _displayNodes(result)

    for view in result.allViews():
        for layer in reconstruction.LAYERS:
            low, high = volumeIO.voxelCornerBounds(view.volumes[layer])
            np.testing.assert_allclose(low, view.boxMin, atol=1e-3, err_msg=f"{view.viewId} {layer}")
            np.testing.assert_allclose(high, view.boxMax, atol=1e-3, err_msg=f"{view.viewId} {layer}")
        roiBounds = [0.0] * 6
        view.roi.GetRASBounds(roiBounds)
        np.testing.assert_allclose(roiBounds[0::2], view.boxMin, atol=1e-3)
        np.testing.assert_allclose(roiBounds[1::2], view.boxMax, atol=1e-3)
        if view.parent is not None:  # nested: inside its parent view
            parent = result.view(view.level.level - 1, view.parent)
            assert np.all(view.boxMin >= parent.boxMin - 1e-3) and np.all(view.boxMax <= parent.boxMax + 1e-3)

    # the 'original' layer of every view shows the source CT itself, at the same physical points
    lo, hi = result.huWindow
    for view in result.allViews():
        source = sampleVolumeAt(volume, voxelCentres(view.volumes["input"]))
        shown = slicer.util.arrayFromVolume(view.volumes["input"]).ravel()
        inside = ~np.isnan(source)
        assert inside.mean() > 0.99, view.viewId
        assert np.corrcoef(np.clip(source[inside], lo, hi), shown[inside])[0, 1] > 0.8, view.viewId

    # masks: one segmentation per level, one segment per view, as much masked as the engine says
    for level in result.levels:
        segmentation = level.maskSegmentation.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == len(level.views)
        for view in level.views:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(level.maskSegmentation, view.maskSegmentID,
                                                              view.volumes["masked"])
            assert abs(mask.mean() - view.maskedFraction) < 0.02

    # subject hierarchy: one folder beside the CT, one sub-folder per level holding its views
    shNode = hierarchy.shNode(scene)
    assert shNode.GetItemParent(result.folderItem) == hierarchy.parentOf(scene, volume)
    for level in result.levels:
        assert shNode.GetItemParent(level.folderItem) == result.folderItem
        assert shNode.GetItemParent(shNode.GetItemByDataNode(level.views[0].volumes["error"])) == level.folderItem

    # the slice views follow the chosen level, view and layer, centred on the view
    fine = max(result.levels[2].views, key=lambda v: slicer.util.arrayFromVolume(v.volumes["error"]).mean())
    shown = result.show(scene, 3, fine.index, "error")
    for name in ("Red", "Yellow", "Green"):
        composite = scene.GetSingletonNode(name, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == fine.volumes["error"].GetID() == shown.GetID()
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        sliceToRas = slicer.util.arrayFromVTKMatrix(scene.GetSingletonNode(name, "vtkMRMLSliceNode").GetSliceToRAS())
        np.testing.assert_allclose(sliceToRas[:3, 3], fine.center, atol=1e-3)
    assert result.levels[2].maskSegmentation.GetDisplayNode().GetVisibility()
    assert not result.levels[0].maskSegmentation.GetDisplayNode().GetVisibility()

    # the real Slice pipeline draws it: coarse masked input, fine error map over the CT (screenshots)
    result.show(scene, 1, 0, "masked")
    masked = renderSliceView(scene, "Red", tmp_path / "explore_level1_masked.png")
    result.show(scene, 3, fine.index, "error")
    error = renderSliceView(scene, "Red", tmp_path / "explore_level3_error.png")
    assert masked[..., 3].mean() > 100 and len(np.unique(masked[..., 0])) > 50
    heat = (error[..., 0].astype(int) - error[..., 2].astype(int)) > 60  # warm error colours over grey CT
    assert 200 < heat.sum() < heat.size * 0.9


def _displayNodes(result):
    return sum(node.GetNumberOfDisplayNodes() for node in result.nodes())


def test_unreadable_result_rolls_back_everything(scene, chestCt, engineOutput, tmp_path):
    broken = tmp_path / "out"
    shutil.copytree(engineOutput, broken)
    index = json.loads((broken / "index.json").read_text())
    lastView = index["levels"][-1]["views"][-1]["files"]["reconstruction"]
    (broken / lastView).write_bytes((broken / lastView).read_bytes()[:200])  # truncated NIfTI
    volume = loadVolume(chestCt, "chest")
    shNode = hierarchy.shNode(scene)
    nodesBefore, itemsBefore = scene.GetNumberOfNodes(), shNode.GetNumberOfItems()
    with pytest.raises(Exception):
        with SceneTransaction(scene):
            reconstruction.loadReconstruction(scene, str(broken), volume)
    assert scene.GetNumberOfNodes() == nodesBefore
    assert shNode.GetNumberOfItems() == itemsBefore


def test_wrong_index_format_is_refused(scene, engineOutput, tmp_path):
    odd = tmp_path / "out"
    shutil.copytree(engineOutput, odd)
    index = json.loads((odd / "index.json").read_text())
    index["format"] = "something-else/9"
    (odd / "index.json").write_text(json.dumps(index))
    nodesBefore = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="format"):
        with SceneTransaction(scene):
            reconstruction.loadReconstruction(scene, str(odd), None)
    assert scene.GetNumberOfNodes() == nodesBefore


def test_runs_stay_out_of_node_selectors_and_earlier_ones_can_be_removed(scene, chestCt, engineOutput):
    """Each run adds ~30 nodes: hidden from editors, so Slicer's node selectors (here the harness stand-in, which
    filters HideFromEditors as qMRMLNodeComboBox does) do not list them; they stay in the run's folder; a run's
    removal takes its nodes, their display nodes and its folders; the run shown is kept."""
    volume = loadVolume(chestCt, "chest")
    selector = slicer.qMRMLNodeComboBox()
    selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
    selector.setMRMLScene(scene)
    segmentations = slicer.qMRMLNodeComboBox()
    segmentations.nodeTypes = ["vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode"]
    segmentations.setMRMLScene(scene)
    shNode = hierarchy.shNode(scene)
    before, itemsBefore, listed = scene.GetNumberOfNodes(), shNode.GetNumberOfItems(), selector.count()
    runs = []
    for _ in range(3):
        with SceneTransaction(scene):
            runs.append(reconstruction.loadReconstruction(scene, str(engineOutput), volume))
    perRun = (scene.GetNumberOfNodes() - before) // 3
    assert perRun > 28 and selector.count() == listed and segmentations.count() == 0
    for view in runs[1].allViews():
        for node in view.volumes.values():
            assert node.GetHideFromEditors()
            assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == view.level.folderItem
    assert reconstruction.runFolders(scene) == [r.folderItem for r in runs]

    assert reconstruction.removeRuns(scene, keep=runs[2]) == 2
    assert scene.GetNumberOfNodes() == before + perRun
    assert reconstruction.runFolders(scene) == [runs[2].folderItem]
    assert all(not scene.IsNodePresent(n) for r in runs[:2] for n in r.nodes())
    assert all(scene.IsNodePresent(n) for n in runs[2].nodes())
    runs[2].show(scene, 3, 0, "error")  # the kept run still works
    assert reconstruction.removeRuns(scene) == 1
    assert scene.GetNumberOfNodes() == before and shNode.GetNumberOfItems() == itemsBefore
