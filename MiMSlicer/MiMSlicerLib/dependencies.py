"""Python packages the engine needs in Slicer's Python, behind one interface.

`check()` only looks at installed package metadata (it imports nothing, so it is safe at any time);
`install(confirm)` asks first through the `confirm` callback the widget passes in (Logic never opens dialogs),
installs torch through the PyTorch extension's PyTorchUtils (which picks the right CUDA/CPU build) and the rest
with slicer.util.pip_install, and reports whether Slicer must restart. Nothing is installed at import."""
import importlib.metadata
import importlib.util
import re
import sys

# Keep in step with pyproject.toml [project].dependencies (a test checks it).
REQUIREMENTS = {
    "torch": ">=2.2",
    "monai": ">=1.4,<1.7",
    "SimpleITK": ">=2.3,<2.6",
    "numpy": ">=1.24,<2.5",
    "nibabel": ">=5",
    "tqdm": ">=4.60",
    "pyyaml": ">=6",
    "matplotlib": ">=3.7",
}
IMPORT_NAMES = {"pyyaml": "yaml", "SimpleITK": "SimpleITK"}


class Requirement:
    def __init__(self, name, specifier):
        self.name, self.specifier = name, specifier
        self.importName = IMPORT_NAMES.get(name, name)
        self.installedVersion = _installedVersion(name)

    @property
    def satisfied(self):
        return self.installedVersion is not None and versionSatisfies(self.installedVersion, self.specifier)

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
    """check() -> missing requirements; install(confirm) -> InstallResult. Installers are injectable for tests."""

    def __init__(self, requirements=None, pipInstall=None, torchInstaller=None):
        self.requirements = dict(requirements or REQUIREMENTS)
        self._pipInstall = pipInstall
        self._torchInstaller = torchInstaller

    def check(self):
        return [r for r in (Requirement(n, s) for n, s in self.requirements.items()) if not r.satisfied]

    def summary(self):
        missing = self.check()
        if not missing:
            return ""
        return "The engine needs: " + "; ".join(r.describe() for r in missing) + "."

    def install(self, confirm):
        missing = self.check()
        if not missing:
            return InstallResult()
        question = ("MiMSlicer's engine needs these Python packages in Slicer:\n  " +
                    "\n  ".join(r.describe() for r in missing) +
                    "\n\nDownload and install them now? This can take several minutes (PyTorch is large).")
        if not confirm(question):
            return InstallResult(declined=True)
        restartNeeded = any(r.importName in sys.modules for r in missing)  # an old version is already loaded
        for requirement in missing:
            if requirement.name == "torch":
                self._installTorch(requirement)
            else:
                self._pip(f"{requirement.name}{requirement.specifier}")
        stillMissing = self.check()
        if stillMissing:
            raise RuntimeError("Installation did not succeed for: " + ", ".join(r.describe() for r in stillMissing))
        return InstallResult([r.name for r in missing], restartNeeded)

    def _pip(self, spec):
        if self._pipInstall is not None:
            return self._pipInstall(spec)
        import slicer
        return slicer.util.pip_install(spec)

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


def _installedVersion(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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
