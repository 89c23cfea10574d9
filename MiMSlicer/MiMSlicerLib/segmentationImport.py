"""An engine labelmap file -> a segmentation node: one named, coloured segment per declared label (empty when the
model found nothing), standard terminology where the name is a known structure, the input volume as reference
geometry, and placed beside the input volume (same study) in the subject hierarchy."""
import numpy as np
import slicer

from . import hierarchy, terminology, volumeIO

TEMP_LABELMAP_NAME = "__MiMSlicer_labelmap"


def importLabelmap(scene, labelPath, referenceVolume, labels, name):
    """labels: {segment name: label value} (background excluded). Returns the new segmentation node.
    Runs inside a SceneTransaction: on error the caller rolls back what was added."""
    ordered = sorted(((int(v), n) for n, v in labels.items() if int(v) > 0))
    labelNode = volumeIO.readVolume(scene, labelPath, TEMP_LABELMAP_NAME, "vtkMRMLLabelMapVolumeNode")
    colourNode = _colourTable(scene, ordered)
    try:
        if not volumeIO.sameGeometry(labelNode, referenceVolume):
            raise RuntimeError(f"the labelmap {labelPath} is not on the grid of '{referenceVolume.GetName()}'")
        undeclared = sorted(set(np.unique(slicer.util.arrayFromVolume(labelNode)).tolist()) - {0, *dict(ordered)})
        if undeclared:
            raise RuntimeError(f"the labelmap has label values {undeclared} that its label list does not name")
        labelNode.GetDisplayNode().SetAndObserveColorNodeID(colourNode.GetID())
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode):
            raise RuntimeError(f"could not turn {labelPath} into segments")
        _completeSegments(segmentationNode, ordered)
    finally:
        volumeIO.removeNode(scene, labelNode)
        volumeIO.removeNode(scene, colourNode)
    placeBesideVolume(scene, segmentationNode, referenceVolume)
    return segmentationNode


def _colourTable(scene, ordered):
    """A temporary colour table naming each label value, so the import names and colours the segments."""
    colourNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "__MiMSlicer_labels")
    colourNode.SetTypeToUser()
    colourNode.SetNumberOfColors((ordered[-1][0] if ordered else 0) + 1)
    colourNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for index, (value, segmentName) in enumerate(ordered):
        colourNode.SetColor(value, segmentName, *terminology.colourFor(segmentName, index), 1.0)
    return colourNode


def _completeSegments(segmentationNode, ordered):
    """Empty segments for labels the model did not find; order by label value; terminology where known."""
    segmentation = segmentationNode.GetSegmentation()
    for index, (value, segmentName) in enumerate(ordered):
        segmentID = segmentation.GetSegmentIdBySegmentName(segmentName)
        if not segmentID:
            segmentID = segmentation.AddEmptySegment(segmentName, segmentName,
                                                     terminology.colourFor(segmentName, index))
        segmentation.SetSegmentIndex(segmentID, index)
        segment = segmentation.GetSegment(segmentID)
        segment.SetTag("MiMSlicer.labelValue", str(value))
        entry = terminology.terminologyEntry(segmentName)
        if entry and hasattr(segment, "SetTerminology"):
            segment.SetTerminology(entry)
        elif entry:  # Slicer before 5.8
            segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def placeBesideVolume(scene, node, volumeNode):
    """Put `node` under the same subject-hierarchy parent (study, folder) as `volumeNode`."""
    hierarchy.moveUnder(scene, node, hierarchy.parentOf(scene, volumeNode))


def segmentNamesAndColours(segmentationNode):
    segmentation = segmentationNode.GetSegmentation()
    return [(segmentation.GetNthSegment(i).GetName(), segmentation.GetNthSegment(i).GetColor())
            for i in range(segmentation.GetNumberOfSegments())]
