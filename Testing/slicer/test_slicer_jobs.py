"""EngineJob and Task life cycle with the real engine: errors come back as the engine's one-line message, Cancel
kills the whole process tree and removes the job's temporary folder, and the scene is left as it was."""
import os
import sys
import time

import pytest
import slicer

from mimslicer_testing import REPO, loadVolume
from MiMSlicerLib import jobs, tasks


def processGroupAlive(pgid):
    """True while any process of the group runs (POSIX)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
            except (OSError, IndexError, ValueError):
                continue
    return False


def test_engine_error_comes_back_as_its_message(jobsFolder):
    folder = jobs.makeJobFolder("test")
    job = jobs.EngineJob(jobs.engineCommand("reconstruct", "--checkpoint", "/nonexistent/ckpt.pt", "--image",
                                            "/nonexistent/ct.nii.gz", "--out", os.path.join(folder, "out"),
                                            python=sys.executable), tempDir=folder).start()
    assert job.wait(timeout=120) == 2
    assert "/nonexistent/" in job.errorMessage and "Traceback" not in job.errorMessage
    job.removeTempDir()


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
def test_cancel_kills_the_process_tree_and_removes_temp_files(jobsFolder, scene, smallCt):
    """A long pre-training (it also starts a child process) is cancelled after its first progress event."""
    folder = jobs.makeJobFolder("cancel")
    data = os.path.join(folder, "data")
    os.makedirs(data)
    os.symlink(smallCt, os.path.join(data, "ct.nii.gz"))
    script = ("import subprocess, sys, runpy; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
              "sys.argv = ['engine'] + sys.argv[1:]; runpy.run_module('engine', run_name='__main__')")
    command = [sys.executable, "-c", script, "pretrain", "--data", data, "--preset", "tiny", "--steps", "100000",
               "--out", os.path.join(folder, "run"), "--progress", "json"]
    job = jobs.EngineJob(command, tempDir=folder, cwd=str(REPO)).start()
    started = time.monotonic()
    seen = []
    while not any(e.get("event") in ("start", "step") for e in seen):
        seen += job.poll()
        assert not job.finished, job.stderrTail
        assert time.monotonic() - started < 120
        time.sleep(0.05)
    pgid = job.pid
    assert processGroupAlive(pgid)
    job.cancel()
    assert job.cancelled and job.finished
    assert not processGroupAlive(pgid), "a process of the job is still running"
    assert not os.path.exists(folder)


def test_failed_reconstruction_leaves_scene_unchanged(jobsFolder, scene, smallCt, tmp_path):
    volume = loadVolume(smallCt)
    badCheckpoint = tmp_path / "broken.pt"
    badCheckpoint.write_bytes(b"this is not a checkpoint")
    before = scene.GetNumberOfNodes()
    task = tasks.ReconstructTask(scene, volume, str(badCheckpoint)).start()
    assert task.wait(timeout=120) == tasks.FAILED
    assert "broken.pt" in task.message, task.message
    assert scene.GetNumberOfNodes() == before
    assert slicer.util.errors == []  # Logic shows no dialogs: the message is for the panel


def test_cancelled_task_removes_its_live_nodes(jobsFolder, scene, chestCases, pretrainedCheckpoint):
    """Cancel during fine-tuning: the live plot nodes go away again, nothing is registered."""
    from mimslicer_testing import loadLabelsAsSegmentation
    from MiMSlicerLib import finetuneDataset
    from MiMSlicerLib.catalogue import ModelCatalogue
    volume = loadVolume(chestCases[0][0], "chest0")
    loadLabelsAsSegmentation(volume, chestCases[0][1], {"heart": 1, "aorta": 2})
    cases = finetuneDataset.findLabelledCases(scene)
    before = scene.GetNumberOfNodes()
    catalogue = ModelCatalogue()
    task = tasks.FinetuneTask(scene, cases, finetuneDataset.planLabels(cases), str(pretrainedCheckpoint), "cancelled",
                              catalogue, steps=1000).start()
    assert scene.GetNumberOfNodes() > before  # curves are live while it runs
    time.sleep(1.0)
    task.poll()
    task.cancel()
    assert task.state == tasks.CANCELLED
    assert scene.GetNumberOfNodes() == before
    assert all(e["name"] != "cancelled" for e in catalogue.entries())
