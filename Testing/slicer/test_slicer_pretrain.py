"""'Pre-train on these volumes': a real `engine pretrain` on the CT volumes of a real MRML scene (tiny recipe, a few
seconds), whose encoder joins the catalogue and a fine-tune then starts from; the command follows the recipe's
encoder, grid and window, for scene volumes or a folder."""
import os

import pytest
import qt
import slicer

try:
    from __feature__ import true_property  # noqa: F401  (read widgets the PythonQt way, as the module does)
except ImportError:
    pass

from mimslicer_testing import loadLabelsAsSegmentation, loadVolume
from MiMSlicerLib import modelChoice, pretraining, tasks

from MiMSlicer import MiMSlicerLogic


def test_the_recipes_grid():
    assert pretraining.recipeGrid("fast") == ("small", [4.0, 4.0, 4.0], [-1000.0, 1000.0])
    assert pretraining.recipeGrid("tiny") == ("tiny", [3.0, 3.0, 3.0], [-1000.0, 1000.0])
    with pytest.raises(ValueError, match="no fine-tuning recipe 'fats'"):
        pretraining.recipeGrid("fats")


def _argument(command, flag):
    return [command[i + 1] for i, a in enumerate(command) if a == flag]


def test_pretrain_on_scene_volumes_then_finetune_from_the_encoder(jobsFolder, scene, smallCt, chestCases, mimFolders):
    loadVolume(smallCt, "Lung CT")
    cases = []
    for n, (ct, label) in enumerate(chestCases):
        volume = loadVolume(ct, f"Case {n + 1}")
        cases.append(loadLabelsAsSegmentation(volume, label, {"heart": 1, "aorta": 2}))
    logic = MiMSlicerLogic()
    volumes = logic.sceneCtVolumes()
    assert [v.GetName() for v in volumes] == ["Lung CT", "Case 1", "Case 2"]  # labelmaps and segmentations are not
    task = logic.startPretrain(volumes, minutes=0.1, recipe="tiny", device="cpu")
    command = task.job.command
    assert _argument(command, "--preset") == ["tiny"] and _argument(command, "--time-limit") == ["0.1"]
    assert _argument(command, "--set") == ["data.spacing=[3.0, 3.0, 3.0]", "data.hu_window=[-1000.0, 1000.0]"]
    data = _argument(command, "--data")[0]
    assert sorted(os.listdir(data)) == ["000_Lung_CT.nii", "001_Case_1.nii", "002_Case_2.nii"]
    logic.wait(timeout=300)
    assert task.state == tasks.DONE, task.message
    assert task.step > 0 and "added to the catalogue" in task.message

    entry = logic.catalogue.get(task.result["id"])
    assert entry["task"] == "pretraining" and entry["preset"] == "tiny" and entry["spacing"] == [3.0, 3.0, 3.0]
    folder = os.path.dirname(entry["file"])
    assert folder.startswith(str(mimFolders["home"])) and sorted(os.listdir(folder)) == ["checkpoint.pt", "config.yaml"]
    assert "3 CT volume(s) of the scene" in entry["description"]
    model = logic.modelFor(entry["id"], "")
    assert model.canReconstruct and model.exists and modelChoice.whyNotFinetune(
        model, logic.planLabels(logic.labelledCases()), "mine") == ""

    finetune = logic.startFinetune(logic.labelledCases(), model.path, "heart from my encoder", preset="tiny", steps=2,
                                   device="cpu", pretrainedLabel=model.name)
    assert _argument(finetune.job.command, "--pretrained") == [entry["file"]]
    logic.wait(timeout=600)
    assert finetune.state == tasks.DONE, finetune.message
    assert logic.catalogue.get(finetune.result["id"])["pretrained"] == entry["name"]


