"""The segmentation's uncertainty (`engine infer --uncertainty`: per voxel, the normalised entropy of the class
probabilities, 0 = certain, 1 = every class equally likely) as a colour layer over the CT in the slice views, with a
colour legend where Slicer has one (desktop Slicer's Colors module)."""
import os

import slicer

from . import hierarchy, sliceViews, volumeIO

COLOUR_TABLES = ("Inferno", "PET-Heat", "Iron")  # the first that the scene has
SHOWN_FROM = 0.05  # voxels less uncertain than this stay see-through: the CT shows where the model is sure
OPACITY = 0.6
ATTRIBUTE = "MiMSlicer.uncertainty"


def fileFor(labelmapPath):
    """Where `engine infer` writes the uncertainty of a labelmap (`<stem>_uncertainty.nii.gz`)."""
    folder, name = os.path.split(labelmapPath)
    stem = name.split(".")[0]
    return os.path.join(folder, f"{stem}_uncertainty.nii.gz")


def show(scene, path, ctVolume, name):
    """Load the uncertainty volume, colour it 0..1, and put it in front of `ctVolume` in every slice view."""
    node = volumeIO.readVolume(scene, path, name)
    node.SetAttribute(ATTRIBUTE, ctVolume.GetID())
    hierarchy.moveUnder(scene, node, hierarchy.parentOf(scene, ctVolume))  # beside the CT
    display = node.GetDisplayNode()
    colour = next((c for c in (_colourNode(scene, n) for n in COLOUR_TABLES) if c is not None), None)
    if colour is not None:
        display.SetAndObserveColorNodeID(colour.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetThreshold(SHOWN_FROM, 1.0)
    display.ApplyThresholdOn()
    sliceViews.setLayers(scene, ctVolume, node, OPACITY)
    addLegend(node)
    return node


def addLegend(node):
    """A colour legend titled with what the colours mean, in desktop Slicer (its Colors module's logic); returns
    the legend display node, or None where there is no Colors module (the test harness)."""
    colors = getattr(getattr(slicer, "modules", None), "colors", None)
    addLegend = getattr(colors.logic(), "AddDefaultColorLegendDisplayNode", None) if colors is not None else None
    if addLegend is None:  # MRML's colour logic alone (the harness) has no legends: vtkSlicerColorLogic has
        return None
    legend = addLegend(node)
    if legend is not None:
        legend.SetTitleText("Uncertainty (entropy, 0-1)")
        legend.SetVisibility(True)
    return legend


def _colourNode(scene, name):
    nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", name)
    return nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None
