"""The software a model was made with, as plain data: recorded in model.pt, its model card and exported bundles."""
from __future__ import annotations

import platform
from importlib import metadata

import engine

PACKAGES = {"torch": "torch", "monai": "monai", "numpy": "numpy", "SimpleITK": "SimpleITK"}


def software_versions() -> dict[str, str]:
    """{"engine": ..., "torch": ..., "monai": ..., "numpy": ..., "SimpleITK": ..., "python": ...}."""
    versions = {"engine": engine.__version__}
    for name, distribution in PACKAGES.items():
        versions[name] = package_version(distribution)
    versions["python"] = platform.python_version()
    return versions


def package_version(distribution: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
