"""Tests that need desktop Slicer (run by MiMSlicerTest: Reload and Test, or ctest -R py_MiMSlicer).

What the headless tests in Testing/slicer cannot reach: the real PythonQt/CTK widgets built from the .ui, the
module's panel inside Slicer's main window, the engine run by PythonSlicer (Slicer's own Python with its own
packages), slice views and plot views of the layout. A synthetic phantom CT keeps it offline; engine steps are
skipped, with a message, when the engine packages are not installed (a test never installs anything)."""
import contextlib
import os
import tempfile
import time

import numpy as np
import qt
import slicer

from . import dependencies, finetuneDataset, jobs, paths, sampleData, tasks


@contextlib.contextmanager
def ownFolders():
    """MIMSLICER_HOME and MIMSLICER_TEMP in a temporary folder while the cases run, then as they were. Reload and
    Test makes the panel first: its catalogue reads MIMSLICER_HOME whenever it is used, and its model list is read
    again on the way in and out, so a test never writes into, nor shows, the user's catalogue."""
    saved = {name: os.environ.get(name) for name in ("MIMSLICER_HOME", "MIMSLICER_TEMP")}
    with tempfile.TemporaryDirectory(prefix="MiMSlicerTest-") as folder:
        for name, sub in (("MIMSLICER_HOME", "home"), ("MIMSLICER_TEMP", "jobs")):
            os.environ[name] = os.path.join(folder, sub)
            os.makedirs(os.environ[name])
        _refreshPanel()
        try:
            yield folder
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _refreshPanel()


def _refreshPanel():
    widget = getattr(slicer.modules, "MiMSlicerWidget", None)  # the panel, once Slicer has made it
    if widget is not None:
        widget.refreshModels()


def run(test, folder):
    """Entry point called by MiMSlicerTest.runTest() inside ownFolders(): `folder` is the temporary folder."""
    test.delayDisplay("MiMSlicer: widget from the .ui in Slicer")
    testWidget(test)
    testSampleDataButtons(test)
    missing = dependencies.Dependencies().check()
    if missing:
        test.delayDisplay("Engine packages missing, engine tests skipped: " + ", ".join(r.describe() for r in missing))
        return
    checkpoint = pretrainTiny(test, folder)
    testExploreInLayout(test, checkpoint)
    testFinetuneAndSegmentInLayout(test, checkpoint)
    testPretrainInPanel(test)
    testCancel(test, checkpoint)
    test.assertEqual(os.listdir(os.environ["MIMSLICER_TEMP"]), [], "temporary job folders left behind")
    test.delayDisplay("MiMSlicer: all desktop tests passed")


def testWidget(test):
    slicer.util.selectModule("MiMSlicer")
    widget = slicer.util.getModuleWidget("MiMSlicer")
    test.assertTrue(widget.logic.catalogue.userPath.startswith(os.environ["MIMSLICER_HOME"]))
    for name in ("inputVolumeSelector", "modelComboBox", "checkpointPathLineEdit", "reconstructButton", "levelComboBox",
                 "viewListWidget", "segmentButton", "casesListWidget", "finetuneButton", "cancelButton", "progressBar"):
        test.assertTrue(hasattr(widget.ui, name), name)
    test.assertFalse(widget.ui.reconstructButton.enabled)
    test.assertTrue(widget.ui.statusLabel.text)  # tells what to do first
    test.assertEqual(paths.enginePython() != "", True)


def testSampleDataButtons(test):
    """The real Sample Data module shows a button per MiMSlicer sample (registered at startupCompleted); not clicked:
    that would download from PyPI."""
    import SampleData
    sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory(sampleData.CATEGORY)
    test.assertEqual([s.sampleName for s in sources], [s.title for s in sampleData.SAMPLES])
    slicer.util.selectModule("SampleData")
    for sample in sampleData.SAMPLES:
        button = slicer.util.findChild(slicer.modules.SampleDataWidget.parent, f"{sample.title}PushButton")
        test.assertEqual(button.text, sample.title)
    slicer.util.selectModule("MiMSlicer")


def testPretrainInPanel(test):
    test.delayDisplay("Pre-train on the scene's CT for a few seconds: the encoder joins the model list")
    widget = slicer.util.getModuleWidget("MiMSlicer")
    volume, _ = phantom("Pre-training phantom")
    task = widget.runTask(lambda: widget.logic.startPretrain([volume], minutes=0.1, recipe="tiny"))
    waitForTask(widget.logic)
    widget.onPoll()
    test.assertEqual(task.state, tasks.DONE, task.message)
    test.assertEqual(widget.ui.modelComboBox.currentText, f"MiM pre-trained · {task.result['name']}")
    slicer.mrmlScene.RemoveNode(volume)


def phantom(name="MiM phantom", shift=0):
    """A 96^3 CT-like volume at 2 mm (body, lungs, heart, aorta, spine) and its heart/aorta labels."""
    k, j, i = np.mgrid[0:96, 0:96, 0:96].astype(np.float32)
    ct = np.full(i.shape, -1000, np.int16)
    ct[((i - 48) / 40) ** 2 + ((j - 48) / 30) ** 2 < 1] = 30
    for cx in (30, 66):
        ct[((i - cx) / 13) ** 2 + ((j - 44) / 18) ** 2 < 1] = -820
    heart = ((i - 50 - shift) / 12) ** 2 + ((j - 52) / 10) ** 2 + ((k - 48) / 14) ** 2 < 1
    aorta = ((i - 56) ** 2 + (j - 66) ** 2 < 25) & (k > 20)
    ct[heart] = 45
    ct[aorta] = 180
    ct[((i - 48) ** 2 + (j - 76) ** 2) < 36] = 700
    labels = np.zeros(ct.shape, np.uint8)
    labels[heart], labels[aorta] = 1, 2
    volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=np.diag([-2.0, -2.0, 2.0, 1.0]), name=name)
    return volume, labels


