"""The sample CTs in Slicer's Sample Data module: MiMSlicer registers them once Slicer has started (startupCompleted),
and a click loads a labelled case into the real MRML scene: at once when the engine has fetched them, else after the
engine's fetch (`engine sample-data`, run as a background job). The files are TotalSegmentator 2.18.0's test
volumes, fetched by pip from the package index (its cache); without it these tests skip, saying why."""
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import qt
import SampleData
import slicer
from mimslicer_testing import REPO
from MiMSlicerLib import paths, sampleData, tasks, terminology


@pytest.fixture(scope="session")
def fetchedSamples(tmp_path_factory):
    """The engine's own fetch, once per session (pip download of the sdist, from pip's cache when it has it)."""
    folder = tmp_path_factory.mktemp("samples") / "totalsegmentator"
    done = subprocess.run([sys.executable, "-m", "engine", "sample-data", "--out", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip("the sample CTs could not be fetched (TotalSegmentator 2.18.0 sdist from the package index): "
                    + (done.stderr.strip().splitlines() or ["no message"])[-1])
    return folder


@pytest.fixture
def registered():
    """The module's startupCompleted slot run against the Sample Data stand-in, as Slicer runs it after start-up."""
    import MiMSlicer
    if hasattr(slicer.modules, "sampleDataSources"):
        del slicer.modules.sampleDataSources
    slicer.app.connections.clear()
    MiMSlicer.MiMSlicer(types.SimpleNamespace())
    slots = slicer.app.connections["startupCompleted()"]
    assert slots == [MiMSlicer.registerSampleData]
    for slot in slots:
        slot()
    return SampleData.SampleDataLogic.sampleDataSourcesByCategory(sampleData.CATEGORY)


def test_registration_gives_one_button_per_sample_with_its_provenance(registered):
    assert [s.sampleName for s in registered] == [s.title for s in sampleData.SAMPLES]
    for source, sample in zip(registered, sampleData.SAMPLES):
        assert source.sampleDescription == source.sampleName  # the button's text
        assert "TotalSegmentator" in source.sampleName and "Apache-2.0" in source.sampleName
        assert source.uris == ["https://pypi.org/project/TotalSegmentator/2.18.0/"]
        assert source.fileNames == [sample.image] and source.nodeNames == [sample.nodeName]
        assert isinstance(source.customDownloader, sampleData.Downloader)
        assert "PyPI" in sample.description and "Apache-2.0" in sample.description
    assert [bool(s.labels) for s in sampleData.SAMPLES] == [True, False]  # the abdomen case comes with its organs


def _checkAbdomenCase(scene, nodes, folder):
    volume, segmentation = nodes
    assert scene.IsNodePresent(volume) and scene.IsNodePresent(segmentation)
    assert volume.GetName() == "MiM abdomen CT" and volume.GetImageData().GetDimensions() == (122, 101, 30)
    assert "TotalSegmentator" in volume.GetAttribute("MiMSlicer.source")
    info = json.loads((folder / "abdomen_structures.json").read_text())
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert names == ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "pancreas", "aorta",
                     "spinal cord"] == list(info["labels"])
    provenance = json.loads((folder / "provenance.json").read_text())
    original = np.asarray(nib.load(str(folder / "abdomen_label.nii.gz")).dataobj)
    for index, name in enumerate(names):
        segmentID = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
        segment = segmentation.GetSegmentation().GetSegment(segmentID)
        assert terminology.terminologyEntry(name) and segment.GetTerminology() == terminology.terminologyEntry(name)
        assert np.allclose(segment.GetColor(), terminology.colourFor(name, index))
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, volume).sum()
        value = provenance["labels"][info["totalsegmentator_names"][name]]
        assert voxels == (original == value).sum() > 0, name  # every voxel of the structure, and only those
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0


def test_a_click_loads_the_fetched_abdomen_case_with_named_organs(scene, registered, fetchedSamples):
    shutil.rmtree(paths.samplesDir(), ignore_errors=True)
    shutil.copytree(fetchedSamples, paths.samplesDir())
    nodes = SampleData.click(registered[0])
    _checkAbdomenCase(scene, nodes, fetchedSamples)
    chest = SampleData.click(registered[1])
    assert [n.GetName() for n in chest] == ["MiM chest CT"] and chest[0].GetImageData().GetDimensions() == (233, 167, 191)


def test_the_first_click_fetches_in_the_background_then_loads(scene, registered, fetchedSamples, jobsFolder, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("MIMSLICER_HOME", str(tmp_path / "home"))
    assert not sampleData.isFetched(paths.samplesDir())
    source = registered[0]
    statuses = []
    source.customDownloader.reportStatus = statuses.append
    assert SampleData.click(source) == []  # returns at once: the engine fetches in its own process
    downloader = source.customDownloader
    assert downloader.task.running and scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
    assert len(statuses) == 1 and "downloading the sample CTs" in statuses[0]  # the user is told what happens
    assert SampleData.click(source) == [] and "still being downloaded" in statuses[-1]  # no second fetch
    clock = qt.QElapsedTimer()
    clock.start()
    while downloader.task.running:  # the downloader's QTimer polls the job, as in Slicer
        qt.QApplication.processEvents()
        qt.QThread.msleep(20)
        assert clock.elapsed() < 300000
    assert downloader.task.state == tasks.DONE, downloader.task.message
    assert statuses[-1].startswith("Loaded ")
    assert sampleData.isFetched(paths.samplesDir())
    _checkAbdomenCase(scene, downloader.task.result, Path(paths.samplesDir()))


def test_a_failed_fetch_is_reported_and_loads_nothing(scene, registered, jobsFolder, tmp_path, monkeypatch):
    """No package index (pip told not to use one): the engine's own message reaches the user, nothing is loaded."""
    monkeypatch.setenv("MIMSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    source = registered[0]
    reported = []
    source.customDownloader.reportError = reported.append
    assert SampleData.click(source) == []
    task = source.customDownloader.task
    clock = qt.QElapsedTimer()
    clock.start()
    while task.running or not reported:
        qt.QApplication.processEvents()
        qt.QThread.msleep(20)
        assert clock.elapsed() < 120000
    assert task.state == tasks.FAILED
    assert len(reported) == 1 and "could not download TotalSegmentator==2.18.0" in reported[0]
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0 and not sampleData.isFetched(paths.samplesDir())
