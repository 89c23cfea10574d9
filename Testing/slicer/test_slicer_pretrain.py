"""'Pre-train on these volumes': a real `engine pretrain` on the CT volumes of a real MRML scene (tiny recipe, a few
seconds), whose encoder joins the catalogue and a fine-tune then starts from; the command follows the recipe's
encoder, grid and window, for scene volumes or a folder."""
import os

import pytest
import slicer

from mimslicer_testing import loadLabelsAsSegmentation, loadVolume
from MiMSlicer import MiMSlicerLogic
from MiMSlicerLib import modelChoice, pretraining, tasks


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
