"""Sample CTs in Slicer's Sample Data module (category "MiMSlicer"): the real CTs the engine's demo fetches,
TotalSegmentator 2.18.0's test volumes from its source distribution on PyPI (Apache-2.0). One click loads a case.

The files are fetched by the engine itself (`python -m engine sample-data`, engine/data/samples.py) as a background
job into the user's download folder (paths.samplesDir), once; later clicks load them at once. The abdomen case comes
with the structures of its 117-class label map that have a standard name and code (the engine writes them as
abdomen_structures.nii.gz + .json), so its segments are named, coloured and coded as the module's models' are."""
import json
import logging
import os

from . import hierarchy, paths, segmentationImport, sliceViews, tasks, volumeIO
from .jobs import engineCommand
from .sceneTransaction import SceneTransaction

log = logging.getLogger("MiMSlicer")

CATEGORY = "MiMSlicer"
SOURCE_URL = "https://pypi.org/project/TotalSegmentator/2.18.0/"
SOURCE = "TotalSegmentator 2.18.0 source distribution on PyPI (tests/reference_files)"
LICENCE = "Apache-2.0 (the TotalSegmentator package; its LICENSE is kept beside the files)"
PROVENANCE_FILE = "provenance.json"  # written last by the engine's fetch: its presence means the folder is whole


class Sample:
    """One button of the Sample Data module: a CT file of the fetched folder, and its labels' JSON (or None)."""

    def __init__(self, title, image, nodeName, labels=None):
        self.title, self.image, self.nodeName, self.labels = title, image, nodeName, labels

    @property
    def description(self):
        what = "CT with its organs (TotalSegmentator's pseudo-labels, the named ones)" if self.labels else "CT"
        return f"{what}, from the {SOURCE}; licence {LICENCE}"


SAMPLES = (
    Sample("MiM abdomen CT + organs (TotalSegmentator sample, Apache-2.0)", "abdomen_ct.nii.gz", "MiM abdomen CT",
           labels="abdomen_structures.json"),
    Sample("MiM chest CT (TotalSegmentator sample, Apache-2.0)", "chest_ct.nii.gz", "MiM chest CT"),
)


def register(sampleDataLogic, downloader):
    """Add every sample to the Sample Data module (SampleData.SampleDataLogic); `downloader(source)` runs on a click.
    The button shows the sample name (Slicer sets sampleDescription to it), so the name says where it comes from."""
    for sample in SAMPLES:
        sampleDataLogic.registerCustomSampleDataSource(
            category=CATEGORY, sampleName=sample.title, uris=SOURCE_URL, fileNames=sample.image,
            nodeNames=sample.nodeName, customDownloader=downloader)


def sampleNamed(title):
    for sample in SAMPLES:
        if sample.title == title:
            return sample
    raise KeyError(f"no MiMSlicer sample called '{title}'")


def isFetched(folder):
    return os.path.isfile(os.path.join(folder, PROVENANCE_FILE)) and all(
        os.path.isfile(os.path.join(folder, name)) for s in SAMPLES for name in [s.image] + ([s.labels] if s.labels
                                                                                              else []))


def loadSample(scene, folder, sample):
    """The sample's CT (and its organs as a segmentation on it) into the scene, all or nothing; returns the nodes."""
    with SceneTransaction(scene):
        volume = volumeIO.readVolume(scene, os.path.join(folder, sample.image), sample.nodeName)
        hierarchy.itemFor(scene, volume)
        volume.SetAttribute("MiMSlicer.source", sample.description)
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(400, 40)  # soft tissue
        nodes = [volume]
        if sample.labels:
            with open(os.path.join(folder, sample.labels), encoding="utf-8") as f:
                info = json.load(f)
            segmentation = segmentationImport.importLabelmap(scene, os.path.join(folder, info["label"]), volume,
                                                             info["labels"], f"{sample.nodeName} organs")
            segmentation.SetAttribute("MiMSlicer.source", f"{info['label_kind']}; {sample.description}")
            nodes.append(segmentation)
        sliceViews.setLayers(scene, volume)
    return nodes


class FetchSamplesTask(tasks.Task):
    """`engine sample-data` into the samples folder, then load one sample. Needs only Slicer's own Python packages
    (numpy, SimpleITK) and pip, not the engine's torch or MONAI."""
    kind = "samples"
    title = "Sample data download"
    usesEngine = False

    def __init__(self, scene, folder, sample):
        super().__init__(scene)
        self.folder, self.sample = folder, sample

    def prepare(self, folder):
        return engineCommand("sample-data", "--out", self.folder)

    def load(self):
        return loadSample(self.scene, self.folder, self.sample)

    def doneMessage(self):
        return f"Loaded {self.sample.nodeName} ({SOURCE}, {LICENCE.split(' ')[0]})."


class Downloader:
    """The Sample Data buttons' customDownloader: loads a fetched sample at once, or starts the fetch as a background
    job polled by a QTimer (Slicer stays responsive) and loads the sample when it ends. One fetch at a time."""

    def __init__(self, scene=None, reportError=None, reportStatus=None):
        self._scene, self.reportError, self.reportStatus = scene, reportError, reportStatus
        self.task, self._timer = None, None

    def _status(self, text):
        """A line where the user is looking (Slicer's status bar): the first click returns before anything loads."""
        log.info("MiMSlicer: %s", text)
        if self.reportStatus is not None:
            self.reportStatus(text)

    @property
    def scene(self):
        import slicer
        return self._scene or slicer.mrmlScene

    def __call__(self, source):
        sample = sampleNamed(source.sampleName)
        folder = paths.samplesDir()
        if isFetched(folder):
            return loadSample(self.scene, folder, sample)
        if self.task is not None and self.task.running:
            self._status("the sample CTs are still being downloaded; the case loads when they are here")
            return []
        self.task = FetchSamplesTask(self.scene, folder, sample).start()
        self._status(f"downloading the sample CTs ({SOURCE}, about 38 MB) into {folder}; {sample.nodeName} loads "
                     "when they are here")
        import qt
        self._timer = qt.QTimer()
        self._timer.interval = 200
        self._timer.timeout.connect(self.poll)
        self._timer.start()
        return []

    def poll(self):
        self.task.poll()
        if self.task.running:
            return
        self._timer.stop()
        if self.task.state == tasks.FAILED:
            self._status("the sample CTs could not be downloaded")
            if self.reportError is not None:
                self.reportError(self.task.message)
        elif self.task.state == tasks.DONE:
            self._status(self.task.doneMessage())