def labelledCase(name, shift):
    volume, labels = phantom(name, shift)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} labels")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for value, segmentName in ((1, "heart"), (2, "aorta")):
        segmentID = segmentation.GetSegmentation().AddEmptySegment(segmentName, segmentName)
        slicer.util.updateSegmentBinaryLabelmapFromArray((labels == value).astype(np.uint8), segmentation, segmentID, volume)
    return volume, segmentation


def pretrainTiny(test, folder):
    test.delayDisplay("Pre-training a tiny MiM model with PythonSlicer (a few seconds)")
    volume, _ = phantom()
    data = os.path.join(folder, "data")
    os.makedirs(data)
    slicer.util.saveNode(volume, os.path.join(data, "phantom.nii.gz"))
    out = os.path.join(folder, "pretrain")
    job = jobs.EngineJob(jobs.engineCommand("pretrain", "--data", data, "--preset", "tiny", "--steps", "2", "--out", out),
                         cwd=folder).start()
    while not job.finished:
        job.poll()
        slicer.app.processEvents()
        time.sleep(0.05)
    test.assertEqual(job.returncode, 0, job.errorMessage)
    slicer.mrmlScene.RemoveNode(volume)
    return os.path.join(out, "checkpoint.pt")


def waitForTask(logic):
    while logic.busy:
        logic.poll()
        slicer.app.processEvents()  # the GUI stays responsive meanwhile
        time.sleep(0.05)
    return logic.task


def testExploreInLayout(test, checkpoint):
    test.delayDisplay("Explore: reconstruction views in the slice views")
    widget = slicer.util.getModuleWidget("MiMSlicer")
    volume, _ = phantom()
    slicer.util.setSliceViewerLayers(background=volume, fit=True)
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    widget.ui.checkpointPathLineEdit.currentPath = checkpoint
    test.assertTrue(widget.ui.reconstructButton.enabled, widget.ui.reconstructButton.toolTip)
    widget.ui.reconstructButton.click()
    task = waitForTask(widget.logic)
    widget.onPoll()
    test.assertEqual(task.state, tasks.DONE, task.message)
    test.assertEqual(widget.ui.levelComboBox.count, 3)
    widget.ui.levelComboBox.currentIndex = 2
    widget.ui.showErrorRadioButton.checked = True
    view = widget.logic.reconstruction.view(3, widget.ui.viewListWidget.currentRow)
    red = slicer.app.layoutManager().sliceWidget("Red").sliceLogic()
    test.assertEqual(red.GetForegroundLayer().GetVolumeNode(), view.volumes["error"])
    test.assertEqual(red.GetBackgroundLayer().GetVolumeNode(), volume)
    slicer.util.forceRenderAllViews()
    test.delayDisplay("Level 3, error map over the CT", 1500)


def testFinetuneAndSegmentInLayout(test, checkpoint):
    test.delayDisplay("Fine-tune on two labelled phantoms, curves in a plot view, then segment")
    widget = slicer.util.getModuleWidget("MiMSlicer")
    labelledCase("Case A", 0)
    caseB, _ = labelledCase("Case B", 4)
    widget.refreshCases()
    test.assertEqual(widget.ui.casesListWidget.count, 2)  # offered, not ticked: made by a script, not drawn here
    for row in range(2):
        widget.ui.casesListWidget.item(row).setCheckState(qt.Qt.Checked)
    test.assertEqual(len(widget.checkedCases()), 2)
    widget.ui.checkpointPathLineEdit.currentPath = checkpoint
    widget.ui.minutesSpinBox.value = 0  # no time limit: 2 steps
    widget.ui.stepsSpinBox.value = 2
    widget.ui.finetuneButton.click()
    test.assertIsNotNone(slicer.app.layoutManager().plotWidget(0))
    task = waitForTask(widget.logic)
    widget.onPoll()
    test.assertEqual(task.state, tasks.DONE, task.message)
    test.assertGreater(task.plot.lossTable.GetTable().GetNumberOfRows(), 0)
    test.assertTrue(widget.ui.modelComboBox.currentText.startswith("Segmentation"))
    widget.ui.inputVolumeSelector.setCurrentNode(caseB)
    widget.ui.segmentButton.click()
    task = waitForTask(widget.logic)
    widget.onPoll()
    test.assertEqual(task.state, tasks.DONE, task.message)
    names = [task.result.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    test.assertEqual(names, ["heart", "aorta"])
    test.assertTrue(task.result.GetAttribute(finetuneDataset.MODEL_OUTPUT_ATTRIBUTE))
    slicer.util.forceRenderAllViews()


def testCancel(test, checkpoint):
    test.delayDisplay("Cancel: no process, no temporary files, no nodes")
    widget = slicer.util.getModuleWidget("MiMSlicer")
    widget.ui.modelComboBox.currentIndex = widget.ui.modelComboBox.findData("file")
    widget.ui.checkpointPathLineEdit.currentPath = checkpoint
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    widget.ui.reconstructButton.click()
    job = widget.logic.task.job
    widget.ui.cancelButton.click()
    test.assertTrue(job.cancelled and job.finished)
    test.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
    test.assertIn("cancelled", widget.ui.statusLabel.text)
