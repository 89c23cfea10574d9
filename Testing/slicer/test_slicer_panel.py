"""The panel's behaviour in desktop Slicer that needs no engine run: the harness stand-ins behave like the CTK widgets
they replace, and the widget code reacts to the scene and to typing as it must in Slicer."""
import qt
from PySide6.QtTest import QTest

try:
    from __feature__ import true_property  # noqa: F401  (read widgets the PythonQt way, as the module does)
except ImportError:
    pass

from mimslicer_testing import loadVolume
from slicer_test_env._mrml_widgets import ctkPathLineEdit


# -- the stand-ins behave like CTK's widgets ---------------------------------------------------------------------
def test_path_line_edit_emits_only_paths_its_filter_accepts():
    """ctkPathLineEdit: currentPathChanged only for text the name filters accept (never for ''), validInputChanged
    when that flips; CTK's pattern makes the last letter of each extension optional."""
    edit = ctkPathLineEdit()
    edit.nameFilters = ["Checkpoints (*.pt *.pth)"]
    paths, valid = [], []
    edit.currentPathChanged.connect(paths.append)
    edit.validInputChanged.connect(valid.append)
    line = edit.comboBox().lineEdit()
    QTest.keyClicks(line, "/a/b.pt")
    assert paths == ["/a/b.p", "/a/b.pt"] and valid == [True]
    line.clear()
    assert paths == ["/a/b.p", "/a/b.pt"] and valid == [True, False]
    edit.currentPath = "/a/model.ckpt"
    assert edit.currentPath == "/a/model.ckpt" and paths[-1] == "/a/b.pt"  # shown, never emitted
    edit.currentPath = "/a/model.pth"
    assert paths[-1] == "/a/model.pth" and valid == [True, False, True]


def test_exceptions_in_slots_and_observers_are_caught(failOnCallbackExceptions):
    """PySide6 and VTK only print what a slot or an observer raises; the harness collects it and fails the test."""
    import vtk
    button = qt.QPushButton()
    button.clicked.connect(lambda *_: 1 / 0)
    button.click()
    node = vtk.vtkObject()
    node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *_: {}["missing"])
    node.Modified()
    assert [e.strip().splitlines()[-1].split(":")[0] for e in failOnCallbackExceptions] == ["ZeroDivisionError",
                                                                                             "KeyError"]
    failOnCallbackExceptions.clear()  # seen: this test passes


# -- engine packages: checked before every job, installed with the panel busy --------------------------------------
def plain(label):
    """What a rich-text label shows, as plain text."""
    return qt.QTextDocumentFragment.fromHtml(label.text).toPlainText()


def newWidget():
    from MiMSlicer import MiMSlicerWidget
    widget = MiMSlicerWidget()  # no parent: makes its own qMRMLWidget and calls setup(), as Slicer does
    qt.QApplication.processEvents()
    return widget


