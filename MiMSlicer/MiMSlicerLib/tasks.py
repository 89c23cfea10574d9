"""The three long jobs of the panel, from scene nodes to the engine and back.

A Task writes its inputs to its own temporary folder, runs one engine command (EngineJob), follows its progress
events, and when the engine ends loads the results inside a SceneTransaction: all of them or none. A failed,
cancelled or unloadable run leaves the scene as it was (live nodes such as the training plot are removed too),
and its temporary folder is always removed. Callers poll() from a QTimer (widget) or call wait() (scripts)."""
import abc
import json
import logging
import os
import shutil
import time

from . import finetuneDataset, jobs, paths, reconstruction, segmentationImport, sliceViews, uncertainty, volumeIO
from .sceneTransaction import SceneTransaction
from .trainingPlot import TrainingPlot

log = logging.getLogger("MiMSlicer")

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
# What a fine-tuned model keeps of its run folder: the model (weights, labels, grid: all that `engine infer` reads)
# and config.yaml (a few lines: the settings it was trained with, and how the panel tells what a checkpoint is)
MODEL_FILES = ("model.pt", "config.yaml")


def keepRun(tempDir, catalogue, name, files, entryFor):
    """Move `files` of a job's engine run (`<tempDir>/run`; the first is the one that must be there) into
    models/<id>/ and register `entryFor(id, folder)` in the catalogue; nothing is left behind if that fails."""
    run = os.path.join(tempDir, "run")
    if not os.path.isfile(os.path.join(run, files[0])):
        raise RuntimeError(f"the engine did not write run/{files[0]}")
    modelID = catalogue.uniqueID(name)
    destination = os.path.join(paths.modelsDir(), modelID)
    os.makedirs(destination, exist_ok=True)
    for file in files:
        shutil.move(os.path.join(run, file), os.path.join(destination, file))
    try:
        return catalogue.register(entryFor(modelID, destination))
    except Exception:
        shutil.rmtree(destination, ignore_errors=True)
        raise


