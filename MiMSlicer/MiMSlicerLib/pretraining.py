"""Pre-train a MiM encoder on the user's CT volumes within a time budget, and add it to the model catalogue, where
Reconstruct and Fine-tune can start from it.

The volumes are the CT volumes of the scene (written to the job's temporary folder, as every job writes its input)
or a folder of CT files and DICOM series the user picks. The run follows the fine-tuning recipe it is meant for, as
the engine's demo and bench do: its encoder size (the recipe's `encoder_preset`: `fast` -> `small`) and the recipe's
grid and window (`fast`: 4 mm, [-1000, 1000] HU), so the fine-tuning, which takes both from the checkpoint, sees the
CT as the encoder did."""
import datetime
import os
import re

from . import paths, tasks
from .jobs import engineCommand

# What a pre-trained encoder keeps of its run: the checkpoint (`engine pretrain`'s, what fine-tuning and
# reconstruction read) and config.yaml (its settings: how the panel tells what a checkpoint is)
ENCODER_FILES = ("checkpoint.pt", "config.yaml")


def recipeGrid(recipe):
    """(pre-training preset, spacing, HU window) that suit the fine-tuning recipe `recipe` (engine/configs/finetune/
    <recipe>.yaml). PyYAML is one of the engine's own packages: it is there whenever a job can run."""
    import yaml
    path = os.path.join(paths.engineRoot(), "engine", "configs", "finetune", f"{recipe}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"no fine-tuning recipe '{recipe}' ({path})")
    with open(path, encoding="utf-8") as f:
        tree = yaml.safe_load(f)
    data = tree.get("data", {})
    return tree.get("encoder_preset", recipe), [float(s) for s in data["spacing"]], [float(w) for w in
                                                                                      data["hu_window"]]


def safeFileName(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"


class PretrainTask(tasks.TimedTask):
    kind = "pretrain"
    title = "Pre-training"

    def __init__(self, scene, catalogue, volumes=(), folder=None, minutes=10, recipe="fast", device="auto",
                 name=None):
        super().__init__(scene, device)
        if not volumes and not folder:
            raise ValueError("Pre-training needs CT volumes: load some, or choose a folder of CT files.")
        self.volumes, self.folder, self.minutes, self.recipe = list(volumes), folder, minutes, recipe
        self.catalogue = catalogue
        self.preset, self.spacing, self.window = recipeGrid(recipe)
        self.name = name or self.defaultName()

    def source(self):
        if self.folder:
            return f"the CT volumes in {self.folder}"
        return f"{len(self.volumes)} CT volume(s) of the scene ({', '.join(v.GetName() for v in self.volumes)})"

    def defaultName(self):
        what = os.path.basename(os.path.normpath(self.folder)) if self.folder else f"{len(self.volumes)} scene CTs"
        return f"MiM {self.preset} · {what} · {datetime.datetime.now():%Y-%m-%d %H:%M}"

    def prepare(self, folder):
        data = self.folder
        if not data:
            data = os.path.join(folder, "data")
            os.makedirs(data)
            for i, volume in enumerate(self.volumes):
                self.writeInput(volume, os.path.join(data, f"{i:03d}_{safeFileName(volume.GetName())}.nii"))
        spacing, window = ", ".join(map(str, self.spacing)), ", ".join(map(str, self.window))
        return engineCommand("pretrain", "--data", data, "--method", "mim", "--preset", self.preset,
                             "--time-limit", f"{self.minutes:g}", "--out", os.path.join(folder, "run"),
                             "--device", self.device, "--set", f"data.spacing=[{spacing}]",
                             "--set", f"data.hu_window=[{window}]")

    def load(self):
        return tasks.keepRun(self.tempDir, self.catalogue, self.name, ENCODER_FILES, self.catalogueEntry)

    def catalogueEntry(self, modelID, destination):
        return {"id": modelID, "name": self.name, "task": "pretraining", "method": "mim", "preset": self.preset,
                "spacing": self.spacing, "file": os.path.join(destination, "checkpoint.pt"),
                "description": f"MiM pre-trained in Slicer for {self.minutes:g} min ({self.step} steps) on "
                               f"{self.source()}, at {self.spacing[0]:g} mm for the '{self.recipe}' recipe."}

    def doneMessage(self):
        return (f"Pre-trained encoder '{self.result['name']}' added to the catalogue ({self.step} steps): "
                "fine-tune or reconstruct from it.")