def pretrainedFile(tmp_path):
    """A file the panel takes for a MiM pre-training checkpoint (its run folder's config.yaml says so)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: mim\npreset: tiny\n")
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(b"not read by these tests")
    return str(path)


def readyToReconstruct(widget, volume, tmp_path):
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    widget.ui.checkpointPathLineEdit.currentPath = pretrainedFile(tmp_path)
    assert widget.ui.reconstructButton.enabled, widget.ui.reconstructButton.toolTip


def test_a_job_without_the_engine_packages_says_what_is_missing(jobsFolder, scene, smallCt, tmp_path):
    """On a fresh Slicer the first job used to fail with "No module named 'torch'": now the panel says what is
    missing and where to install it, and nothing starts."""
    from MiMSlicerLib import dependencies
    volume = loadVolume(smallCt)
    widget = newWidget()
    widget.logic.dependencies = dependencies.Dependencies({"torch": ">=2.5", "definitely-not-installed-pkg": ">=1"},
                                                          versionOf={"torch": "2.2.1"}.get)
    widget.checkPackages()
    readyToReconstruct(widget, volume, tmp_path)
    status = plain(widget.ui.statusLabel)
    assert "PyTorch 2.2.1 (needs >=2.5)" in status and "definitely-not-installed-pkg" in status
    assert "'Check engine packages'" in status
    widget.ui.reconstructButton.click()
    assert widget.logic.task is None and not widget.timer.active
    assert "definitely-not-installed-pkg" in widget.ui.statusLabel.text and "#9a6700" in widget.ui.statusLabel.text
    widget.cleanup()


def test_installing_shows_busy_and_no_button_starts_anything_meanwhile(jobsFolder, scene, smallCt, tmp_path):
    """Slicer's pip_install keeps the GUI alive while pip runs (it processes events for every line pip prints), so
    clicks reach the panel: every job button is disabled, and a job or a second install started another way is
    refused."""
    import slicer
    from MiMSlicerLib import dependencies
    volume = loadVolume(smallCt)
    widget = newWidget()
    ui, installed, during = widget.ui, {}, {}

    def pip(args):
        qt.QApplication.processEvents()  # as slicer.util.pip_install does
        during["enabled"] = [b.enabled for b in (ui.reconstructButton, ui.segmentButton, ui.finetuneButton,
                                                 ui.dependenciesButton, ui.downloadButton, ui.cancelButton)]
        during["status"] = ui.statusLabel.text
        during["cursor"] = qt.QApplication.overrideCursor() is not None
        ui.reconstructButton.click()  # disabled: nothing
        widget.onReconstruct()  # a slot called all the same: refused
        during["refused"] = ui.statusLabel.text
        widget.onDependencies()  # a second install: refused
        installed["definitely-not-installed-pkg"] = "1.0"

    widget.logic.dependencies = dependencies.Dependencies({"definitely-not-installed-pkg": ">=1"}, pipInstall=pip,
                                                          versionOf=installed.get, installedPins=list)
    widget.checkPackages()
    readyToReconstruct(widget, volume, tmp_path)
    slicer.util.confirmAnswer = True
    try:
        ui.dependenciesButton.click()
    finally:
        slicer.util.confirmAnswer = False
    assert len(slicer.util.confirmations) == 1  # asked once, never re-entered
    assert during["enabled"] == [False] * 6 and during["cursor"]
    assert "Installing the engine packages" in during["status"]
    assert "being installed" in during["refused"] and widget.logic.task is None
    assert "Installed definitely-not-installed-pkg" in ui.statusLabel.text
    assert ui.reconstructButton.enabled and ui.dependenciesButton.enabled and not widget.logic.busy
    assert qt.QApplication.overrideCursor() is None
    widget.cleanup()


# -- typing: the parameter node never rewrites what is being typed --------------------------------------------------
def test_typing_in_the_middle_of_the_model_name_keeps_the_cursor(scene):
    widget = newWidget()
    line = widget.ui.modelNameLineEdit
    QTest.keyClicks(line, "heart aorta")
    line.cursorPosition = 5
    QTest.keyClicks(line, "s")
    assert line.text == "hearts aorta" and line.cursorPosition == 6
    assert widget.logic.getParameterNode().GetParameter("ModelName") == "hearts aorta"
    widget.cleanup()


def test_checkpoint_field_follows_what_is_typed(scene, tmp_path):
    """The real ctkPathLineEdit reports only names its filter accepts: a half-typed or cleared field means no
    checkpoint (it used to keep the old one), a .ckpt file can be chosen, and nothing typed is overwritten."""
    widget = newWidget()
    parameters, ui = widget.logic.getParameterNode(), widget.ui
    line = ui.checkpointPathLineEdit.comboBox().lineEdit()
    checkpoint = pretrainedFile(tmp_path)
    QTest.keyClicks(line, checkpoint)
    assert parameters.GetParameter("Checkpoint") == checkpoint and ui.modelComboBox.currentText == "Checkpoint file (below)"
    assert "MiM pre-training checkpoint" in ui.modelInfoLabel.text
    QTest.keyClick(line, qt.Qt.Key_Backspace)
    QTest.keyClick(line, qt.Qt.Key_Backspace)  # '...checkpoint.' is no checkpoint's name
    assert line.text == checkpoint[:-2] and parameters.GetParameter("Checkpoint") == ""
    line.selectAll()
    QTest.keyClick(line, qt.Qt.Key_Delete)
    assert line.text == "" and parameters.GetParameter("Checkpoint") == ""
    assert ui.modelInfoLabel.text == "Choose a catalogue model, or a checkpoint file below."
    lightning = tmp_path / "run" / "last.ckpt"
    lightning.write_bytes(b"x")
    QTest.keyClicks(line, str(lightning))
    assert parameters.GetParameter("Checkpoint") == str(lightning) and line.text == str(lightning)
    parameters.SetParameter("Checkpoint", checkpoint)  # a scene or script sets it: the field shows it
    assert line.text == checkpoint
    widget.cleanup()


# -- fine-tune cases: follow Segment Editor, nothing ticked that the user did not choose or draw ---------------------
def caseRows(widget):
    rows = widget.ui.casesListWidget
    return [(rows.item(i).text(), rows.item(i).checkState() == qt.Qt.Checked) for i in range(rows.count)]


def settle():
    """Let the panel's gathered refresh run, as Slicer's event loop would."""
    from MiMSlicer import CASES_REFRESH_MS
    QTest.qWait(CASES_REFRESH_MS + 150)


def test_case_list_follows_segment_editor_and_ticks_only_what_the_user_drew(scene, smallCt, chestCases):
    """Segment Editor adds a segmentation before it sets the CT, and painting adds no node: the list follows both.
    A segmentation loaded from a file is offered unticked; one drawn here is ticked; the user's own tick wins."""
    import numpy as np
    import slicer
    from mimslicer_testing import loadLabelsAsSegmentation
    volume = loadVolume(smallCt, "CT")
    widget = newWidget()
    assert caseRows(widget) == []

    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")  # Segment Editor: a new segmentation ...
    drawn.CreateDefaultDisplayNodes()
    settle()
    assert caseRows(widget) == []  # ... no CT yet: no case
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # ... then the source volume
    settle()
    assert caseRows(widget) == [("CT + Drawn (no segments)", False)]
    segmentID = drawn.GetSegmentation().AddEmptySegment("", "Segment_1")  # 'Add', then paint
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    mask[10:20, 10:20, 10:20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, drawn, segmentID, volume)
    drawn.GetSegmentation().GetSegment(segmentID).SetName("heart")  # renamed
    settle()
    assert caseRows(widget) == [("CT + Drawn (heart)", True)]
    assert "heart = 1" in widget.ui.labelPlanLabel.text

    other = loadVolume(chestCases[0][0], "Chest")  # Add Data of a CT and its segmentation file
    loadLabelsAsSegmentation(other, chestCases[0][1], {"heart": 1, "aorta": 2})
    settle()
    assert caseRows(widget) == [("CT + Drawn (heart)", True), ("Chest + Chest labels (heart, aorta)", False)]
    widget.ui.casesListWidget.item(0).setCheckState(qt.Qt.Unchecked)  # the user's choice ...
    drawn.GetSegmentation().AddEmptySegment("", "aorta")
    settle()
    assert caseRows(widget) == [("CT + Drawn (heart, aorta)", False),  # ... is kept through later edits
                                ("Chest + Chest labels (heart, aorta)", False)]
    widget.cleanup()


