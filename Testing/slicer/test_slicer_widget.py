"""The unchanged widget code from its .ui (PySide6 via Qt.py, offscreen), clicked through every panel against a real
MRML scene and the real engine, with screenshots (tmp_path; copies in $MIMSLICER_SHOTS when set)."""
import numpy as np
import qt
import slicer

try:
    from __feature__ import true_property  # noqa: F401  (read widgets the PythonQt way, as the module does)
except ImportError:
    pass

from mimslicer_testing import loadLabelsAsSegmentation, loadVolume, renderSliceView, saveShot
from MiMSlicer import MiMSlicerWidget
from MiMSlicerLib import tasks, volumeIO

WIDTH, HEIGHT = 470, 1180


def waitUntil(predicate, timeoutMs=300000):
    clock = qt.QElapsedTimer()
    clock.start()
    while not predicate():
        qt.QApplication.processEvents()
        qt.QThread.msleep(20)
        assert clock.elapsed() < timeoutMs, "timed out"
    qt.QApplication.processEvents()


def newWidget():
    widget = MiMSlicerWidget()  # no parent: makes its own qMRMLWidget and calls setup(), as Slicer does
    widget.parent.resize(WIDTH, HEIGHT)
    qt.QApplication.processEvents()
    return widget


def shot(widget, tmp_path, name):
    """Screenshot at the panel's natural height (Slicer scrolls the module panel; here it just grows)."""
    widget.parent.resize(WIDTH, max(HEIGHT, widget.parent.sizeHint.height()))
    qt.QApplication.processEvents()
    return saveShot(widget.parent, tmp_path, name)


def imageHasContent(path):
    image = qt.QImage(str(path))
    colours = {image.pixel(x, y) for x in range(0, image.width(), 5) for y in range(0, image.height(), 5)}
    return image.width() >= WIDTH and len(colours) > 20


def test_empty_scene_tells_what_to_do_first(scene, tmp_path):
    widget = newWidget()
    ui = widget.ui
    assert not ui.reconstructButton.enabled and not ui.segmentButton.enabled and not ui.finetuneButton.enabled
    assert "Choose a CT volume" in ui.statusLabel.text and "Sample Data" in ui.statusLabel.text
    assert "Choose a CT volume" in ui.reconstructButton.toolTip
    assert not ui.cancelButton.enabled
    assert imageHasContent(shot(widget, tmp_path, "panel_0_empty"))
    widget.cleanup()


