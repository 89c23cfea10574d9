"""Model catalogue (schema-validated, shipped + user parts), dependency handling behind one interface (nothing
installed at import, asks first, PyTorch through PyTorchUtils), and the extension's build files."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mimslicer_testing import REPO
from MiMSlicerLib import dependencies, jsonSchema, modelChoice
from MiMSlicerLib.catalogue import CatalogueError, ModelCatalogue

SCHEMA = json.loads((REPO / "Resources" / "models-schema.json").read_text())


def entry(**changes):
    base = {"id": "heart-ct", "name": "Heart CT", "task": "segmentation", "labels": {"heart": 1}, "preset": "tiny",
            "spacing": [3, 3, 3], "file": "models/heart/model.pt", "expectedTimeSec": {"cpu": 20, "gpu": 2}}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def catalogue(tmp_path):
    builtin = tmp_path / "models.json"
    builtin.write_text(json.dumps({"format": "mimslicer-models/1", "models": [
        entry(id="mim-demo", name="MiM demo", task="pretraining", labels=None, method="mim", file=None,
              url="https://example.org/mim-demo.pt")]}))
    return ModelCatalogue(builtinPath=str(builtin), userPath=str(tmp_path / "user" / "models.json"))


def test_shipped_catalogue_follows_its_schema():
    jsonSchema.validate(json.loads((REPO / "Resources" / "models.json").read_text()), SCHEMA)
    ModelCatalogue().entries()  # the module's own reading path


@pytest.mark.parametrize("bad, message", [
    (entry(task="classify"), "is not one of"),
    (entry(file=None), "must match a 'file' or a 'url'"),
    (entry(url="https://example.org/m.pt"), "must match a 'file' or a 'url'"),
    (entry(spacing=[3, 3]), "at least 3 items"),
    (entry(id="bad id!"), "does not match"),
    (entry(labels={"heart": 0}), "below the minimum"),
    (entry(colour="red"), "unknown field 'colour'"),
    (entry(expectedTimeSec={"cpu": -1}), "below the minimum"),
])
def test_schema_names_the_problem(bad, message):
    with pytest.raises(jsonSchema.SchemaError, match=re.escape(message)):
        jsonSchema.validate({"format": "mimslicer-models/1", "models": [bad]}, SCHEMA)


def test_register_validates_writes_and_resolves(catalogue, tmp_path):
    stored = catalogue.register(entry())
    assert stored["source"] == "user" and "created" in stored
    assert [e["id"] for e in catalogue.entries()] == ["mim-demo", "heart-ct"]
    assert [e["id"] for e in catalogue.entries(task="segmentation")] == ["heart-ct"]
    assert catalogue.localFile(catalogue.get("heart-ct")) == str(tmp_path / "user" / "models" / "heart" / "model.pt")
    assert catalogue.localFile(catalogue.get("mim-demo")).endswith(os.path.join("downloads", "mim-demo", "mim-demo.pt"))
    assert catalogue.uniqueID("Heart CT") == "Heart-CT" and catalogue.uniqueID("heart-ct") == "heart-ct-2"
    with pytest.raises(CatalogueError, match="needs its 'labels'"):
        catalogue.register(entry(id="other", labels=None))
    with pytest.raises(CatalogueError, match="shipped with the extension"):
        catalogue.register(entry(id="mim-demo"))
    catalogue.remove("heart-ct")
    assert [e["id"] for e in catalogue.entries()] == ["mim-demo"]


def test_a_broken_user_catalogue_is_reported_with_its_path(catalogue):
    os.makedirs(os.path.dirname(catalogue.userPath))
    with open(catalogue.userPath, "w") as f:
        f.write('{"format": "mimslicer-models/1", "models": [{"id": "x"}]}')
    with pytest.raises(CatalogueError, match=re.escape(catalogue.userPath) + ".*'name' is missing"):
        catalogue.entries()


def test_checkpoint_kind_comes_from_the_run_folder(tmp_path):
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "config.yaml").write_text("method: mim\npreset: tiny\nencoder:\n  task: x\n")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.yaml").write_text("task: segmentation\npreset: small\n")
    assert modelChoice.checkpointKind(str(tmp_path / "pre" / "checkpoint.pt")) == ("pretraining", "tiny")
    assert modelChoice.checkpointKind(str(tmp_path / "ft" / "model.pt")) == ("segmentation", "small")
    assert modelChoice.checkpointKind(str(tmp_path / "loose.pt")) == ("any", "")


# -- dependencies ----------------------------------------------------------------------------------------------
def test_requirements_match_the_engine_package():
    text = (REPO / "pyproject.toml").read_text()
    declared = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)\s*([^"]*)"', declared))
    assert pins == dependencies.REQUIREMENTS


def test_versions_are_compared_by_release_numbers():
    assert dependencies.versionSatisfies("2.13.0+cpu", ">=2.2")
    assert dependencies.versionSatisfies("1.5.2", ">=1.4,<1.7") and not dependencies.versionSatisfies("1.7.0", ">=1.4,<1.7")
    assert dependencies.versionSatisfies("2.5.0+cu121", ">=2.5") and not dependencies.versionSatisfies("2.4.1", ">=2.5")
    assert not dependencies.versionSatisfies("1.26.4", ">=2")


def test_floors_match_the_code_and_nothing_has_an_upper_bound():
    """torch 2.5: torch.serialization.safe_globals (torch.amp.custom_fwd(device_type=) needs 2.4); MONAI 1.5: SwinUNETR
    without img_size. An upper bound would make pip downgrade a package that Slicer or another extension uses."""
    assert dependencies.REQUIREMENTS["torch"] == ">=2.5" and dependencies.REQUIREMENTS["monai"] == ">=1.5"
    assert all("<" not in spec and "==" not in spec for spec in dependencies.REQUIREMENTS.values())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert all(f"{name}{spec}" in readme for name, spec in dependencies.REQUIREMENTS.items())


def test_install_asks_first_and_uses_pytorchutils_for_torch():
    calls = []
    deps = dependencies.Dependencies({"torch": ">=99", "definitely-not-installed-pkg": ">=1", "nibabel": ">=1"},
                                     pipInstall=lambda args: calls.append(("pip", args[0])),
                                     torchInstaller=lambda spec: calls.append(("torch", spec)))
    assert [r.name for r in deps.check()] == ["torch", "definitely-not-installed-pkg"]
    assert "torch >=99 (found" in deps.summary()
    declined = deps.install(confirm=lambda question: False)
    assert declined.declined and calls == [] and "Nothing was installed" in declined.message
    with pytest.raises(RuntimeError, match="did not succeed"):  # the fakes install nothing: said so, not hidden
        deps.install(confirm=lambda question: "PyTorch is large" in question and "upgrade torch" in question)
    assert calls == [("torch", ">=99"), ("pip", "definitely-not-installed-pkg>=1")]


def test_pip_adds_what_is_missing_and_may_change_nothing_installed(tmp_path):
    """One pip run for the missing packages (torch aside), with every other installed distribution pinned to its
    version in a constraints file: pip may add packages, never replace one that Slicer or an extension uses."""
    seen = {}

    def pip(args):
        seen["args"] = args
        seen["pins"] = set(Path(args[args.index("-c") + 1]).read_text().split())

    versions = {"monai": None, "nibabel": "4.0.2", "tqdm": "4.66.0"}
    deps = dependencies.Dependencies({"monai": ">=1.5", "nibabel": ">=5", "tqdm": ">=4.60"}, pipInstall=pip,
                                     versionOf=versions.get,
                                     installedPins=lambda: [("numpy", "2.0.2"), ("nibabel", "4.0.2"), ("vtk", "9.4.0")])
    questions = []
    with pytest.raises(RuntimeError, match="did not succeed"):
        deps.install(confirm=lambda q: questions.append(q) or True)
    assert seen["args"][:2] == ["monai>=1.5", "nibabel>=5"] and seen["args"][2] == "-c"
    assert seen["pins"] == {"numpy==2.0.2", "vtk==9.4.0"}  # nibabel is the one being upgraded
    assert not os.path.exists(seen["args"][3])
    assert "install monai >=1.5" in questions[0] and "upgrade nibabel 4.0.2 to >=5" in questions[0]
    assert "Slicer's own packages included, stays as it is" in questions[0]


def test_slicer_own_packages_are_checked_never_installed(monkeypatch):
    calls = []
    deps = dependencies.Dependencies({"numpy": ">=1.24", "monai": ">=1.5"}, versionOf={"numpy": "1.22.4"}.get,
                                     pipInstall=calls.append, torchInstaller=calls.append)
    assert "numpy 1.22.4 (part of Slicer)" in deps.whyEngineCannotRun() and "Slicer 5.10" in deps.whyEngineCannotRun()
    with pytest.raises(RuntimeError, match="part of Slicer"):
        deps.install(confirm=lambda q: True)
    assert calls == []
    # a Slicer build may install SimpleITK without package metadata: importable counts as present
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)) if name == "SimpleITK" else real(name))
    assert dependencies.installedVersion("SimpleITK") == dependencies.BUILT_IN
    assert dependencies.Requirement("SimpleITK", ">=2.3").satisfied
    assert dependencies.installedVersion("definitely-not-installed-pkg") is None


def test_every_engine_package_is_found_here():
    """The harness's Python has the engine's packages at versions the floors accept (the engine tests run on it)."""
    assert dependencies.Dependencies().check() == []
    assert dependencies.Dependencies().whyEngineCannotRun() == ""


def test_install_reports_when_slicer_must_restart():
    installed = set()
    deps = dependencies.Dependencies({"pytest": ">=99"}, pipInstall=lambda args: installed.add(args[0]))
    deps.check = lambda: [] if installed else [dependencies.Requirement("pytest", ">=99")]
    result = deps.install(confirm=lambda q: True)
    assert result.restartNeeded and "Restart Slicer" in result.message  # pytest is already imported here


def test_importing_the_module_installs_and_imports_nothing_heavy():
    """Import MiMSlicer.py in a fresh interpreter with the harness: no torch, no MONAI, no pip."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
            "import slicer_test_env; slicer_test_env.install();"
            "import MiMSlicer, MiMSlicerLib.tasks, MiMSlicerLib.dependencies;"
            "heavy = [m for m in ('torch', 'monai', 'pip') if m in sys.modules];"
            "assert not heavy, heavy; print('ok')")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "Testing" / "slicer"), str(REPO / "MiMSlicer")],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO / "Testing"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("version, refused", [((5, 8), True), ((5, 6), True), ((5, 10), False), ((6, 0), False)])
