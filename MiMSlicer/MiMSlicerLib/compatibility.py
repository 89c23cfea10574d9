"""Which Slicer can run the module. Slicer 5.10 moved its Python to 3.12; Slicer 5.6 and 5.8 run Python 3.9, which the
engine never ran on. Every Slicer reads this file before anything else of the module, so it keeps to Python 3.9
syntax and imports nothing of the module."""
import sys

MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)


def whyUnsupported(app):
    """One line saying why this Slicer cannot run MiM Slicer, or '' when it can (`app`: slicer.app)."""
    slicerVersion = (getattr(app, "majorVersion", 0), getattr(app, "minorVersion", 0))
    pythonVersion = tuple(sys.version_info[:2])
    if slicerVersion >= MINIMUM_SLICER and pythonVersion >= MINIMUM_PYTHON:
        return ""
    return ("MiM Slicer needs 3D Slicer {}.{} or newer (Python 3.12); this is Slicer {}.{} with Python {}.{}: install "
            "a current Slicer from download.slicer.org.".format(*MINIMUM_SLICER, *slicerVersion, *pythonVersion))
