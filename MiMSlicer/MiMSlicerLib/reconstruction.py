"""MiM reconstructions in the scene: `engine reconstruct` writes, per level and view, the original, masked input,
reconstruction, error map and mask as R^3 NIfTI grids placed at their true RAS position, plus index.json. Here
every view becomes volume nodes at that place (fine views inside middle views inside the coarse view), its box a
markups ROI, each level's masks one segmentation; `show()` switches what the slice views display."""
import json
import os

import numpy as np
import slicer

from . import segmentationImport, volumeIO

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
        """One line for the view list."""
        parts = [f"View {self.index + 1}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.maskedFraction is not None:
            parts.append(f"{100 * self.maskedFraction:.0f}% masked")
        if self.parent is not None:
            parts.append(f"inside view {self.parent + 1} of level {self.level.level - 1}")
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
        opacity = 0.65 if layer == "error" else 1.0
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(background.GetID())
            composite.SetForegroundVolumeID(front.GetID())
            composite.SetForegroundOpacity(opacity)
        for lv in self.levels:
            if lv.maskSegmentation is not None:
                lv.maskSegmentation.GetDisplayNode().SetVisibility(lv.level == levelNumber)
            for v in lv.views:
                display = v.roi.GetDisplayNode() if v.roi else None
                if display is not None:
                    display.SetOpacity(1.0 if v is view else 0.35)
                    display.SetLineThickness(0.5 if v is view else 0.2)
        if focus:
            focusSliceViews(scene, view.center, float(np.max(view.boxMax - view.boxMin)))
        return front


def focusSliceViews(scene, center, size):
    """Centre every slice view on `center` with a field of view 1.6 times `size` (mm)."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(c) for c in center], slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        sliceNode = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        fov = sliceNode.GetFieldOfView()
        aspect = fov[1] / fov[0] if fov[0] else 1.0
        width = 1.6 * size / min(1.0, aspect) if aspect < 1 else 1.6 * size
        sliceNode.SetFieldOfView(width, width * aspect, fov[2])


def loadReconstruction(scene, outDir, sourceVolume, tx):
    """Read outDir/index.json and create all nodes. `tx` is the open SceneTransaction (folders, rollback)."""
    with open(os.path.join(outDir, "index.json"), encoding="utf-8") as f:
        result = Reconstruction(json.load(f), sourceVolume)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parentItem = shNode.GetSceneItemID()
    if sourceVolume is not None and shNode.GetItemByDataNode(sourceVolume):
        parentItem = shNode.GetItemParent(shNode.GetItemByDataNode(sourceVolume))
    title = f"MiM reconstruction · {sourceVolume.GetName()}" if sourceVolume is not None else "MiM reconstruction"
    result.folderItem = shNode.CreateFolderItem(parentItem, scene.GenerateUniqueName(title))
    shNode.SetItemAttribute(result.folderItem, ATTRIBUTE, outDir)
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
        node = volumeIO.readVolume(scene, os.path.join(outDir, view.files[layer]), f"{prefix} {LAYER_TITLES[layer].lower()}")
        node.SetAttribute(ATTRIBUTE, f"{view.level.level}/{view.index}/{layer}")
        if layer != "error":
            _styleVolume(scene, node, layer, result, None)
        shNode.SetItemParent(shNode.GetItemByDataNode(node), view.level.folderItem)
        view.volumes[layer] = node
    view.roi = _addBox(scene, f"{prefix} box", view, LEVEL_COLOURS.get(view.level.level, (1, 1, 1)))
    shNode.SetItemParent(shNode.GetItemByDataNode(view.roi), view.level.folderItem)


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
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
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
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"MiM L{lv.level} masks")
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
            scene.RemoveNode(labelNode)
    display = segmentationNode.GetDisplayNode()
    display.SetOpacity2DFill(0.12)
    display.SetOpacity2DOutline(0.9)
    display.SetVisibility(False)
    shNode.SetItemParent(shNode.GetItemByDataNode(segmentationNode), lv.folderItem)
    lv.maskSegmentation = segmentationNode


def _colourNodeByName(scene, name):
    nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", name)
    node = nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None
    return node
