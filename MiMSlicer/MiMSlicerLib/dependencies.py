"""Python packages the engine needs in Slicer's Python, behind one interface.

Slicer's Python is shared: Slicer ships numpy and SimpleITK (and VTK) built for itself, and other extensions install
their own packages next to ours. So this module installs only what is missing, never with upper bounds, and never
replaces anything that is there: Slicer's own packages are checked but never installed, and every other installed
distribution is pinned to its version (a pip constraints file) while pip adds the missing ones.

`check()` only looks at installed package metadata (it imports nothing, so it is safe at any time);
`install(confirm)` asks first through the `confirm` callback the widget passes in (Logic never opens dialogs),
installs torch through the PyTorch extension's PyTorchUtils (which picks the right CUDA/CPU build) and the rest
with slicer.util.pip_install, and reports whether Slicer must restart. Nothing is installed at import."""
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile

# Keep in step with pyproject.toml [project].dependencies (a test checks it). Floors only, each the oldest release
# the engine's code works with; no upper bounds, which would downgrade packages that other extensions share.
REQUIREMENTS = {
    "torch": ">=2.5",  # torch.serialization.safe_globals (2.5); torch.amp.custom_fwd(device_type=...) (2.4)
    "monai": ">=1.5",  # SwinUNETR without img_size (1.5)
    "einops": ">=0.7",  # MONAI's TransformerBlock (its attention) imports it; MONAI does not require it
    "SimpleITK": ">=2.3",
    "numpy": ">=1.24",
    "nibabel": ">=5",
    "tqdm": ">=4.60",
    "pyyaml": ">=6",
    "matplotlib": ">=3.7",
}
IMPORT_NAMES = {"pyyaml": "yaml"}
SLICER_SHIPS = ("numpy", "SimpleITK")  # part of Slicer itself: checked, never installed or replaced
INSTALL_BUTTON = "Check engine packages"
BUILT_IN = "built into Slicer"  # the version of a Slicer package installed without metadata


class Requirement:
    """One package: its specifier and what is installed (`versionOf(name)` -> version or None)."""

    def __init__(self, name, specifier, versionOf=None):
        self.name, self.specifier = name, specifier
        self.importName = IMPORT_NAMES.get(name, name)
        self.installedVersion = (versionOf or installedVersion)(name)
        self.shippedBySlicer = name in SLICER_SHIPS

    @property
    def satisfied(self):
        if self.installedVersion is None:
            return False
        return self.installedVersion == BUILT_IN or versionSatisfies(self.installedVersion, self.specifier)

    def describe(self):
        if self.installedVersion is None:
            return f"{self.name} {self.specifier} (not installed)"
        return f"{self.name} {self.specifier} (found {self.installedVersion})"


class InstallResult:
    def __init__(self, installed=(), restartNeeded=False, declined=False):
        self.installed, self.restartNeeded, self.declined = list(installed), restartNeeded, declined

    @property
    def message(self):
        if self.declined:
            return "Nothing was installed. The engine cannot run until these packages are present."
        if not self.installed:
            return "All engine packages are present."
        text = "Installed " + ", ".join(self.installed) + "."
        return text + (" Restart Slicer before running the engine." if self.restartNeeded else "")