def test_every_panel_end_to_end(jobsFolder, scene, chestCt, chestCases, pretrainedCheckpoint, tmp_path):
    volume = loadVolume(chestCt, "Chest CT")
    volume.GetDisplayNode().SetWindowLevel(1000, 0)
    for n, (ct, label) in enumerate(chestCases):
        caseVolume = loadVolume(ct, f"Case {n + 1}")
        loadLabelsAsSegmentation(caseVolume, label, {"heart": 1, "aorta": 2})
    widget = newWidget()
    ui, logic = widget.ui, widget.logic

    # 1 · CT and model
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.checkpointPathLineEdit.currentPath = str(pretrainedCheckpoint)
    qt.QApplication.processEvents()
    assert ui.modelComboBox.currentText == "Checkpoint file (below)"
    assert ui.reconstructButton.enabled, ui.reconstructButton.toolTip
    assert logic.getParameterNode().GetNodeReference("InputVolume") is volume

    # 2 · Explore: reconstruct around the crosshair, then walk levels, views and layers
    crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") or scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    low, high = volumeIO.voxelCornerBounds(volume)
    target = (low + high) / 2 + [15.0, -10.0, 5.0]
    crosshair.SetCrosshairRAS(*target)
    ui.centerOnCrosshairCheckBox.checked = True
    volumesListed = ui.inputVolumeSelector.count
    ui.reconstructButton.click()
    assert logic.busy and ui.cancelButton.enabled and not ui.reconstructButton.enabled
    waitUntil(lambda: not logic.busy and not widget.timer.active)
    assert "Reconstruction loaded" in ui.statusLabel.text, ui.statusLabel.text
    assert ui.levelComboBox.count == 3 and ui.viewListWidget.count == 1
    assert ui.inputVolumeSelector.count == volumesListed  # its ~30 volumes are hidden from node selectors
    coarse = logic.reconstruction.view(1, 0)
    assert np.allclose(coarse.center, target, atol=6.0), (coarse.center, target)  # within a voxel of the crop grid
    ui.levelComboBox.currentIndex = 2
    assert ui.viewListWidget.count == len(logic.reconstruction.levels[2].views)
    ui.viewListWidget.currentRow = 1
    ui.showErrorRadioButton.checked = True
    fineView = logic.reconstruction.view(3, 1)
    composite = scene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == fineView.volumes["error"].GetID()
    ui.showMaskedRadioButton.checked = True
    assert composite.GetForegroundVolumeID() == fineView.volumes["masked"].GetID()
    assert imageHasContent(shot(widget, tmp_path, "panel_1_explore"))
    renderSliceView(scene, "Red", tmp_path / "panel_1_explore_red_slice.png")

    # 4 · Fine-tune on the two labelled cases found in the scene: offered, not ticked until the user ticks them
    assert ui.casesListWidget.count == 2 and not widget.checkedCases() and not ui.labelPlanLabel.text
    for row in range(2):
        ui.casesListWidget.item(row).setCheckState(qt.Qt.Checked)
    assert "heart = 1" in ui.labelPlanLabel.text and "aorta = 2" in ui.labelPlanLabel.text
    assert ui.modelNameLineEdit.text == "heart + aorta"
    assert ui.startFromLabel.text == "checkpoint.pt"
    ui.minutesSpinBox.value = 0  # no time limit: 2 steps (the engine's --time-limit is not there yet)
    ui.stepsSpinBox.value = 2
    assert ui.finetuneButton.enabled, ui.finetuneButton.toolTip
    ui.finetuneButton.click()
    assert logic.busy and scene.GetFirstNodeByName("MiM fine-tune · heart + aorta loss") is not None
    waitUntil(lambda: not logic.busy and not widget.timer.active)
    assert "added to the catalogue" in ui.statusLabel.text, ui.statusLabel.text
    assert ui.modelComboBox.currentText == "Segmentation · heart + aorta"
    lossTable = scene.GetFirstNodeByName("MiM fine-tune · heart + aorta loss")
    assert lossTable.GetTable().GetNumberOfRows() == 2
    assert "Structures:" in ui.modelInfoLabel.text and "heart" in ui.modelInfoLabel.text
    assert not ui.reconstructButton.enabled  # a segmentation model cannot reconstruct: the tooltip says why
    assert "segmentation model" in ui.reconstructButton.toolTip
    assert imageHasContent(shot(widget, tmp_path, "panel_2_finetuned"))

    # 3 · Segment the CT with the new model, at once
    caseVolume = scene.GetFirstNodeByName("Case 2")
    ui.inputVolumeSelector.setCurrentNode(caseVolume)
    assert ui.segmentButton.enabled and ui.segmentButton.text == "Segment Case 2"
    ui.segmentButton.click()
    waitUntil(lambda: not logic.busy and not widget.timer.active)
    segmentation = logic.task.result
    assert logic.task.state == tasks.DONE, logic.task.message
    assert logic.task.windowsDone == logic.task.windows > 0  # progress came window by window
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert "Segmented Case 2: heart, aorta" in ui.segmentResultLabel.text
    assert ui.casesListWidget.count == 3  # the model output is offered, unticked, for correction and training
    assert ui.casesListWidget.item(2).checkState() == qt.Qt.Unchecked
    assert imageHasContent(shot(widget, tmp_path, "panel_3_segmented"))

    # Cancel: back to the checkpoint, start, cancel at once: nothing added, nothing left running
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.modelComboBox.currentIndex = ui.modelComboBox.findData("file")
    nodes = scene.GetNumberOfNodes()
    ui.reconstructButton.click()
    job = logic.task.job
    ui.cancelButton.click()
    assert not logic.busy and job.finished and job.cancelled
    assert "cancelled" in ui.statusLabel.text and scene.GetNumberOfNodes() == nodes
    assert ui.reconstructButton.enabled and not ui.cancelButton.enabled

    # An engine failure shows the engine's message in the panel; the scene stays as it was
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    ui.checkpointPathLineEdit.currentPath = str(broken)
    ui.reconstructButton.click()
    waitUntil(lambda: not logic.busy and not widget.timer.active)
    assert "#b00020" in ui.statusLabel.text and "broken.pt" in ui.statusLabel.text, ui.statusLabel.text
    assert scene.GetNumberOfNodes() == nodes and slicer.util.errors == []
    assert ui.logTextEdit.plainText
    ui.logCollapsibleButton.collapsed = False
    assert imageHasContent(shot(widget, tmp_path, "panel_4_error"))
    widget.cleanup()
