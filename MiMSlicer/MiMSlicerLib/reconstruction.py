"""MiM reconstructions in the scene: `engine reconstruct` writes, per level and view, the original, masked input,
reconstruction, error map and mask as R^3 NIfTI grids placed at their true RAS position, plus index.json. Here
every view becomes volume nodes at that place (fine views inside middle views inside the coarse view), its box a
markups ROI, each level's masks one segmentation; `show()` switches what the slice views display.

A run adds some 30 nodes (4 volumes per view): all are hidden from editors, so no node selector of Slicer lists
them, and they live in the run's subject-hierarchy folder, which the Data module shows; `removeRuns` deletes runs."""
import json
import os

import numpy as np
import slicer

from . import hierarchy, segmentationImport, sliceViews, volumeIO

INDEX_FORMAT = "mimslicer-reconstruction/1"
LAYERS = ("input", "masked", "reconstruction", "error")
LAYER_TITLES = {"input": "Original", "masked": "Masked input", "reconstruction": "Reconstruction", "error": "Error"}
LEVEL_COLOURS = {1: (1.0, 0.70, 0.10), 2: (0.15, 0.80, 1.0), 3: (1.0, 0.35, 0.85)}
ERROR_COLOUR_TABLES = ("Inferno", "PET-Heat", "Iron")
ATTRIBUTE = "MiMSlicer.reconstruction"


class ReconstructionView:
    def __init__(self, level, record):
        self.level = level
        self.index = int(record["index"])
        self.viewId = record["id"]
        self.parent = record.get("parent")
        box = record["box_world"]
        self.boxMin, self.boxMax = np.array(box["min"], float), np.array(box["max"], float)
        self.loss = record.get("loss")
        self.maskedFraction = record.get("masked_fraction")
        self.files = record["files"]
        self.volumes = {}
        self.roi = None
        self.maskSegmentID = ""

    @property
    def center(self):
        return (self.boxMin + self.boxMax) / 2

    @property
    def label(self):
        """One short line for the view list."""
        parts = [f"View {self.index + 1}"]
        if self.parent is not None:
            parts.append(f"in L{self.level.level - 1} view {self.parent + 1}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.2f}")
        return " · ".join(parts)


class ReconstructionLevel:
    def __init__(self, record):
        self.level = int(record["level"])
        self.name = record.get("name", f"level {self.level}")
        self.roiSize = record.get("roi")
        self.maskRatio = record.get("mask_ratio")
        self.views = [ReconstructionView(self, v) for v in record["views"]]
        self.maskSegmentation = None
        self.folderItem = 0

    @property
    def label(self):
        ratio = f", {100 * self.maskRatio:.0f}% masked" if self.maskRatio is not None else ""
        count = f"{len(self.views)} view" + ("s" if len(self.views) != 1 else "")
        return f"Level {self.level} · {self.name} ({count}{ratio})"