def test_pretrain_on_a_folder_writes_nothing_and_a_bad_folder_fails_cleanly(jobsFolder, scene, tmp_path):
    logic = MiMSlicerLogic()
    empty = tmp_path / "no CTs here"
    empty.mkdir()
    task = logic.startPretrain(folder=str(empty), minutes=1, recipe="fast", device="cpu")
    assert _argument(task.job.command, "--data") == [str(empty)] and _argument(task.job.command, "--preset") == ["small"]
    logic.wait(timeout=120)
    assert task.state == tasks.FAILED and str(empty) in task.message
    assert not [e for e in logic.catalogue.entries() if e["name"] == task.name]
    with pytest.raises(ValueError, match="needs CT volumes"):
        logic.startPretrain([], folder=None)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_the_panel_pretrains_shows_progress_and_offers_the_encoder(jobsFolder, scene, smallCt, chestCases, tmp_path):
    """The widget from its .ui: the button says what it will do, a click starts the job (progress, Cancel), and a
    finished run selects the new encoder, which fine-tuning then starts from."""
    from test_slicer_widget import newWidget, shot, waitUntil
    widget = newWidget()
    ui = widget.ui
    ui.pretrainCollapsibleButton.collapsed = False
    assert not ui.pretrainButton.enabled and "Load CT volumes" in ui.pretrainButton.toolTip
    loadVolume(smallCt, "Lung CT")
    for n, (ct, label) in enumerate(chestCases):
        loadLabelsAsSegmentation(loadVolume(ct, f"Case {n + 1}"), label, {"heart": 1, "aorta": 2})
    waitUntil(lambda: ui.pretrainButton.enabled, 5000)  # the scene's volumes are counted as they come
    assert "3 CT volume(s) of the scene (Lung CT, Case 1, Case 2) for 10 min" in ui.pretrainSourceLabel.text
    assert "'fast' fine-tuning recipe" in ui.pretrainSourceLabel.text

    ui.pretrainFolderLineEdit.text = str(tmp_path / "missing")
    assert not ui.pretrainButton.enabled and "There is no folder" in ui.pretrainButton.toolTip
    ui.pretrainFolderLineEdit.text = ""
    ui.pretrainMinutesSpinBox.value = 3
    ui.deviceComboBox.currentIndex = 1  # CPU
    encoders = len(widget.logic.catalogue.entries(task="pretraining"))
    ui.pretrainButton.click()
    task = widget.logic.task
    assert isinstance(task, pretraining.PretrainTask) and task.running
    assert _argument(task.job.command, "--time-limit") == ["3"] and _argument(task.job.command, "--preset") == ["small"]
    assert _argument(task.job.command, "--device") == ["cpu"]
    assert not ui.finetuneButton.enabled and not ui.pretrainButton.enabled and ui.cancelButton.enabled
    waitUntil(lambda: ui.progressLabel.text.startswith("Pre-training:"), 5000)
    shot(widget, tmp_path, "panel_5_pretraining")
    ui.cancelButton.click()
    assert task.state == tasks.CANCELLED and "nothing was added" in ui.statusLabel.text
    assert len(widget.logic.catalogue.entries(task="pretraining")) == encoders

    # a finished run, through the panel's own job machinery (a 6-second tiny run instead of the spin box's minutes)
    task = widget.runTask(lambda: widget.logic.startPretrain(widget.logic.sceneCtVolumes(), minutes=0.1, recipe="tiny",
                                                             device="cpu"))
    waitUntil(lambda: not task.running, 300000)
    assert task.state == tasks.DONE, task.message
    assert ui.modelComboBox.currentText == f"MiM pre-trained · {task.result['name']}"
    assert ui.startFromLabel.text == task.result["name"]
    ui.inputVolumeSelector.setCurrentNode(scene.GetFirstNodeByName("Lung CT"))
    assert ui.reconstructButton.enabled, ui.reconstructButton.toolTip
    ui.finetuneCollapsibleButton.collapsed = False
    for i in range(ui.casesListWidget.count):
        ui.casesListWidget.item(i).setCheckState(qt.Qt.Checked)
    ui.modelNameLineEdit.text = "heart and aorta"
    assert ui.finetuneButton.enabled, ui.finetuneButton.toolTip
    widget.cleanup()
