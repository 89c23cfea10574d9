"""Fixtures for the Slicer module tests: a headless Slicer-like environment (real slicer-core MRML, PySide6 `qt`),
real CT from ../shared/data/ct-2mm cropped small, and a tiny MiM checkpoint made by the real engine once per session.

Every engine job of these tests writes under a session folder (MIMSLICER_TEMP) and the user catalogue lives in
another (MIMSLICER_HOME), so tests can prove that nothing is left behind."""
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                           # slicer_test_env, mimslicer_testing
sys.path.insert(0, str(HERE.parents[1] / "MiMSlicer"))  # Slicer puts the module folder on sys.path


def _importSlicerPackage():
    """slicer-core's `slicer` package adds every '<sys.path entry>/slicer' folder to itself and imports all modules
    there; with Testing/ on sys.path (pytest puts it there for Testing/conftest.py) that would be this folder."""
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() / "slicer" != HERE]
    try:
        import slicer  # noqa: F401
    finally:
        sys.path[:] = saved


_importSlicerPackage()
import slicer_test_env  # noqa: E402

slicer_test_env.install()

import pytest  # noqa: E402

from mimslicer_testing import DATA, REPO, addSliceViews, cropNifti  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"real CT data not found at {DATA}")
        for item in items:
            if Path(str(item.fspath)).resolve().parent == HERE:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def failOnCallbackExceptions():
    """An exception raised inside a Qt slot, a QTimer callback or a VTK observer does not reach the test: PySide6 and
    VTK hand it to sys.excepthook and carry on (PythonQt in Slicer prints it and carries on too). Collect them and
    fail the test that raised them."""
    raised, saved = [], sys.excepthook
    sys.excepthook = lambda kind, value, tb: raised.append("".join(traceback.format_exception(kind, value, tb)))
    try:
        yield raised
    finally:
        sys.excepthook = saved
    if raised:
        pytest.fail("exception(s) inside Qt slots or VTK observers:\n" + "\n".join(raised), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def mimFolders(tmp_path_factory):
    """Job temp folders and the user catalogue of this session; the environment is restored afterwards."""
    root = tmp_path_factory.mktemp("mimslicer")
    folders = {"MIMSLICER_TEMP": root / "jobs", "MIMSLICER_HOME": root / "home"}
    saved = {k: os.environ.get(k) for k in folders}
    for key, path in folders.items():
        path.mkdir()
        os.environ[key] = str(path)
    yield {"temp": folders["MIMSLICER_TEMP"], "home": folders["MIMSLICER_HOME"]}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def jobsFolder(mimFolders):
    """The job temp folder, checked empty before and after the test."""
    folder = mimFolders["temp"]
    assert not list(folder.iterdir()), f"left over from an earlier test: {list(folder.iterdir())}"
    yield folder
    left = list(folder.iterdir())
    assert not left, f"temporary files left behind: {left}"


@pytest.fixture
def scene():
    import slicer
    slicer.mrmlScene.Clear(0)
    slicer.util.errors.clear()
    slicer.util.confirmations.clear()
    addSliceViews(slicer.mrmlScene)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)  # as Slicer always has one
    return slicer.mrmlScene


@pytest.fixture(scope="session")
def smallCt(tmp_path_factory):
    """pycerr_pat_2 (2 mm, lung) cropped to 40 x 40 x 36 voxels."""
    folder = tmp_path_factory.mktemp("ct")
    return cropNifti(DATA / "pycerr_pat_2_ct.nii.gz", folder / "pat2_crop.nii.gz", (14, 14, 12), (40, 40, 36))


@pytest.fixture(scope="session")
def chestCt(tmp_path_factory):
    """ts_chest (2 mm) cropped to 100 x 100 x 100 voxels around the heart: larger than the tiny preset's crop, so
    every reconstruction view lies inside the body."""
    folder = tmp_path_factory.mktemp("chestct")
    return cropNifti(DATA / "ts_chest_ct.nii.gz", folder / "chest_ct.nii.gz", (50, 0, 12), (100, 100, 100))


@pytest.fixture(scope="session")
def chestCases(tmp_path_factory):
    """Two overlapping crops of ts_chest (CT + heart/aorta labels), 48 x 48 x 40 voxels at 2 mm."""
    folder = tmp_path_factory.mktemp("chest")
    cases = []
    for n, start in enumerate([(72, 24, 40), (76, 28, 52)]):
        ct = cropNifti(DATA / "ts_chest_ct.nii.gz", folder / f"chest{n}_ct.nii.gz", start, (48, 48, 40))
        label = cropNifti(DATA / "ts_chest_label.nii.gz", folder / f"chest{n}_label.nii.gz", start, (48, 48, 40))
        cases.append((ct, label))
    return cases


@pytest.fixture(scope="session")
def pretrainedCheckpoint(tmp_path_factory, smallCt, chestCases):
    """A real MiM checkpoint: `engine pretrain --preset tiny` for 2 steps on the cropped CTs."""
    folder = tmp_path_factory.mktemp("pretrain")
    data = folder / "data"
    data.mkdir()
    for path in [smallCt, chestCases[0][0]]:
        (data / Path(path).name).symlink_to(path)
    out = folder / "run"
    command = [sys.executable, "-m", "engine", "pretrain", "--data", str(data), "--method", "mim", "--preset", "tiny",
               "--steps", "2", "--out", str(out), "--progress", "none"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"pretrain fixture: {time.monotonic() - started:.1f} s")
    return out / "checkpoint.pt"