def test_hidden_panel_does_not_rebuild_the_list_and_enter_catches_up(scene, smallCt):
    """While another module is shown (or Fine-tune is collapsed) edits only mark the list stale; enter() or expanding
    the section rebuilds it (enter() used to leave it stale)."""
    volume = loadVolume(smallCt, "CT")
    widget = newWidget()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    settle()
    widget.parent.hide()  # another module is shown
    segmentation.GetSegmentation().AddEmptySegment("", "liver")
    settle()
    assert caseRows(widget) == [("CT + Drawn (no segments)", False)]
    widget.parent.show()
    widget.enter()
    assert caseRows(widget) == [("CT + Drawn (liver)", True)]
    widget.ui.finetuneCollapsibleButton.collapsed = True
    segmentation.GetSegmentation().AddEmptySegment("", "spleen")
    settle()
    assert caseRows(widget) == [("CT + Drawn (liver)", True)]
    widget.ui.finetuneCollapsibleButton.collapsed = False
    assert caseRows(widget) == [("CT + Drawn (liver, spleen)", True)]
    widget.cleanup()


# -- where models go, and what the desktop self-test may touch -----------------------------------------------------
def test_models_live_in_the_home_folder_not_in_slicer_settings(monkeypatch, tmp_path):
    """Slicer's settings folder is in the roaming profile on Windows: models (hundreds of MB) would be copied at
    every log-in. The catalogue and the models go to ~/.mimslicer, or MIMSLICER_HOME."""
    import slicer
    from MiMSlicerLib import paths
    monkeypatch.delenv("MIMSLICER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setattr(slicer.app, "slicerHome", str(tmp_path / "Slicer"), raising=False)  # inside Slicer ...
    monkeypatch.setattr(slicer.app, "slicerUserSettingsFilePath",  # ... whose settings roam
                        str(tmp_path / "AppData" / "Roaming" / "slicer.org" / "Slicer.ini"), raising=False)
    assert paths.userDataDir() == str(tmp_path / "user" / ".mimslicer")
    assert paths.modelsDir() == str(tmp_path / "user" / ".mimslicer" / "models")
    monkeypatch.setenv("MIMSLICER_HOME", str(tmp_path / "elsewhere"))
    assert paths.modelsDir() == str(tmp_path / "elsewhere" / "models")


def test_self_test_writes_only_into_its_own_folder(scene, mimFolders, monkeypatch):
    """Reload and Test makes the widget, then runs MiMSlicerTest: the widget's catalogue must already point into the
    test's temporary folder when the first case runs (it used to write into the user's real catalogue), and
    everything is as before afterwards."""
    import os
    import MiMSlicer
    from MiMSlicerLib import desktopTests
    widget = newWidget()  # made first, as Reload and Test does
    seen = {}

    def cases(test, folder):
        seen.update(home=os.environ["MIMSLICER_HOME"], temp=os.environ["MIMSLICER_TEMP"], folder=folder,
                    catalogue=widget.logic.catalogue.userPath)

    monkeypatch.setattr(desktopTests, "run", cases)
    MiMSlicer.MiMSlicerTest().runTest()
    assert seen["home"].startswith(seen["folder"]) and seen["temp"].startswith(seen["folder"])
    assert seen["catalogue"] == os.path.join(seen["home"], "models.json")
    assert os.environ["MIMSLICER_HOME"] == str(mimFolders["home"]) and not os.path.exists(seen["folder"])
    assert widget.logic.catalogue.userPath == os.path.join(str(mimFolders["home"]), "models.json")
    widget.cleanup()


def test_reload_reads_the_library_again(scene):
    """Slicer's Reload re-executes MiMSlicer.py only; the widget's onReload drops MiMSlicerLib first, so the new
    widget runs on freshly imported library modules."""
    import sys
    import slicer
    def ours(name):
        return name == "MiMSlicer" or name == "MiMSlicerLib" or name.startswith("MiMSlicerLib.")
    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    widget = newWidget()
    try:
        widget.onReload()
        reloaded = slicer.modules.MiMSlicerWidget
        assert sys.modules["MiMSlicerLib.tasks"] is not saved["MiMSlicerLib.tasks"]
        assert isinstance(reloaded.logic, sys.modules["MiMSlicerLib.session"].Session)
        assert not isinstance(reloaded.logic, saved["MiMSlicerLib.session"].Session)
        assert reloaded.parent is widget.parent and reloaded.ui.reconstructButton is not widget.ui.reconstructButton
        assert "Choose a CT volume" in reloaded.ui.statusLabel.text
        reloaded.cleanup()
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        vars(slicer.modules).pop("MiMSlicerWidget", None)


# -- the radiologist's loop: train for N minutes, progress that moves ---------------------------------------------
def test_finetune_trains_for_the_minutes_chosen(jobsFolder, scene, chestCases, tmp_path, monkeypatch):
    """'Train for 10 min' (the default) becomes `engine finetune --time-limit 10` without --steps (the steps that
    fit); 0 minutes and N steps give --steps N alone. The engine's side (--time-limit honoured, recorded) is tested
    in Testing/finetuning."""
    from mimslicer_testing import loadLabelsAsSegmentation
    from MiMSlicerLib import jobs
    commands = []
    monkeypatch.setattr(jobs.EngineJob, "start", lambda job: commands.append(job.command) or job)  # no process
    for n, (ct, label) in enumerate(chestCases):
        loadLabelsAsSegmentation(loadVolume(ct, f"Case {n + 1}"), label, {"heart": 1, "aorta": 2})
    widget = newWidget()
    ui = widget.ui
    for row in range(ui.casesListWidget.count):
        ui.casesListWidget.item(row).setCheckState(qt.Qt.Checked)
    ui.checkpointPathLineEdit.currentPath = pretrainedFile(tmp_path)
    assert ui.minutesSpinBox.value == 10 and ui.stepsSpinBox.value == 0 and ui.finetuneButton.enabled
    assert not ui.stepsSpinBox.enabled  # with a time limit the engine fits the steps to it
    ui.finetuneButton.click()
    command = commands[-1]
    assert command[command.index("finetune") - 2:command.index("finetune")] == ["-m", "engine"]
    assert command[command.index("--time-limit") + 1] == "10" and "--steps" not in command
    assert command[command.index("--pretrained") + 1] == ui.checkpointPathLineEdit.currentPath
    widget.logic.cancel()
    ui.minutesSpinBox.value = 0
    assert ui.stepsSpinBox.enabled
    ui.stepsSpinBox.value = 5
    ui.finetuneButton.click()
    assert "--time-limit" not in commands[-1] and commands[-1][commands[-1].index("--steps") + 1] == "5"
    widget.logic.cancel()
    ui.minutesSpinBox.value = 3  # both set: the time limit wins (the engine takes one of them)
    ui.finetuneButton.click()
    assert commands[-1][commands[-1].index("--time-limit") + 1] == "3" and "--steps" not in commands[-1]
    widget.logic.cancel()
    widget.onPoll()
    widget.cleanup()


def test_progress_moves_with_the_windows_and_with_the_time_limit(scene, smallCt):
    """Segmenting one CT used to show 0 % until the end: `engine infer` now reports its sliding-window windows.
    A time-limited fine-tune shows the time used of the limit."""
    import time
    from MiMSlicerLib import finetuneDataset, tasks
    segment = tasks.SegmentTask(scene, loadVolume(smallCt, "CT"), "model.pt")
    segment.state, segment.startTime = tasks.RUNNING, time.monotonic() - 10
    for event in ({"event": "start", "step": 0, "total": 1}, {"event": "windows", "done": 3, "windows": 12}):
        segment._handle(event)
    assert segment.fraction == 0.25 and segment.message.startswith("Segmentation: 3 of 12 windows · about")
    finetune = tasks.FinetuneTask(scene, [], finetuneDataset.LabelPlan(), "none", "m", None, minutes=10)
    finetune.state, finetune.startTime = tasks.RUNNING, time.monotonic() - 180
    finetune._handle({"event": "step", "step": 40, "total": 100000, "losses": {"loss": 0.5}})
    assert abs(finetune.fraction - 0.3) < 0.01
    assert finetune.message == "Fine-tuning: step 40 · loss 0.500 · 3 of 10 min"


# -- no dead end on first open -------------------------------------------------------------------------------------
def test_a_new_user_can_fine_tune_from_scratch(jobsFolder, scene, chestCases, monkeypatch):
    """The shipped catalogue is empty and a new user has no checkpoint: Fine-tune says how to go on, and 'No
    pre-training' trains from scratch (`--pretrained none`)."""
    from mimslicer_testing import loadLabelsAsSegmentation
    from MiMSlicerLib import jobs
    commands = []
    monkeypatch.setattr(jobs.EngineJob, "start", lambda job: commands.append(job.command) or job)  # no process
    loadLabelsAsSegmentation(loadVolume(chestCases[0][0], "Case 1"), chestCases[0][1], {"heart": 1, "aorta": 2})
    widget = newWidget()
    ui = widget.ui
    ui.casesListWidget.item(0).setCheckState(qt.Qt.Checked)
    assert not ui.finetuneButton.enabled and "'No pre-training'" in ui.finetuneButton.toolTip
    assert "or train with no pre-training" in ui.startFromLabel.text
    ui.fromScratchCheckBox.checked = True
    assert ui.finetuneButton.enabled, ui.finetuneButton.toolTip
    assert ui.startFromLabel.text.startswith("nothing: the network learns from your cases alone")
    assert widget.logic.getParameterNode().GetParameter("FromScratch") == "true"
    ui.finetuneButton.click()
    assert commands[-1][commands[-1].index("--pretrained") + 1] == "none"
    widget.logic.cancel()
    widget.onPoll()
    widget.cleanup()


def test_the_recipe_follows_the_encoder_of_the_model_started_from(jobsFolder, scene, chestCases, tmp_path,
                                                                  monkeypatch):
    """The default recipe is `fast` (the CPU one, small's encoder); a tiny encoder switches it to tiny, a small one
    keeps fast (the same encoder), and 'No pre-training' leaves the choice to the user."""
    from mimslicer_testing import loadLabelsAsSegmentation
    from MiMSlicerLib import jobs
    commands = []
    monkeypatch.setattr(jobs.EngineJob, "start", lambda job: commands.append(job.command) or job)
    for n, (ct, label) in enumerate(chestCases):
        loadLabelsAsSegmentation(loadVolume(ct, f"Case {n + 1}"), label, {"heart": 1, "aorta": 2})
    widget = newWidget()
    ui = widget.ui
    assert ui.presetComboBox.currentText == "fast"
    for row in range(ui.casesListWidget.count):
        ui.casesListWidget.item(row).setCheckState(qt.Qt.Checked)

    def presetOfCommand():
        ui.finetuneButton.click()
        widget.logic.cancel()
        return commands[-1][commands[-1].index("--preset") + 1]

    ui.checkpointPathLineEdit.currentPath = pretrainedFile(tmp_path)  # a tiny pre-training
    assert ui.presetComboBox.currentText == "tiny" and presetOfCommand() == "tiny"
    small = tmp_path / "small"
    small.mkdir()
    pretrainedFile(small)
    (small / "run" / "config.yaml").write_text("method: mim\npreset: small\n")
    ui.presetComboBox.currentIndex = ui.presetComboBox.findText("fast")
    ui.checkpointPathLineEdit.currentPath = str(small / "run" / "checkpoint.pt")
    assert ui.presetComboBox.currentText == "fast" and presetOfCommand() == "fast"
    widget.onPoll()
    widget.cleanup()


def test_show_uncertainty_asks_the_engine_for_it(scene, smallCt, tmp_path):
    """The panel's 'Show uncertainty' is kept in the parameter node (off by default) and puts --uncertainty on the
    `engine infer` command line (what it shows is tested with the real engine in test_slicer_segment_finetune)."""
    from MiMSlicerLib import tasks
    volume = loadVolume(smallCt, "CT")
    widget = newWidget()
    ui, node = widget.ui, widget.logic.getParameterNode()
    assert not ui.uncertaintyCheckBox.checked and node.GetParameter("Uncertainty") == "false"
    ui.uncertaintyCheckBox.checked = True
    assert node.GetParameter("Uncertainty") == "true"
    for wanted in (False, True):
        folder = tmp_path / str(wanted)
        folder.mkdir()
        command = tasks.SegmentTask(scene, volume, "model.pt", uncertainty=wanted).prepare(str(folder))
        assert ("--uncertainty" in command) == wanted
    widget.cleanup()