class Reconstruction:
    """The loaded result of one `engine reconstruct` run."""

    def __init__(self, index, sourceVolume):
        if index.get("format") != INDEX_FORMAT:
            raise RuntimeError(f"index.json has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
        self.index = index
        self.sourceVolume = sourceVolume
        self.levels = [ReconstructionLevel(r) for r in index["levels"]]
        self.folderItem = 0
        self.huWindow = tuple(index.get("hu_window", (-1000, 1000)))

    def level(self, number):
        return next(lv for lv in self.levels if lv.level == number)

    def view(self, levelNumber, viewIndex):
        return next(v for v in self.level(levelNumber).views if v.index == viewIndex)

    def allViews(self):
        return [v for lv in self.levels for v in lv.views]

    def nodes(self):
        out = []
        for lv in self.levels:
            out += [lv.maskSegmentation] if lv.maskSegmentation else []
            for v in lv.views:
                out += list(v.volumes.values()) + ([v.roi] if v.roi else [])
        return out

    def legendHtml(self):
        """Coloured squares naming the box colour of each level."""
        items = []
        for lv in self.levels:
            r, g, b = (int(255 * c) for c in LEVEL_COLOURS.get(lv.level, (1, 1, 1)))
            items.append(f'<span style="color:#{r:02x}{g:02x}{b:02x}">■</span> {lv.name}')
        return "Boxes: " + " &nbsp; ".join(items)

    def summary(self):
        views = self.allViews()
        losses = [v.loss for v in views if v.loss is not None]
        text = f"{len(self.levels)} levels, {len(views)} views"
        return text + (f", mean loss {np.mean(losses):.3f}" if losses else "")

    # -- display ---------------------------------------------------------------------------------------------
    def show(self, scene, levelNumber, viewIndex, layer="reconstruction", focus=True):
        """Slice views: the source CT behind, the chosen view's layer in front (only inside its box), that level's
        masks outlined, the view's box highlighted; slices centred on the view."""
        view = self.view(levelNumber, viewIndex)
        front = view.volumes[layer]
        background = self.sourceVolume or self.levels[0].views[0].volumes["input"]
        sliceViews.setLayers(scene, background, front, 0.65 if layer == "error" else 1.0)
        for lv in self.levels:
            if lv.maskSegmentation is not None:
                lv.maskSegmentation.GetDisplayNode().SetVisibility(lv.level == levelNumber)
            for v in lv.views:
                display = v.roi.GetDisplayNode() if v.roi else None
                if display is not None:
                    display.SetOpacity(1.0 if v is view else 0.35)
                    display.SetLineThickness(0.5 if v is view else 0.2)
        if focus:
            sliceViews.focus(scene, view.center, float(np.max(view.boxMax - view.boxMin)))
        return front


def loadReconstruction(scene, outDir, sourceVolume):
    """Read outDir/index.json and create all nodes (call inside a SceneTransaction: all or nothing)."""
    with open(os.path.join(outDir, "index.json"), encoding="utf-8") as f:
        result = Reconstruction(json.load(f), sourceVolume)
    shNode = hierarchy.shNode(scene)
    parentItem = hierarchy.parentOf(scene, sourceVolume) if sourceVolume is not None else shNode.GetSceneItemID()
    title = f"MiM reconstruction · {sourceVolume.GetName()}" if sourceVolume is not None else "MiM reconstruction"
    result.folderItem = shNode.CreateFolderItem(parentItem, scene.GenerateUniqueName(title))
    shNode.SetItemAttribute(result.folderItem, ATTRIBUTE, json.dumps(
        {"checkpoint": result.index.get("checkpoint"), "seed": result.index.get("seed")}))
    for lv in result.levels:
        lv.folderItem = shNode.CreateFolderItem(result.folderItem, lv.label)
        for view in lv.views:
            _loadView(scene, shNode, outDir, result, view)
        _loadMasks(scene, shNode, outDir, lv)
    errorRange = _errorDisplayRange(result)
    for view in result.allViews():
        _styleVolume(scene, view.volumes["error"], "error", result, errorRange)
    return result


def _loadView(scene, shNode, outDir, result, view):
    prefix = f"MiM L{view.level.level} V{view.index + 1}"
    for layer in LAYERS:
        node = volumeIO.readVolume(scene, os.path.join(outDir, view.files[layer]), f"{prefix} {LAYER_TITLES[layer].lower()}",
                                   hidden=True)
        node.SetAttribute(ATTRIBUTE, f"{view.level.level}/{view.index}/{layer}")
        if layer != "error":
            _styleVolume(scene, node, layer, result, None)
        hierarchy.moveUnder(scene, node, view.level.folderItem)
        view.volumes[layer] = node
    view.roi = _addBox(scene, f"{prefix} box", view, LEVEL_COLOURS.get(view.level.level, (1, 1, 1)))
    hierarchy.moveUnder(scene, view.roi, view.level.folderItem)


def _styleVolume(scene, node, layer, result, errorRange):
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    if layer == "error":
        colour = next((c for c in (_colourNodeByName(scene, n) for n in ERROR_COLOUR_TABLES) if c), None)
        if colour is not None:
            display.SetAndObserveColorNodeID(colour.GetID())
        display.SetWindowLevelMinMax(*errorRange)
        display.SetThreshold(errorRange[1] * 0.02, 1e9)  # near-perfect voxels stay see-through
        display.ApplyThresholdOn()
        return
    sourceDisplay = result.sourceVolume.GetDisplayNode() if result.sourceVolume is not None else None
    if sourceDisplay is not None and hasattr(sourceDisplay, "GetWindow"):
        display.SetWindowLevel(sourceDisplay.GetWindow(), sourceDisplay.GetLevel())
    else:
        display.SetWindowLevelMinMax(*result.huWindow)


def _errorDisplayRange(result):
    """One error scale for every view (0 .. 99th percentile of all errors, in HU), so colours compare across views."""
    errors = np.concatenate([slicer.util.arrayFromVolume(v.volumes["error"]).ravel() for v in result.allViews()])
    top = float(np.percentile(errors, 99)) if errors.size else 1.0
    return 0.0, max(top, 1.0)


def _addBox(scene, name, view, colour):
    roi = hierarchy.addNode(scene, "vtkMRMLMarkupsROINode", name, hidden=True)
    roi.SetXYZ(*view.center)
    roi.SetRadiusXYZ(*((view.boxMax - view.boxMin) / 2))
    roi.SetLocked(True)
    roi.SetAttribute(ATTRIBUTE, f"{view.level.level}/{view.index}/box")
    roi.CreateDefaultDisplayNodes()
    display = roi.GetDisplayNode()
    display.SetSelectedColor(*colour)
    display.SetColor(*colour)
    display.SetHandlesInteractive(False)
    display.SetFillOpacity(0.0)
    display.SetPropertiesLabelVisibility(False)
    return roi


def _loadMasks(scene, shNode, outDir, lv):
    """One segmentation per level, one segment per view (where the view's voxels were masked)."""
    segmentationNode = hierarchy.addNode(scene, "vtkMRMLSegmentationNode", f"MiM L{lv.level} masks", hidden=True)
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetAttribute(ATTRIBUTE, f"{lv.level}/masks")
    colour = LEVEL_COLOURS.get(lv.level, (1, 1, 1))
    for view in lv.views:
        labelNode = volumeIO.readVolume(scene, os.path.join(outDir, view.files["mask"]),
                                        segmentationImport.TEMP_LABELMAP_NAME, "vtkMRMLLabelMapVolumeNode")
        try:
            before = segmentationNode.GetSegmentation().GetNumberOfSegments()
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode):
                raise RuntimeError(f"could not read the mask of {view.viewId}")
            segmentation = segmentationNode.GetSegmentation()
            if segmentation.GetNumberOfSegments() == before:  # nothing masked in this view: keep an empty segment
                view.maskSegmentID = segmentation.AddEmptySegment("", f"V{view.index + 1} masked", colour)
            else:
                view.maskSegmentID = segmentation.GetNthSegmentID(before)
                segment = segmentation.GetSegment(view.maskSegmentID)
                segment.SetName(f"V{view.index + 1} masked")
                segment.SetColor(*colour)
        finally:
            volumeIO.removeNode(scene, labelNode)
    display = segmentationNode.GetDisplayNode()
    display.SetOpacity2DFill(0.12)
    display.SetOpacity2DOutline(0.9)
    display.SetVisibility(False)
    hierarchy.moveUnder(scene, segmentationNode, lv.folderItem)
    lv.maskSegmentation = segmentationNode


def runFolders(scene):
    """The subject-hierarchy folder of every reconstruction run in the scene, oldest first."""
    return sorted(hierarchy.itemsWithAttribute(scene, ATTRIBUTE), key=lambda item: item)


def removeRuns(scene, keep=None):
    """Delete every reconstruction run but `keep` (a Reconstruction, or None: all): nodes, display and storage
    nodes, folders. Returns how many runs were removed."""
    shNode = hierarchy.shNode(scene)
    folders = [f for f in runFolders(scene) if keep is None or f != keep.folderItem]
    for folder in folders:
        for node in hierarchy.dataNodesUnder(scene, folder):
            volumeIO.removeNode(scene, node)
        shNode.RemoveItem(folder, False, True)
    return len(folders)


def _colourNodeByName(scene, name):
    nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", name)
    node = nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None
    return node