def test_slicer_before_5_10_is_refused_at_load_in_one_line(version, refused):
    """MiMSlicer.py loaded by a Slicer of `version` (fresh interpreter): before 5.10 (Python 3.9) it stops at once with
    one line naming the version needed; from 5.10 it loads."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
            "import slicer_test_env; slicer = slicer_test_env.install();"
            f"slicer.app.majorVersion, slicer.app.minorVersion = {version};"
            "exec('try:\\n import MiMSlicer\\n print(\\'loaded\\')\\nexcept ImportError as e:\\n print(e)')")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "Testing" / "slicer"), str(REPO / "MiMSlicer")],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))  # not Testing/: see conftest
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 1, done.stderr[-2000:]
    if refused:
        assert lines[0].startswith("MiM Slicer needs 3D Slicer 5.10 or newer") and f"Slicer {version[0]}.{version[1]} " in lines[0]
    else:
        assert lines[0] == "loaded"


def test_what_an_old_slicer_reads_first_is_python_3_9():
    """Slicer 5.6/5.8 (Python 3.9) must get as far as the version check: the module file and the check parse as 3.9."""
    import ast
    for path in (REPO / "MiMSlicer" / "MiMSlicer.py", REPO / "MiMSlicer" / "MiMSlicerLib" / "compatibility.py"):
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))


# -- extension build files -------------------------------------------------------------------------------------
def test_cmake_lists_every_script_and_resource():
    moduleCMake = (REPO / "MiMSlicer" / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MiMSlicer")
    for path in sorted((REPO / "MiMSlicer").rglob("*.py")):
        relative = path.relative_to(REPO / "MiMSlicer").as_posix()
        assert relative in moduleCMake, f"{relative} is not listed in MiMSlicer/CMakeLists.txt"
    for path in sorted((REPO / "Resources").rglob("*")):
        if path.is_file():
            assert path.relative_to(REPO).as_posix() in moduleCMake, f"{path} is not bundled"
    assert "slicerMacroBuildScriptedModule" in moduleCMake and "slicer_add_python_unittest" in moduleCMake
    assert "engine/*.py" in moduleCMake  # the bundled engine package
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"set\(EXTENSION_DEPENDS\s+PyTorch\)", top) and "add_subdirectory(MiMSlicer)" in top
    assert (REPO / "Resources" / "Icons" / "MiMSlicer.png").stat().st_size > 1000


def test_url_models_download_verified_and_cancellable(jobsFolder, scene, tmp_path):
    import hashlib
    from MiMSlicer import MiMSlicerLogic
    from MiMSlicerLib import tasks
    payload = tmp_path / "weights.pt"
    payload.write_bytes(os.urandom(300_000))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    builtin = tmp_path / "models.json"
    builtin.write_text(json.dumps({"format": "mimslicer-models/1", "models": [
        entry(id="remote-heart", file=None, url=payload.as_uri(), sha256=digest),
        entry(id="tampered-heart", file=None, url=payload.as_uri(), sha256="0" * 64)]}))
    logic = MiMSlicerLogic()
    logic.catalogue = ModelCatalogue(builtinPath=str(builtin))
    parameters = logic.getParameterNode()
    parameters.SetParameter("Model", "remote-heart")
    model = logic.selectedModel(parameters)
    assert model.needsDownload and modelChoice.whyNotSegment(object(), model) == "Download the model first (step 1)."
    task = logic.startDownload(model.entry)
    logic.wait(timeout=120)
    assert task.state == tasks.DONE, task.message
    model = logic.selectedModel(parameters)
    assert model.exists and not model.needsDownload
    assert open(model.path, "rb").read() == payload.read_bytes()

    parameters.SetParameter("Model", "tampered-heart")
    task = logic.startDownload(logic.selectedModel(parameters).entry)
    logic.wait(timeout=120)
    assert task.state == tasks.FAILED and "not the expected one" in task.message
    assert not os.path.exists(logic.selectedModel(parameters).path)
