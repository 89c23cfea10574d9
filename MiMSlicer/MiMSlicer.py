"""MiM Slicer: explore Mask-in-Mask reconstructions level by level, segment CT, fine-tune on cases labelled in Slicer.

Module, Widget, Logic and Test only; the work is in MiMSlicerLib (GUI-free). Every long job runs the bundled engine
(`python -m engine ...`) as a subprocess read on a thread and polled by a QTimer, so Slicer never freezes."""
import logging
import sys

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:  # PySide6 (the test harness) only: Qt properties as attributes, as PythonQt gives them in Slicer
    from __feature__ import true_property  # noqa: F401
except ImportError:
    pass

from MiMSlicerLib import compatibility  # Python 3.9 syntax: every Slicer reads it, so an old one gets this line

if compatibility.whyUnsupported(slicer.app):
    raise ImportError(compatibility.whyUnsupported(slicer.app))

from MiMSlicerLib import caseWatch, finetuneDataset, modelChoice, panelText, paths, pretraining, tasks  # noqa: E402
from MiMSlicerLib.session import FILE_CHOICE, JobRefused, Session  # noqa: E402

DEVICES = ("auto", "cpu")
CASES_REFRESH_MS = 250  # scene and segmentation events are gathered this long before the case list is rebuilt
DEFAULTS = {"Model": FILE_CHOICE, "Checkpoint": "", "Device": "auto", "Seed": "0", "Minutes": "10", "Steps": "0",
            "Preset": "fast", "ModelName": "", "FromScratch": "false",
            "Uncertainty": "false", "PretrainMinutes": "10", "PretrainFolder": ""}
# presets whose networks share an encoder (engine/configs/finetune/*.yaml `encoder_preset`), the model's own first
SAME_ENCODER = {"tiny": ("tiny",), "small": ("small", "fast"), "fast": ("fast", "small"), "base": ("base",)}


class MiMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MiM Slicer"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MiMSlicer authors"]
        self.parent.helpText = (
            "Explore what a Mask-in-Mask (MiM) pre-trained model learnt: hide blocks of a CT at three zoom levels and "
            "watch it reconstruct them, in place. Segment CT with a fine-tuned model, fine-tune a new one on cases "
            "you labelled in Slicer, and pre-train an encoder on your own CT volumes. Sample CTs with named organs are "
            "in the Sample Data module (MiMSlicer). Long jobs run in the background; Cancel stops them and leaves the "
            "scene as it was.")
        self.parent.acknowledgementText = ("Built on PyTorch, MONAI and SimpleITK. Sample CTs: TotalSegmentator 2.18.0's "
                                           "test volumes (PyPI source distribution, Apache-2.0).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Once Slicer has loaded every module: the sample CTs in the Sample Data module (MiMSlicerLib/sampleData.py)."""
    import SampleData
    from MiMSlicerLib import sampleData
    sampleData.register(SampleData.SampleDataLogic, sampleData.Downloader(reportError=slicer.util.errorDisplay,
                                                                          reportStatus=slicer.util.showStatusMessage))


class MiMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        VTKObservationMixin.__init__(self)  # before the base __init__, which calls setup() when parent is None
        self.logic, self._parameterNode, self._updating = None, None, False
        self._manualCases, self._jobStatus, self._segmentedVolumeID = [], ("", "info"), None
        self._logLinesShown, self._packagesProblem, self._checkpointShown = 0, "", ""
        self._casesDirty = False
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(paths.resourcePath("UI", "MiMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MiMSlicerLogic()
        self._plan = self.logic.planLabels([])
        self.timer = qt.QTimer()
        self.timer.interval = 200
        self.timer.timeout.connect(self.onPoll)
        self._casesTimer = qt.QTimer()
        self._casesTimer.singleShot = True
        self._casesTimer.interval = CASES_REFRESH_MS
        self._casesTimer.timeout.connect(self.onCasesTimer)
        self._connectWidgets()
        self.caseWatcher = caseWatch.CaseWatch(slicer.mrmlScene, changed=self.scheduleCasesRefresh,
                                             busy=lambda: self._updating or self.logic.busy)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.refreshModels()
        self.checkPackages()
        self.setParameterNode(self.logic.getParameterNode())
        self.refreshCases()

    def _connectWidgets(self):
        ui = self.ui
        for selector in (ui.inputVolumeSelector, ui.caseVolumeSelector, ui.caseSegmentationSelector):
            selector.currentNodeChanged.connect(self.onGUIChanged)
        for combo in (ui.modelComboBox, ui.deviceComboBox, ui.presetComboBox):
            combo.currentIndexChanged.connect(self.onGUIChanged)
        for spin in (ui.seedSpinBox, ui.minutesSpinBox, ui.stepsSpinBox, ui.pretrainMinutesSpinBox):
            spin.valueChanged.connect(self.onGUIChanged)
        for edit in (ui.modelNameLineEdit, ui.pretrainFolderLineEdit):
            edit.textChanged.connect(self.onGUIChanged)
        ui.fromScratchCheckBox.toggled.connect(self.onGUIChanged)
        ui.uncertaintyCheckBox.toggled.connect(self.onGUIChanged)
        ui.checkpointPathLineEdit.currentPathChanged.connect(self.onCheckpointPathChanged)
        ui.checkpointPathLineEdit.validInputChanged.connect(self.onCheckpointValidInputChanged)
        ui.reconstructButton.clicked.connect(self.onReconstruct)
        ui.segmentButton.clicked.connect(self.onSegment)
        ui.finetuneButton.clicked.connect(self.onFinetune)
        ui.pretrainButton.clicked.connect(self.onPretrain)
        ui.pretrainBrowseButton.clicked.connect(self.onPretrainBrowse)
        ui.cancelButton.clicked.connect(self.onCancel)
        ui.dependenciesButton.clicked.connect(self.onDependencies)
        ui.downloadButton.clicked.connect(self.onDownload)
        ui.clearReconstructionsButton.clicked.connect(self.onClearReconstructions)
        ui.addCaseButton.clicked.connect(self.onAddCase)
        ui.casesListWidget.itemChanged.connect(self.onCaseTicked)
        ui.finetuneCollapsibleButton.contentsCollapsed.connect(self.onFinetuneCollapsed)
        ui.levelComboBox.currentIndexChanged.connect(self.onLevelChanged)
        ui.viewListWidget.currentRowChanged.connect(self.onViewChanged)
        for radio in self._layerRadios().values():
            radio.toggled.connect(self.onViewChanged)

    def onReload(self):
        """Slicer's Reload re-reads MiMSlicer.py only: drop MiMSlicerLib from sys.modules too, so that the reloaded
        module imports the library afresh and edits to it count (SlicerMONAIAuto3DSeg reloads its Lib the same way)."""
        self.logic.cancel()
        for name in [n for n in sys.modules if n == "MiMSlicerLib" or n.startswith("MiMSlicerLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self):
        self.removeObservers()
        self.caseWatcher.stop()
        self.logic.cancel()
        self.timer.stop()
        self._casesTimer.stop()

    def enter(self):
        self.checkPackages()
        self.setParameterNode(self.logic.getParameterNode())
        self.refreshCases()  # what changed in the scene while another module was shown

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.logic.reconstruction = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self._manualCases = []
        self.caseWatcher.reset()
        self.setParameterNode(self.logic.getParameterNode())
        self.showReconstruction(None)

    def scheduleCasesRefresh(self):
        self._casesDirty = True
        self._casesTimer.start()

    def onCasesTimer(self):
        self.caseWatcher.arm()
        if self._casesNeeded():
            self.refreshCases()
        self.updateButtons()  # the scene's CT volumes, for pre-training

    def _casesNeeded(self):
        """The case list (and the labelmap scan behind its label plan) is only rebuilt while someone can see it."""
        return self._casesDirty and self.parent.visible and not self.ui.finetuneCollapsibleButton.collapsed

    def onFinetuneCollapsed(self, collapsed):
        if not collapsed and self._casesNeeded():
            self.refreshCases()

    # -- parameter node <-> GUI ------------------------------------------------------------------------------
    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = node
        if node is not None:
            self.logic.setDefaultParameters(node)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, *_):
        node, ui = self._parameterNode, self.ui
        if node is None or self._updating:
            return
        self._updating = True
        try:  # a widget is written only when its value differs: rewriting a line edit would move its cursor
            volume = node.GetNodeReference("InputVolume")
            if ui.inputVolumeSelector.currentNodeID != (volume.GetID() if volume else ""):
                ui.inputVolumeSelector.setCurrentNode(volume)
            _show(ui.modelComboBox, "currentIndex", max(ui.modelComboBox.findData(node.GetParameter("Model")), 0))
            if node.GetParameter("Checkpoint") != self._checkpointShown:
                self._checkpointShown = node.GetParameter("Checkpoint")
                ui.checkpointPathLineEdit.currentPath = self._checkpointShown
            _show(ui.deviceComboBox, "currentIndex", DEVICES.index(node.GetParameter("Device") or "auto"))
            _show(ui.seedSpinBox, "value", int(node.GetParameter("Seed") or 0))
            _show(ui.minutesSpinBox, "value", int(node.GetParameter("Minutes") or 0))
            _show(ui.stepsSpinBox, "value", int(node.GetParameter("Steps") or 0))
            _show(ui.presetComboBox, "currentIndex", max(ui.presetComboBox.findText(node.GetParameter("Preset")), 0))
            _show(ui.modelNameLineEdit, "text", node.GetParameter("ModelName"))
            _show(ui.fromScratchCheckBox, "checked", node.GetParameter("FromScratch") == "true")
            _show(ui.uncertaintyCheckBox, "checked", node.GetParameter("Uncertainty") == "true")
            _show(ui.pretrainMinutesSpinBox, "value", int(node.GetParameter("PretrainMinutes") or 10))
            _show(ui.pretrainFolderLineEdit, "text", node.GetParameter("PretrainFolder"))
        finally:
            self._updating = False
        self.updateButtons()

    def onGUIChanged(self, *_):
        node, ui = self._parameterNode, self.ui
        if node is None or self._updating:
            return
        wasModifying = node.StartModify()
        node.SetNodeReferenceID("InputVolume", ui.inputVolumeSelector.currentNodeID or None)
        modelChanged = node.GetParameter("Model") != (ui.modelComboBox.itemData(ui.modelComboBox.currentIndex) or FILE_CHOICE)
        node.SetParameter("Model", ui.modelComboBox.itemData(ui.modelComboBox.currentIndex) or FILE_CHOICE)
        node.SetParameter("Device", DEVICES[max(ui.deviceComboBox.currentIndex, 0)])
        node.SetParameter("Seed", str(ui.seedSpinBox.value))
        node.SetParameter("Minutes", str(ui.minutesSpinBox.value))
        node.SetParameter("Steps", str(ui.stepsSpinBox.value))
        node.SetParameter("Preset", ui.presetComboBox.currentText)
        node.SetParameter("ModelName", ui.modelNameLineEdit.text)
        node.SetParameter("FromScratch", "true" if ui.fromScratchCheckBox.checked else "false")
        node.SetParameter("Uncertainty", "true" if ui.uncertaintyCheckBox.checked else "false")
        node.SetParameter("PretrainMinutes", str(ui.pretrainMinutesSpinBox.value))
        node.SetParameter("PretrainFolder", ui.pretrainFolderLineEdit.text)
        if modelChanged:
            self.logic.matchPresetToModel(node)
        node.EndModify(wasModifying)
        self.updateButtons()

    def onCheckpointPathChanged(self, path):
        """ctkPathLineEdit emits this only for text its name filters accept (a checkpoint's name), never for ''."""
        if self._parameterNode is None or self._updating:
            return
        self._checkpointShown = path
        self._parameterNode.SetParameter("Checkpoint", path)
        self._parameterNode.SetParameter("Model", FILE_CHOICE)
        self.logic.matchPresetToModel(self._parameterNode)

    def onCheckpointValidInputChanged(self, valid):
        """The field no longer holds a checkpoint's name (cleared, or half typed): no checkpoint is chosen."""
        if valid or self._parameterNode is None or self._updating:
            return
        self._checkpointShown = ""
        self._parameterNode.SetParameter("Checkpoint", "")

    def updateButtons(self):
        ui, node = self.ui, self._parameterNode
        if node is None:
            return
        busy, model = self.logic.busy, self.logic.selectedModel(node)
        volume = node.GetNodeReference("InputVolume")
        volumes, folder = self._pretrainVolumes()
        reasons = {ui.reconstructButton: modelChoice.whyNotReconstruct(volume, model),
                   ui.segmentButton: modelChoice.whyNotSegment(volume, model),
                   ui.finetuneButton: modelChoice.whyNotFinetune(model, self._plan, ui.modelNameLineEdit.text,
                                                                 self._fromScratch()),
                   ui.pretrainButton: modelChoice.whyNotPretrain(volumes, folder)}
        busyText = ("The engine packages are being installed." if self.logic.installing
                    else "Another job is running.")
        for button, reason in reasons.items():
            button.enabled = not busy and not reason
            button.toolTip = busyText if busy else reason
        ui.segmentButton.text = f"Segment {volume.GetName()}" if volume else "Segment"
        if volume is None or volume.GetID() != self._segmentedVolumeID:
            ui.segmentResultLabel.text = ""
        ui.modelInfoLabel.text = model.infoHtml()
        ui.modelInfoLabel.visible = bool(ui.modelInfoLabel.text)
        ui.downloadButton.visible = model.needsDownload
        ui.downloadButton.enabled = not busy
        ui.startFromLabel.text = model.startFromText(self._fromScratch())
        ui.pretrainSourceLabel.text = modelChoice.pretrainSourceText(volumes, folder, ui.pretrainMinutesSpinBox.value,
                                                                     node.GetParameter("Preset"))
        ui.cancelButton.enabled = self.logic.jobRunning
        for widget in (ui.modelComboBox, ui.deviceComboBox, ui.dependenciesButton, ui.inputVolumeSelector,
                       ui.clearReconstructionsButton, ui.pretrainBrowseButton):
            widget.enabled = not busy
        ui.checkpointPathLineEdit.enabled = not busy and model.isFile
        ui.stepsSpinBox.enabled = ui.minutesSpinBox.value == 0  # with a time limit, the steps that fit in it
        text, kind = self._jobStatus
        if not text:  # nothing to report: say what to do next, packages first
            text, kind = next((r for r in [self._packagesProblem, *reasons.values()] if r), ""), "hint"
        ui.statusLabel.text = panelText.status(text, kind)

    def setJobStatus(self, text, kind="info"):
        self._jobStatus = (text, kind)
        self.updateButtons()

    # -- models and cases ------------------------------------------------------------------------------------
    def refreshModels(self, selectID=None):
        combo = self.ui.modelComboBox
        wasUpdating, self._updating = self._updating, True
        try:
            combo.clear()
            for entry in self.logic.catalogueEntries():
                kind = "MiM pre-trained" if entry["task"] == "pretraining" else "Segmentation"
                combo.addItem(f"{kind} · {entry['name']}", entry["id"])
            combo.addItem("Checkpoint file (below)", FILE_CHOICE)
        except Exception as err:  # a broken user catalogue must not hide the module
            self._jobStatus = (str(err), "error")
        finally:
            self._updating = wasUpdating
        if selectID and self._parameterNode is not None:
            self._parameterNode.SetParameter("Model", selectID)
        self.updateGUI()

    def refreshCases(self):
        """One line per case: its CT, segmentation and labels. Nothing is ticked unless the user ticked it, added it
        by hand, or edited its segmentation while the module watched."""
        self._casesDirty = False
        self.caseWatcher.watchAll()
        listWidget = self.ui.casesListWidget
        listWidget.blockSignals(True)
        listWidget.clear()
        for case in self.logic.labelledCases(self._manualCases):
            note = " · model output" if case.isModelOutput else ""
            item = qt.QListWidgetItem(f"{case.title} ({', '.join(case.segmentNames()) or 'no segments'}){note}")
            item.setToolTip(f"CT: {case.volumeNode.GetName()}\nSegmentation: {case.segmentationNode.GetName()}" +
                            ("\nMade by a model: correct it before training on it." if case.isModelOutput else ""))
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            checked = self.caseWatcher.startsTicked(case)
            item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
            item.setData(qt.Qt.UserRole, case.key)
            listWidget.addItem(item)
        listWidget.blockSignals(False)
        self.onCasesChanged()

    def onCaseTicked(self, item):
        self.caseWatcher.setTicked(item.data(qt.Qt.UserRole), item.checkState() == qt.Qt.Checked)
        self.onCasesChanged()

    def checkedCases(self):
        listWidget, scene, cases = self.ui.casesListWidget, slicer.mrmlScene, []
        for i in range(listWidget.count):
            item = listWidget.item(i)
            if item.checkState() == qt.Qt.Checked:
                volume, segmentation = (scene.GetNodeByID(n) for n in item.data(qt.Qt.UserRole).split("|"))
                if volume is not None and segmentation is not None:
                    cases.append(finetuneDataset.LabelledCase(volume, segmentation))
        return cases

    def onCasesChanged(self, *_):
        cases = self.checkedCases()
        self._plan = self.logic.planLabels(cases)
        self.ui.labelPlanLabel.text = panelText.labelPlan(self._plan) if cases else ""
        if cases and not self.ui.modelNameLineEdit.text and self._parameterNode is not None:
            self._parameterNode.SetParameter("ModelName", self.logic.suggestModelName(cases))
        self.updateButtons()

    def onAddCase(self):
        volume, segmentation = self.ui.caseVolumeSelector.currentNode(), self.ui.caseSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            self.setJobStatus("To add a case by hand, choose its CT volume and its segmentation first.", "hint")
            return
        self._manualCases.append((volume.GetID(), segmentation.GetID()))
        self.caseWatcher.setTicked(f"{volume.GetID()}|{segmentation.GetID()}", True)
        self.refreshCases()

    # -- jobs ------------------------------------------------------------------------------------------------
    def onReconstruct(self):
        node = self._parameterNode
        center = self.logic.crosshairPosition() if self.ui.centerOnCrosshairCheckBox.checked else None
        self.runTask(lambda: self.logic.startReconstruction(
            node.GetNodeReference("InputVolume"), self.logic.selectedModel(node).path,
            seed=int(node.GetParameter("Seed")), center=center, device=node.GetParameter("Device")))

    def onSegment(self):
        node, model = self._parameterNode, self.logic.selectedModel(self._parameterNode)
        self.runTask(lambda: self.logic.startSegmentation(
            node.GetNodeReference("InputVolume"), model.path, labels=model.labels, device=node.GetParameter("Device"),
            uncertainty=node.GetParameter("Uncertainty") == "true"))

    def _fromScratch(self):
        return self._parameterNode is not None and self._parameterNode.GetParameter("FromScratch") == "true"

    def onFinetune(self):
        node, model = self._parameterNode, self.logic.selectedModel(self._parameterNode)
        pretrained, label = ("none", "no pre-training") if self._fromScratch() else (model.path, model.name)
        task = self.runTask(lambda: self.logic.startFinetune(
            self.checkedCases(), pretrained, node.GetParameter("ModelName"), preset=node.GetParameter("Preset"),
            steps=int(node.GetParameter("Steps") or 0), minutes=int(node.GetParameter("Minutes") or 0),
            device=node.GetParameter("Device"), pretrainedLabel=label))
        if task is not None:
            self.logic.showChart(task.plot.chart)

    def _pretrainVolumes(self):
        """(the scene's CT volumes, '') or ([], the folder chosen): what 'Pre-train on these volumes' uses."""
        folder = self._parameterNode.GetParameter("PretrainFolder").strip() if self._parameterNode else ""
        return ([], folder) if folder else (self.logic.sceneCtVolumes(), "")

    def onPretrain(self):
        node, (volumes, folder) = self._parameterNode, self._pretrainVolumes()
        self.runTask(lambda: self.logic.startPretrain(
            volumes, folder=folder or None, minutes=int(node.GetParameter("PretrainMinutes") or 10),
            recipe=node.GetParameter("Preset"), device=node.GetParameter("Device")))

    def onPretrainBrowse(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Folder of CT volumes to pre-train on",
                                                     self.ui.pretrainFolderLineEdit.text)
        if folder:
            self.ui.pretrainFolderLineEdit.text = folder

    def onDownload(self):
        model = self.logic.selectedModel(self._parameterNode)
        self.runTask(lambda: self.logic.startDownload(model.entry))

    def runTask(self, startTask):
        try:
            task = startTask()
        except JobRefused as err:  # busy, or packages missing: the message says what to do
            self.setJobStatus(str(err), "warning")
            return None
        except Exception as err:
            logging.exception("MiMSlicer: the job did not start")
            self.setJobStatus(str(err), "error")
            return None
        self.ui.logTextEdit.plainText = ""
        self._logLinesShown = 0
        self.ui.progressBar.value = 0
        self.ui.progressLabel.text = task.message
        self.setJobStatus(task.message, "info")
        self.timer.start()
        return task

    def onPoll(self):
        task = self.logic.task
        self.logic.poll()
        if task is not None:
            for line in task.logLines[self._logLinesShown:]:
                self.ui.logTextEdit.appendPlainText(line)
            self._logLinesShown = len(task.logLines)
        if task is None:
            self.timer.stop()
            return
        self.ui.progressBar.value = int(100 * task.fraction)
        self.ui.progressLabel.text = task.message
        if not task.running:
            self.timer.stop()
            self.onTaskEnded(task)

    def onTaskEnded(self, task):
        kind = {tasks.DONE: "done", tasks.FAILED: "error", tasks.CANCELLED: "info"}[task.state]
        self.ui.progressBar.value = 100 if task.state == tasks.DONE else 0
        self.ui.progressLabel.text = "No job running."
        if task.state == tasks.DONE and isinstance(task, tasks.ReconstructTask):
            self.showReconstruction(task.result)
        elif task.state == tasks.DONE and isinstance(task, tasks.SegmentTask):
            self._segmentedVolumeID = task.volumeNode.GetID()
            self.ui.segmentResultLabel.text = panelText.status(task.message, "done")
        elif task.state == tasks.DONE and isinstance(task, (tasks.FinetuneTask, pretraining.PretrainTask)):
            self.refreshModels(selectID=task.result["id"])  # ready to segment, or to fine-tune from
        self.refreshCases()
        self.setJobStatus(task.message, kind)

    def onCancel(self):
        if self.logic is not None and self.logic.jobRunning:
            self.logic.cancel()
            self.onPoll()

    def checkPackages(self):
        """What the engine lacks in Slicer's Python (shown first in the status line, until it is installed)."""
        self._packagesProblem = (self.logic.dependencies.whyEngineCannotRun()
                                 if paths.engineRunsInSlicerPython() else "")

    def onDependencies(self):
        if self.logic.busy:
            return
        if not self.logic.dependencies.check():
            self.checkPackages()
            self.setJobStatus("All engine packages are installed.", "done")
            return
        waitCursor = []

        def confirmThenShowBusy(question):
            """After a yes, the panel shows the busy state before pip starts (it keeps the GUI alive meanwhile)."""
            if not slicer.util.confirmOkCancelDisplay(question):
                return False
            self.setJobStatus("Installing the engine packages… this can take several minutes; the other buttons "
                              "wait until it ends.", "info")
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            waitCursor.append(True)
            slicer.app.processEvents()
            return True

        try:
            result = self.logic.installDependencies(confirm=confirmThenShowBusy)
            self._jobStatus = (result.message, "warning" if result.declined else "done")
        except Exception as err:
            logging.exception("MiMSlicer: installing the engine packages failed")
            self._jobStatus = (f"Installing the engine packages failed: {err}", "error")
        finally:
            if waitCursor:
                qt.QApplication.restoreOverrideCursor()
        self.checkPackages()
        self.updateButtons()

    # -- reconstruction browser ------------------------------------------------------------------------------
    def _layerRadios(self):
        ui = self.ui
        return {"input": ui.showInputRadioButton, "masked": ui.showMaskedRadioButton,
                "reconstruction": ui.showReconstructionRadioButton, "error": ui.showErrorRadioButton}

    def showReconstruction(self, result):
        combo = self.ui.levelComboBox
        combo.blockSignals(True)
        combo.clear()
        for level in (result.levels if result else []):
            combo.addItem(level.label, level.level)
        combo.blockSignals(False)
        self.ui.viewListWidget.clear()
        self.ui.reconstructionSummaryLabel.text = (
            f"{panelText.escape(result.summary())}.<br>{result.legendHtml()}; outlines: the hidden blocks."
            if result else "")
        if result:
            combo.currentIndex = 0
            self.onLevelChanged()

    def onClearReconstructions(self):
        if self.logic.busy:
            return
        removed = self.logic.removeEarlierReconstructions()
        self.setJobStatus(f"Removed {removed} earlier reconstruction run(s)." if removed
                          else "There is no earlier reconstruction run in the scene.", "done" if removed else "info")

    def onLevelChanged(self, *_):
        result, combo = self.logic.reconstruction, self.ui.levelComboBox
        if result is None or combo.currentIndex < 0:
            return
        views = self.ui.viewListWidget
        views.blockSignals(True)
        views.clear()
        for view in result.level(combo.itemData(combo.currentIndex)).views:
            views.addItem(view.label)
        views.blockSignals(False)
        views.currentRow = 0
        self.onViewChanged()

    def onViewChanged(self, *_):
        result, combo, views = self.logic.reconstruction, self.ui.levelComboBox, self.ui.viewListWidget
        if result is None or combo.currentIndex < 0 or views.currentRow < 0:
            return
        layer = next(name for name, radio in self._layerRadios().items() if radio.checked)
        self.logic.showReconstructionView(combo.itemData(combo.currentIndex), views.currentRow, layer)


def _show(widget, name, value):
    """Set a widget's property only when it differs (writing the same text again moves a line edit's cursor)."""
    if getattr(widget, name) != value:
        setattr(widget, name, value)


class MiMSlicerLogic(ScriptedLoadableModuleLogic, Session):
    """Starts engine jobs from scene nodes and follows the current one (MiMSlicerLib.session.Session), with the
    widget state in a parameter node. Never opens dialogs, never blocks."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        Session.__init__(self)

    def setDefaultParameters(self, node):
        for name, value in DEFAULTS.items():
            if not node.GetParameter(name):
                node.SetParameter(name, value)
        if not node.GetNodeReference("InputVolume"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume is not None and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                node.SetNodeReferenceID("InputVolume", volume.GetID())

    def selectedModel(self, node):
        return self.modelFor(node.GetParameter("Model"), node.GetParameter("Checkpoint"))

    def matchPresetToModel(self, node):
        """A fine-tune must use the network size of the encoder it starts from: the model's preset, or one with the
        same encoder (`fast`, the CPU recipe, has `small`'s), keeping the current choice when it fits."""
        preset = self.selectedModel(node).preset
        if preset in SAME_ENCODER and node.GetParameter("Preset") not in SAME_ENCODER[preset]:
            node.SetParameter("Preset", SAME_ENCODER[preset][0])

    def crosshairPosition(self):
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        return list(crosshair.GetCrosshairRAS()) if crosshair is not None else None

    def showChart(self, chartNode):
        """Show the training curves in a plot view of the layout (desktop Slicer; headless there is no layout)."""
        if hasattr(slicer.app, "layoutManager"):
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)


class MiMSlicerTest(ScriptedLoadableModuleTest):
    """Desktop Slicer only (Reload and Test, or ctest through slicer_add_python_unittest): what the headless tests
    in Testing/slicer cannot reach. The cases live in MiMSlicerLib/desktopTests.py; they write only into a temporary
    folder (MIMSLICER_HOME, MIMSLICER_TEMP), set before the first case runs and restored after."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):  # Slicer calls runTest() alone
        from MiMSlicerLib import desktopTests
        self.setUp()
        with desktopTests.ownFolders() as folder:
            desktopTests.run(self, folder)
