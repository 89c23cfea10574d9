"""What the module's Logic does, without Qt: the model catalogue, the engine packages, the one job that may run at
a time and the last reconstruction. MiMSlicerLogic (MiMSlicer.py) is this plus the parameter node."""
import time

import slicer

from . import finetuneDataset, modelChoice, paths, pretraining, reconstruction, tasks, uncertainty
from .catalogue import ModelCatalogue
from .dependencies import Dependencies

FILE_CHOICE = "file"


class JobRefused(RuntimeError):
    """A job was not started: another one runs, packages are being installed, or the engine lacks packages."""


class Session:
    def __init__(self):
        self.catalogue = ModelCatalogue()
        self.dependencies = Dependencies()
        self.task = None
        self.reconstruction = None
        self.installing = False

    # -- models and cases ------------------------------------------------------------------------------------
    def catalogueEntries(self):
        return self.catalogue.entries()

    def modelFor(self, choice, checkpointPath):
        """The catalogue entry `choice`, or the checkpoint file when choice is FILE_CHOICE (or unknown)."""
        if choice and choice != FILE_CHOICE:
            try:
                entry = self.catalogue.get(choice)
                return modelChoice.SelectedModel(entry, self.catalogue.localFile(entry))
            except (KeyError, ValueError):
                pass
        return modelChoice.SelectedModel(None, checkpointPath, isFile=True)

    def labelledCases(self, manualPairs=()):
        """Cases found in the scene (segmentations with their reference CT) plus pairs the user added by hand."""
        scene = slicer.mrmlScene
        cases = finetuneDataset.findLabelledCases(scene)
        known = {c.key for c in cases}
        for volumeID, segmentationID in manualPairs:
            volume, segmentation = scene.GetNodeByID(volumeID), scene.GetNodeByID(segmentationID)
            if volume is not None and segmentation is not None and f"{volumeID}|{segmentationID}" not in known:
                cases.append(finetuneDataset.LabelledCase(volume, segmentation))
        return cases

    def planLabels(self, cases):
        return finetuneDataset.planLabels(cases)

    def suggestModelName(self, cases):
        names = list(self.planLabels(cases).labels)
        return " + ".join(names[:3]) + (" …" if len(names) > 3 else "")

    # -- jobs ------------------------------------------------------------------------------------------------
    @property
    def jobRunning(self):
        return self.task is not None and self.task.running

    @property
    def busy(self):
        """A job runs, or packages are being installed: nothing else may start."""
        return self.jobRunning or self.installing

    def installDependencies(self, confirm):
        """Install the missing engine packages (asks through `confirm` first); busy meanwhile, since Slicer's
        pip_install keeps the GUI alive while it runs, so the panel's buttons could be clicked."""
        if self.busy:
            raise JobRefused(self._busyMessage())
        self.installing = True
        try:
            return self.dependencies.install(confirm)
        finally:
            self.installing = False

    def startDownload(self, entry):
        return self._start(tasks.DownloadTask(slicer.mrmlScene, entry["url"], self.catalogue.localFile(entry),
                                              entry.get("sha256", "")))

    def startReconstruction(self, volume, checkpoint, seed=0, center=None, device="auto"):
        return self._start(tasks.ReconstructTask(slicer.mrmlScene, volume, checkpoint, seed=seed, center=center,
                                                 device=device))

    def startSegmentation(self, volume, model, labels=None, device="auto", uncertainty=False):
        """Segment `volume`; `uncertainty`: also show where the model is unsure, over the CT."""
        return self._start(tasks.SegmentTask(slicer.mrmlScene, volume, model, labels=labels, device=device,
                                             uncertainty=uncertainty))

    def startFinetune(self, cases, pretrained, modelName, preset="fast", steps=None, device="auto", pretrainedLabel=None,
                      minutes=None):
        """Fine-tune on `cases`; `minutes`: train for that long (engine `--time-limit`), `steps`: that many
        when there is no time limit (None or 0: the engine's recipe decides)."""
        return self._start(tasks.FinetuneTask(slicer.mrmlScene, cases, self.planLabels(cases), pretrained,
                                              modelName.strip(), self.catalogue, preset=preset, steps=steps,
                                              device=device, pretrainedLabel=pretrainedLabel, minutes=minutes))

    def startPretrain(self, volumes=(), folder=None, minutes=10, recipe="fast", device="auto", name=None):
        """MiM pre-training on `volumes` (scene nodes) or the CT files in `folder`, for `minutes`, on the grid of the
        fine-tuning recipe `recipe`; the encoder joins the catalogue when it ends."""
        return self._start(pretraining.PretrainTask(slicer.mrmlScene, self.catalogue, volumes=volumes, folder=folder,
                                                    minutes=minutes, recipe=recipe, device=device, name=name))

    def sceneCtVolumes(self):
        """The scene's CT volumes to pre-train on: scalar volumes shown to the user (not labelmaps, not the nodes of
        a reconstruction, which are hidden from editors, nor an uncertainty map)."""
        scene, found = slicer.mrmlScene, []
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            made = node.GetAttribute(uncertainty.ATTRIBUTE) or node.GetAttribute(reconstruction.ATTRIBUTE)
            if not node.IsA("vtkMRMLLabelMapVolumeNode") and not node.GetHideFromEditors() and node.GetImageData() \
                    and not made:
                found.append(node)
        return found

    def _start(self, task):
        if self.busy:
            raise JobRefused(self._busyMessage())
        if task.usesEngine and paths.engineRunsInSlicerPython():
            problem = self.dependencies.whyEngineCannotRun()
            if problem:
                raise JobRefused(problem)
        self.task = task
        return task.start()

    def _busyMessage(self):
        if self.installing:
            return "The engine packages are being installed; wait until that ends."
        return "Another MiMSlicer job is running; wait for it or cancel it."

    def poll(self):
        """New events of the current job (the widget calls this from its QTimer)."""
        if not self.jobRunning:
            return []
        events = self.task.poll()
        if self.task.state == tasks.DONE and isinstance(self.task, tasks.ReconstructTask):
            self.reconstruction = self.task.result
        return events

    def wait(self, timeout=None):
        """Run the current job to its end (scripts and tests), with the same effects as polling it from the GUI."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.jobRunning:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"{self.task.title} did not finish within {timeout} s")
            time.sleep(0.05)
        return self.task

    def cancel(self):
        if self.jobRunning:
            self.task.cancel()

    def removeEarlierReconstructions(self):
        """Delete every reconstruction run in the scene but the one shown; returns how many were deleted."""
        return reconstruction.removeRuns(slicer.mrmlScene, keep=self.reconstruction)

    def showReconstructionView(self, level, viewIndex, layer="reconstruction"):
        if self.reconstruction is None:
            return None
        return self.reconstruction.show(slicer.mrmlScene, level, viewIndex, layer)