class Task(abc.ABC):
    kind = "job"
    title = "Engine job"
    usesEngine = True  # runs `python -m engine`: needs the engine's packages

    def __init__(self, scene, device="auto"):
        self.scene = scene
        self.device = device
        self.job = None
        self.tempDir = None
        self.state = "new"
        self.message = ""
        self.step, self.total = 0, 0
        self.result = None
        self.logLines = []
        self.startTime = None
        self.lastLoss = None

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self):
        self.tempDir = jobs.makeJobFolder(self.kind)
        self.startTime = time.monotonic()
        try:
            command = self.prepare(self.tempDir)
            self.job = jobs.EngineJob(command, tempDir=self.tempDir).start()
        except Exception as err:
            self.discard()
            shutil.rmtree(self.tempDir, ignore_errors=True)
            self._end(FAILED, f"{self.title} could not start: {err}")
            raise
        self.state = RUNNING
        self.message = f"{self.title}: starting the engine…"
        return self

    def poll(self):
        """Handle new engine events; when the engine has ended, load or discard the results. Never blocks long."""
        if self.job is None or self.state != RUNNING:
            return []
        events = self.job.poll()
        for event in events:
            self._handle(event)
        if self.job.finished:
            self._complete()
        return events

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == RUNNING:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"{self.title} did not finish within {timeout} s")
            time.sleep(0.05)
        return self.state

    def cancel(self):
        if self.state != RUNNING:
            return
        self.job.cancel()
        self._complete()

    @property
    def running(self):
        return self.state == RUNNING

    @property
    def fraction(self):
        return min(1.0, self.step / self.total) if self.total else 0.0

    # -- hooks for subclasses --------------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, folder):
        """Write inputs into `folder`; return the engine command."""

    def onEvent(self, event):
        pass

    def writeInput(self, volumeNode, path):
        """The volume as the engine's input file; one sent through its non-linear transform is said in the log."""
        if volumeIO.hasNonLinearTransform(volumeNode):
            self.logLines.append(f"{volumeNode.GetName()}: sent as its non-linear transform places it (Slicer's "
                                 "DICOM acquisition-geometry regularisation), resampled on its own grid")
        return volumeIO.writeVolume(volumeNode, path)

    @abc.abstractmethod
    def load(self):
        """Create the result nodes (called inside a SceneTransaction: all or none); return the result."""

    def discard(self):
        """Remove nodes made before the end (live plots)."""

    def doneMessage(self):
        return f"{self.title} finished."

    def progressText(self):
        if not self.total:
            return f"{self.title}: working…"
        parts = [f"{self.title}: step {self.step} of {self.total}"]
        if isinstance(self.lastLoss, (int, float)):
            parts.append(f"loss {self.lastLoss:.3f}")
        return " · ".join(parts + self._timeLeft(self.step, self.total))

    def _timeLeft(self, done, total):
        """['about N min left'] from the pace so far, or [] before the first unit of work or after the last."""
        if not 0 < done < total or self.startTime is None:
            return []
        left = (time.monotonic() - self.startTime) / done * (total - done)
        return [f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"]

    # -- internals -------------------------------------------------------------------------------------------
    def _handle(self, event):
        kind = event.get("event")
        if kind in ("start", "step", "checkpoint", "done"):
            self.total = int(event.get("total") or self.total or 0)
            self.step = int(event.get("step") or self.step or 0)
            losses = event.get("losses") or {}
            self.lastLoss = losses.get("loss", self.lastLoss)
            self.message = self.progressText()
        message = event.get("message")
        if kind in ("log", "error") and message and message != "error: " + (self.logLines or [""])[-1]:
            self.logLines.append(message)  # (the engine's stderr repeats its JSON error as "error: ...")
        self.onEvent(event)

    def _complete(self):
        if self.job.cancelled:
            self.discard()
            self._end(CANCELLED, f"{self.title} cancelled; nothing was added to the scene.")
        elif self.job.returncode != 0:
            self.discard()
            self._end(FAILED, f"{self.title} failed: {self.job.errorMessage}")
        else:
            try:
                with SceneTransaction(self.scene):
                    self.result = self.load()
                self._end(DONE, self.doneMessage())
            except Exception as err:
                log.exception("MiMSlicer: loading results failed")
                self.discard()
                self.result = None
                self._end(FAILED, f"{self.title}: the engine finished but its results could not be loaded: {err}")
        self.job.removeTempDir()

    def _end(self, state, message):
        self.state, self.message = state, message
        if state == DONE and self.total:
            self.step = self.total
        (log.info if state == DONE else log.warning)("MiMSlicer: %s", message)


class ReconstructTask(Task):
    kind = "reconstruct"
    title = "Reconstruction"

    def __init__(self, scene, volumeNode, checkpoint, seed=0, center=None, device="auto"):
        super().__init__(scene, device)
        self.volumeNode, self.checkpoint, self.seed, self.center = volumeNode, checkpoint, seed, center

    def prepare(self, folder):
        image = self.writeInput(self.volumeNode, os.path.join(folder, "input.nii"))
        args = ["--checkpoint", self.checkpoint, "--image", image, "--out", os.path.join(folder, "out"),
                "--seed", int(self.seed), "--device", self.device]
        if self.center is not None:
            args += ["--center", *[f"{c:.3f}" for c in self.center]]
        return jobs.engineCommand("reconstruct", *args)

    def load(self):
        result = reconstruction.loadReconstruction(self.scene, os.path.join(self.tempDir, "out"), self.volumeNode)
        first = result.levels[0].views[0]
        result.show(self.scene, first.level.level, first.index, "reconstruction")
        return result

    def doneMessage(self):
        return f"Reconstruction loaded: {self.result.summary()}."


class SegmentTask(Task):
    kind = "segment"
    title = "Segmentation"

    def __init__(self, scene, volumeNode, model, labels=None, device="auto", name=None, uncertainty=False):
        super().__init__(scene, device)
        self.volumeNode, self.model, self.labels = volumeNode, model, labels
        self.name = name or f"{volumeNode.GetName()} MiM segmentation"
        self.windowsDone, self.windows = 0, 0
        self.uncertainty = uncertainty  # also show where the model is unsure (`engine infer --uncertainty`)
        self.uncertaintyNode = None

    def onEvent(self, event):
        """`engine infer` reports the sliding window's progress inside the volume ('windows' events)."""
        if event.get("event") == "windows":
            self.windowsDone, self.windows = int(event.get("done") or 0), int(event.get("windows") or 0)
            self.message = self.progressText()

    @property
    def fraction(self):
        if self.windows and self.state == RUNNING:
            return min(1.0, self.windowsDone / self.windows)
        return super().fraction

    def progressText(self):
        if not self.windows:
            return super().progressText()
        parts = [f"{self.title}: {self.windowsDone} of {self.windows} windows"]
        return " · ".join(parts + self._timeLeft(self.windowsDone, self.windows))

    def prepare(self, folder):
        image = self.writeInput(self.volumeNode, os.path.join(folder, "input.nii"))
        extra = ["--uncertainty"] if self.uncertainty else []
        return jobs.engineCommand("infer", "--checkpoint", self.model, "--input", image,
                                  "--output", os.path.join(folder, "segmentation.nii.gz"), "--device", self.device,
                                  *extra)

    def load(self):
        labels = self._labels()
        node = segmentationImport.importLabelmap(self.scene, os.path.join(self.tempDir, "segmentation.nii.gz"),
                                                 self.volumeNode, labels, self.name)
        node.SetAttribute(finetuneDataset.MODEL_OUTPUT_ATTRIBUTE, os.path.basename(os.path.dirname(self.model)) or "model")
        sliceViews.setLayers(self.scene, self.volumeNode)  # the CT behind its new segments
        if self.uncertainty:
            self.uncertaintyNode = uncertainty.show(
                self.scene, uncertainty.fileFor(os.path.join(self.tempDir, "segmentation.nii.gz")), self.volumeNode,
                f"{self.volumeNode.GetName()} MiM uncertainty")
        return node

    def _labels(self):
        sidecars = [os.path.join(self.tempDir, n) for n in ("segmentation.json", "segmentation.nii.gz.json")]
        sidecar = next((p for p in sidecars if os.path.exists(p)), None)
        if sidecar:
            with open(sidecar, encoding="utf-8") as f:
                labels = json.load(f).get("labels", {})
        else:
            labels = dict(self.labels or {})
        labels = {name: int(value) for name, value in labels.items() if int(value) > 0}
        if not labels:
            raise RuntimeError("the engine did not say which label value is which structure (no labels in "
                               "segmentation.json and none in the catalogue)")
        return labels

    def doneMessage(self):
        names = [n for n, _ in segmentationImport.segmentNamesAndColours(self.result)]
        return f"Segmented {self.volumeNode.GetName()}: {', '.join(names)}."


class TimedTask(Task):
    """A training job with a time budget (`--time-limit`, self.minutes; None or 0: the steps decide): its progress
    is steps done or time used, whichever is further."""
    minutes = None

    @property
    def fraction(self):
        if not self.minutes or self.startTime is None or self.state != RUNNING:
            return super().fraction
        return max(super().fraction, min(1.0, (time.monotonic() - self.startTime) / (60 * self.minutes)))

    def progressText(self):
        if not self.minutes or self.startTime is None:
            return super().progressText()
        parts = [f"{self.title}: step {self.step}"] if self.step else [f"{self.title}: starting"]
        if isinstance(self.lastLoss, (int, float)):
            parts.append(f"loss {self.lastLoss:.3f}")
        used = (time.monotonic() - self.startTime) / 60
        return " · ".join(parts + [f"{min(used, self.minutes):.0f} of {self.minutes:g} min"])


class FinetuneTask(TimedTask):
    kind = "finetune"
    title = "Fine-tuning"

    def __init__(self, scene, cases, plan, pretrained, modelName, catalogue, preset="fast", steps=None,
                 device="auto", pretrainedLabel=None, minutes=None):
        super().__init__(scene, device)
        self.cases, self.plan, self.pretrained = cases, plan, pretrained or "none"
        self.modelName, self.catalogue, self.preset, self.steps = modelName, catalogue, preset, steps
        self.minutes = minutes  # train for this long (`--time-limit`; None or 0: as many steps as the recipe says)
        self.pretrainedLabel = pretrainedLabel or self.pretrained
        self.plot = None
        self.lastDice = None

    def prepare(self, folder):
        dataset = finetuneDataset.exportDataset(self.scene, self.cases, self.plan, os.path.join(folder, "dataset"))
        self.plot = TrainingPlot(self.scene, f"MiM fine-tune · {self.modelName}")
        args = ["--task", "segmentation", "--data", dataset, "--pretrained", self.pretrained, "--preset", self.preset,
                "--out", os.path.join(folder, "run"), "--device", self.device]
        if self.minutes:  # the steps that fit in the time; "at most N steps" applies without a time limit
            args += ["--time-limit", int(self.minutes)]
        elif self.steps:
            args += ["--steps", int(self.steps)]
        return jobs.engineCommand("finetune", *args)

    def onEvent(self, event):
        if self.plot is not None:
            self.plot.addEvent(event)
        metrics = event.get("metrics") or {}
        if "val_mean_dice" in metrics:
            self.lastDice = float(metrics["val_mean_dice"])
        best = event.get("best") if event.get("event") == "done" else None
        if isinstance(best, dict) and isinstance(best.get("score"), (int, float)):
            self.lastDice = float(best["score"])  # model.pt holds the best validated weights

    def load(self):
        # what segmenting needs; the training state (checkpoint.pt) and logs go
        return keepRun(self.tempDir, self.catalogue, self.modelName, MODEL_FILES, self.catalogueEntry)

    def catalogueEntry(self, modelID, destination):
        entry = {"id": modelID, "name": self.modelName, "task": "segmentation", "labels": dict(self.plan.labels),
                 "spacing": _runSpacing(destination), "preset": self.preset,
                 "file": os.path.join(destination, "model.pt"), "pretrained": self.pretrainedLabel,
                 "trainingCases": len(self.cases),
                 "description": f"Fine-tuned in Slicer on {len(self.cases)} case(s) " +
                                ("from scratch." if self.pretrained == "none" else f"from {self.pretrainedLabel}.")}
        if self.lastDice is not None and self.lastDice == self.lastDice:
            entry["validationDice"] = round(self.lastDice, 4)
        return entry

    def discard(self):
        if self.plot is not None:
            for node in self.plot.nodes():
                if self.scene.IsNodePresent(node):
                    self.scene.RemoveNode(node)
            self.plot = None

    def doneMessage(self):
        dice = f", validation Dice {self.lastDice:.3f}" if self.lastDice is not None else ""
        return f"Fine-tuned model '{self.result['name']}' added to the catalogue{dice}."


def _runSpacing(runFolder):
    """Voxel spacing the run used: its config.yaml, which the engine writes with every run (PyYAML is one of the
    engine's own dependencies, so it is there whenever a run could be made)."""
    import yaml
    with open(os.path.join(runFolder, "config.yaml"), encoding="utf-8") as f:
        spacing = yaml.safe_load(f)["data"]["spacing"]
    return [float(s) for s in spacing]


DOWNLOAD_SCRIPT = r"""
import hashlib, json, os, shutil, sys, urllib.request
url, target, partial, expected = sys.argv[1:5]
def emit(**event):
    print(json.dumps(dict(stage="download", **event)), flush=True)
try:
    digest, done = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        emit(event="start", step=0, total=total)
        for block in iter(lambda: response.read(1 << 20), b""):
            out.write(block)
            digest.update(block)
            done += len(block)
            emit(event="step", step=done, total=total)
    if expected and digest.hexdigest() != expected:
        raise ValueError(f"the file from {url} is not the expected one (sha256 {digest.hexdigest()[:12]}...)")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(partial, target)
    emit(event="done", step=done, total=total, path=target)
except Exception as err:
    emit(event="error", message=str(err))
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


class DownloadTask(Task):
    """Fetch a catalogue model given by URL into the user's download cache (checksum-verified when the catalogue
    has one). The partial file lives in the job's temporary folder, so Cancel leaves nothing behind."""
    kind = "download"
    title = "Model download"
    usesEngine = False  # the Python standard library only

    def __init__(self, scene, url, target, sha256=""):
        super().__init__(scene)
        self.url, self.target, self.sha256 = url, target, sha256 or ""

    def prepare(self, folder):
        return [paths.enginePython(), "-c", DOWNLOAD_SCRIPT, self.url, self.target, os.path.join(folder, "partial"),
                self.sha256]

    def load(self):
        if not os.path.isfile(self.target):
            raise RuntimeError(f"{self.target} was not written")
        return self.target

    def doneMessage(self):
        return f"Downloaded the model to {self.target}."

    def progressText(self):
        done = f"{self.step / 1e6:.1f} MB"
        return f"{self.title}: {done} of {self.total / 1e6:.1f} MB" if self.total else f"{self.title}: {done}"
