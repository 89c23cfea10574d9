"""Standard terminology (SNOMED CT codes) and display colours of label names: the engine's one table
(engine/imageio/terminology.py), read from the bundled engine so that a structure has the same name and colour in
Slicer as in the engine's .seg.nrrd and overlay PNG. Loaded by its file path: the rest of the engine (and its
packages) is never imported into Slicer's Python, and no `engine` package is put on sys.path."""
import importlib.util
import os

from . import paths


def _engineTable():
    path = os.path.join(paths.engineRoot(), "engine", "imageio", "terminology.py")
    spec = importlib.util.spec_from_file_location("MiMSlicerLib._engineTerminology", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


_table = _engineTable()
KNOWN_STRUCTURES, SYNONYMS, PALETTE = _table.KNOWN_STRUCTURES, _table.SYNONYMS, _table.PALETTE
TABLE_FILE = _table.__file__


def normaliseName(name):
    """'Lung-Left', 'lung_left', ' Left  lung ' -> 'left lung' style lower-case words, laterality first."""
    return _table.normalise_name(name)


def lookUp(name):
    """(category, type, modifier or None, colour 0..255) for a known structure name, else None."""
    return _table.look_up(name)


def terminologyEntry(name):
    """The Slicer terminology string for a label name, or '' when the structure is not known."""
    return _table.terminology_entry(name)


def colourFor(name, index):
    """RGB 0..1: the structure's usual colour when known, else the palette colour for its position among the labels
    sorted by value."""
    return _table.colour_for(name, index)
