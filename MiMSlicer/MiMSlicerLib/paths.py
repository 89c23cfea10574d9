"""Where things are: the bundled engine, the module's resources, the user's data folder and the Python that runs
the engine. Works in three layouts: the installed extension (engine/ and Resources/ next to MiMSlicer.py), the
source tree (MiMSlicer/, Resources/ and engine/ side by side) and the test harness (slicer-core, no application)."""
import os
import shutil
import sys
import tempfile

import slicer

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CANDIDATE_ROOTS = (MODULE_DIR, os.path.dirname(MODULE_DIR))


def resourcePath(*parts):
    """A file in Resources/: next to the module when installed, at the repository root in the source tree."""
    for root in _CANDIDATE_ROOTS:
        path = os.path.join(root, "Resources", *parts)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"MiMSlicer resource not found: Resources/{'/'.join(parts)} (looked in {_CANDIDATE_ROOTS})")


def engineRoot():
    """The folder that holds the `engine` package (put on PYTHONPATH of every engine process)."""
    override = os.environ.get("MIMSLICER_ENGINE_ROOT")
    roots = ([override] if override else []) + list(_CANDIDATE_ROOTS)
    for root in roots:
        if os.path.isfile(os.path.join(root, "engine", "__main__.py")):
            return root
    raise FileNotFoundError(f"The MiMSlicer engine package was not found next to the module (looked in {roots}).")


def enginePython():
    """The Python that runs the engine: Slicer's own (PythonSlicer) in Slicer, the current interpreter elsewhere."""
    override = os.environ.get("MIMSLICER_PYTHON")
    if override:
        return override
    if _insideSlicerApplication():
        found = shutil.which("PythonSlicer")
        if found:
            return found
        home = getattr(slicer.app, "slicerHome", "")
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = os.path.join(home, "bin", name)
            if os.path.isfile(candidate):
                return candidate
    return sys.executable


def engineRunsInSlicerPython():
    """True unless MIMSLICER_PYTHON points the engine to another Python (whose packages are not Slicer's)."""
    return not os.environ.get("MIMSLICER_PYTHON")


def userDataDir():
    """Per-user folder for the model catalogue, fine-tuned and downloaded models: ~/.mimslicer, or MIMSLICER_HOME
    (created on demand). Not Slicer's settings folder, which is in the roaming profile on Windows (every model would
    be copied at each log-in), nor its cache folder, which users clear."""
    path = os.environ.get("MIMSLICER_HOME") or os.path.join(os.path.expanduser("~"), ".mimslicer")
    os.makedirs(path, exist_ok=True)
    return path


def modelsDir():
    """Where fine-tuned models are kept, one folder per model id."""
    return os.path.join(userDataDir(), "models")


def samplesDir():
    """Where the sample CTs of the Sample Data module are fetched to (once, by the engine: `engine sample-data`)."""
    return os.path.join(userDataDir(), "downloads", "samples", "totalsegmentator-2.18.0")


def temporaryRoot():
    """Parent of every job's temporary folder (each job removes its own folder when it ends)."""
    path = os.environ.get("MIMSLICER_TEMP")
    if not path and _insideSlicerApplication():
        path = getattr(slicer.app, "temporaryPath", "")
    path = path or tempfile.gettempdir()
    os.makedirs(path, exist_ok=True)
    return path


def _insideSlicerApplication():
    app = getattr(slicer, "app", None)
    return app is not None and hasattr(app, "slicerHome")