class Dependencies:
    """check() -> unmet requirements; whyEngineCannotRun() -> one sentence or ''; install(confirm) -> InstallResult.
    Installers and the installed-version lookup are injectable for tests."""

    def __init__(self, requirements=None, pipInstall=None, torchInstaller=None, versionOf=None, installedPins=None):
        self.requirements = dict(requirements or REQUIREMENTS)
        self._pipInstall = pipInstall
        self._torchInstaller = torchInstaller
        self._versionOf = versionOf
        self._installedPins = installedPins or installedDistributions

    def check(self):
        found = (Requirement(n, s, self._versionOf) for n, s in self.requirements.items())
        return [r for r in found if not r.satisfied]

    def summary(self):
        missing = self.check()
        if not missing:
            return ""
        return "The engine needs: " + "; ".join(r.describe() for r in missing) + "."

    def whyEngineCannotRun(self):
        """What a job would fail on, in the user's terms, and what to do; '' when everything is there."""
        unmet = self.check()
        ownOutdated = [r for r in unmet if r.shippedBySlicer]
        if ownOutdated:
            return (", ".join(f"{r.name} {r.installedVersion or 'missing'}" for r in ownOutdated) +
                    " (part of Slicer) does not meet the engine's needs (" +
                    ", ".join(f"{r.name} {r.specifier}" for r in ownOutdated) + "): use Slicer 5.10 or newer.")
        if unmet:
            return (f"The engine needs Python packages that Slicer does not have yet: "
                    f"{', '.join(_short(r) for r in unmet)}. Press '{INSTALL_BUTTON}' in step 1 to install them.")
        return ""

    def install(self, confirm):
        unmet = self.check()
        if not unmet:
            return InstallResult()
        ownOutdated = [r for r in unmet if r.shippedBySlicer]
        if ownOutdated:  # never replace what Slicer ships: Slicer's own modules are built against it
            raise RuntimeError(self.whyEngineCannotRun())
        if not confirm(self.question(unmet)):
            return InstallResult(declined=True)
        restartNeeded = any(r.importName in sys.modules for r in unmet)  # an old version is already loaded
        torch = [r for r in unmet if r.name == "torch"]
        others = [r for r in unmet if r.name != "torch"]
        if torch:
            self._installTorch(torch[0])
        if others:
            self._pipWithPins(others)
        stillMissing = self.check()
        if stillMissing:
            raise RuntimeError("Installation did not succeed for: " + ", ".join(r.describe() for r in stillMissing))
        return InstallResult([r.name for r in unmet], restartNeeded)

    @staticmethod
    def question(unmet):
        lines = []
        for r in unmet:
            how = " through the PyTorch extension" if r.name == "torch" else ""
            if r.installedVersion is None:
                lines.append(f"install {r.name} {r.specifier}{how}")
            else:
                lines.append(f"upgrade {r.name} {r.installedVersion} to {r.specifier}{how} (other extensions may use it)")
        return ("MiMSlicer's engine needs these Python packages in Slicer:\n  " + "\n  ".join(lines) +
                "\n\nEverything else already installed, Slicer's own packages included, stays as it is."
                "\nDownload and install them now? This can take several minutes (PyTorch is large).")

    def _pipWithPins(self, requirements):
        """One pip run that may add packages but may not change any installed one (a constraints file pins them)."""
        changing = {_canonical(r.name) for r in requirements}
        pins = [f"{name}=={version}" for name, version in self._installedPins() if name not in changing]
        handle, constraints = tempfile.mkstemp(prefix="mimslicer-constraints-", suffix=".txt")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                f.write("\n".join(pins) + "\n")
            self._pip([f"{r.name}{r.specifier}" for r in requirements] + ["-c", constraints])
        finally:
            os.remove(constraints)

    def _pip(self, args):
        if self._pipInstall is not None:
            return self._pipInstall(args)
        import slicer
        return slicer.util.pip_install(args)

    def _installTorch(self, requirement):
        if self._torchInstaller is not None:
            return self._torchInstaller(requirement.specifier)
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS PyTorch)
        except ImportError:
            raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                               "restart Slicer, then try again.") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                               torchVersionRequirement=requirement.specifier)
        if torch is None:
            raise RuntimeError("PyTorch was not installed.")



def installedVersion(name):
    """The installed version from package metadata; for Slicer's own packages, which a Slicer build may install
    without metadata, BUILT_IN when the package can be imported. Imports nothing."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    if name in SLICER_SHIPS and importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is not None:
        return BUILT_IN
    return None


def installedDistributions():
    """(canonical name, version) of every distribution Python can see, the one found first where there are two."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version and _canonical(name) not in seen:
            seen[_canonical(name)] = version
    return sorted(seen.items())


def versionSatisfies(version, specifier):
    """`specifier` like '>=1.4,<1.7'; compares numeric release parts only ('2.13.0+cpu' -> (2, 13, 0))."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        op, wanted = re.match(r"(>=|<=|==|!=|<|>)\s*(.+)", clause).groups()
        want = _release(wanted)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if not {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]:
            return False
    return True


def _release(version):
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _short(requirement):
    label = {"torch": "PyTorch", "monai": "MONAI"}.get(requirement.name, requirement.name)
    if requirement.installedVersion is None:
        return f"{label} ({requirement.name}{requirement.specifier})"
    return f"{label} {requirement.installedVersion} (needs {requirement.specifier})"
