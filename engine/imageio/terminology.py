"""One table of structure names, standard terminology and display colours, shared by every place that shows a label:
the `.seg.nrrd` the engine writes (imageio/labelmap.py), the overlay PNG (inference/overlay.py) and the 3D Slicer
module (MiMSlicer/MiMSlicerLib/terminology.py loads this file), so a structure has one name and one colour everywhere.

Codes are SNOMED CT, as DICOM and Slicer's Terminologies module use them. A Slicer terminology entry is one string:
context~category~type~typeModifier~anatomicContext~region~regionModifier, each code written as scheme^value^meaning.
Pure Python (no numpy, no SimpleITK): Slicer's module reads it at load time."""
from __future__ import annotations

import colorsys
import re

CATEGORY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")

# normalised name -> (category, type code, colour 0..255: the usual anatomical colour, as Slicer's General Anatomy)
KNOWN_STRUCTURES = {
    "heart": (ANATOMICAL_STRUCTURE, ("SCT", "80891009", "Heart"), (206, 110, 84)),
    "aorta": (ANATOMICAL_STRUCTURE, ("SCT", "15825003", "Aorta"), (224, 97, 76)),
    "liver": (ANATOMICAL_STRUCTURE, ("SCT", "10200004", "Liver"), (221, 130, 101)),
    "spleen": (ANATOMICAL_STRUCTURE, ("SCT", "78961009", "Spleen"), (157, 108, 162)),
    "kidney": (ANATOMICAL_STRUCTURE, ("SCT", "64033007", "Kidney"), (185, 102, 83)),
    "lung": (ANATOMICAL_STRUCTURE, ("SCT", "39607008", "Lung"), (197, 165, 145)),
    "spinal cord": (ANATOMICAL_STRUCTURE, ("SCT", "2748008", "Spinal cord"), (244, 214, 49)),
    "esophagus": (ANATOMICAL_STRUCTURE, ("SCT", "32849002", "Esophagus"), (211, 171, 143)),
    "trachea": (ANATOMICAL_STRUCTURE, ("SCT", "44567001", "Trachea"), (182, 228, 255)),
    "stomach": (ANATOMICAL_STRUCTURE, ("SCT", "69695003", "Stomach"), (216, 132, 105)),
    "pancreas": (ANATOMICAL_STRUCTURE, ("SCT", "15776009", "Pancreas"), (249, 180, 111)),
    "gallbladder": (ANATOMICAL_STRUCTURE, ("SCT", "28231008", "Gallbladder"), (139, 150, 98)),
    "urinary bladder": (ANATOMICAL_STRUCTURE, ("SCT", "89837001", "Urinary bladder"), (222, 154, 132)),
    "brain": (ANATOMICAL_STRUCTURE, ("SCT", "12738006", "Brain"), (250, 250, 225)),
    "mass": (ALTERED_STRUCTURE, ("SCT", "4147007", "Mass"), (255, 128, 0)),
}
SYNONYMS = {
    "oesophagus": "esophagus", "gall bladder": "gallbladder", "bladder": "urinary bladder",
    "cord": "spinal cord", "spinalcord": "spinal cord", "tumor": "mass", "tumour": "mass", "gtv": "mass",
    "lesion": "mass", "nodule": "mass", "heart whole": "heart",
}
# Colours for structures the table does not know, by their position among a model's labels (sorted by value).
# Ordered so that no two neighbours are a red and a green (the pair most colour-blind readers cannot tell apart).
PALETTE = [(0, 130, 200), (245, 130, 48), (145, 30, 180), (255, 225, 25), (230, 25, 75), (70, 240, 240),
           (240, 50, 230), (60, 180, 75), (220, 190, 255), (250, 190, 212), (0, 128, 128), (210, 245, 60)]


def normalise_name(name: str) -> str:
    """'Lung-Left', 'lung_left', ' Left  lung ' -> 'left lung' style lower-case words, laterality first."""
    words = [w for w in re.split(r"[\s_\-./]+", name.strip().lower()) if w]
    side = [w for w in words if w in ("left", "right")]
    rest = [w for w in words if w not in ("left", "right")]
    return " ".join(side + rest)


def look_up(name: str):
    """(category, type, modifier or None, colour 0..255) for a known structure name, else None."""
    words = normalise_name(name).split()
    modifier = {"left": LEFT, "right": RIGHT}.get(words[0]) if words else None
    base = " ".join(words[1:] if modifier else words)
    base = re.sub(r"\s*\d+$", "", base)  # "GTV-1" -> "gtv"
    base = SYNONYMS.get(base, base)
    if base not in KNOWN_STRUCTURES:
        return None
    category, type_code, colour = KNOWN_STRUCTURES[base]
    return category, type_code, modifier, colour


def terminology_entry(name: str) -> str:
    """The Slicer terminology string for a label name, or '' when the structure is not known."""
    found = look_up(name)
    if found is None:
        return ""
    category, type_code, modifier, _ = found
    code = lambda c: "^".join(c) if c else "^^"  # noqa: E731
    return "~".join([CATEGORY_CONTEXT, code(category), code(type_code), code(modifier), ANATOMY_CONTEXT, "^^", "^^"])


def colour_for(name: str, index: int) -> tuple[float, float, float]:
    """RGB 0..1 of the label `name`, the `index`-th of its model's labels sorted by value (background excluded):
    the structure's usual colour when known, else the palette's colour for that position.

    Slicer's General Anatomy gives a structure's left and right the same colour, so a model's two lungs (or kidneys)
    would be drawn alike and a left-right swap would not show. The left side therefore takes the complementary hue at
    the same lightness and saturation (lung: beige (197, 165, 145) right, steel blue (145, 177, 197) left): on the
    blue-orange axis, which colour-blind readers keep apart. The right side and unsided structures keep the table's."""
    found = look_up(name)
    if found is None:
        return tuple(c / 255.0 for c in PALETTE[index % len(PALETTE)])
    rgb = tuple(c / 255.0 for c in found[3])
    if found[2] == LEFT:
        hue, lightness, saturation = colorsys.rgb_to_hls(*rgb)
        rgb = colorsys.hls_to_rgb((hue + 0.5) % 1.0, lightness, saturation)
    return tuple(float(c) for c in rgb)


def label_colours(labels: dict[str, int]) -> dict[str, tuple[float, float, float]]:
    """{name: RGB 0..1} for a model's labels {name: value} (background, value 0, excluded), in value order."""
    ordered = sorted(((int(v), n) for n, v in labels.items() if int(v) != 0))
    return {name: colour_for(name, index) for index, (_, name) in enumerate(ordered)}
