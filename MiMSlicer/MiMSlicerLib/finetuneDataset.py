"""Labelled cases in the scene -> a temporary MONAI decathlon-style dataset for `engine finetune`.

A case is a CT volume plus a segmentation drawn on it. Segment names become label values: the same structure must
carry the same name in every case (compared ignoring case, spaces, '_' and '-', and the order of 'left'/'right');
everything that could silently teach the model something wrong is explained before the run starts."""
import json
import os

import numpy as np
import slicer

from . import terminology, volumeIO
from .sceneTransaction import TemporaryNodes

DEFAULT_SEGMENT_PREFIXES = ("segment_", "segment ", "label_", "label ")
MODEL_OUTPUT_ATTRIBUTE = "MiMSlicer.modelOutput"


class LabelledCase:
    def __init__(self, volumeNode, segmentationNode):
        self.volumeNode, self.segmentationNode = volumeNode, segmentationNode

    @property
    def title(self):
        return f"{self.volumeNode.GetName()} + {self.segmentationNode.GetName()}"

    @property
    def key(self):
        return f"{self.volumeNode.GetID()}|{self.segmentationNode.GetID()}"

    @property
    def isModelOutput(self):
        """Made by `engine infer` and not yet confirmed by a person (not ticked by default)."""
        return (self.segmentationNode.GetAttribute(MODEL_OUTPUT_ATTRIBUTE) or "") != ""

    def segmentNames(self):
        segmentation = self.segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

    def segmentIDs(self):
        segmentation = self.segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


class LabelPlan:
    """labels: {name: value}; problems block the run; warnings are shown and the user may go ahead."""

    def __init__(self):
        self.labels = {}
        self.problems = []
        self.warnings = []
        self.notes = []
        self.segmentLabels = {}  # (segmentation node ID, segment ID) -> label value

    @property
    def ok(self):
        return not self.problems


def findLabelledCases(scene):
    """Segmentations whose reference geometry is a scalar volume in the scene (as the Segment Editor sets it)."""
    cases = []
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentationNode = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if segmentationNode.GetAttribute("MiMSlicer.reconstruction"):
            continue  # reconstruction masks are not labels
        volume = segmentationNode.GetNodeReference(role)
        if isinstance(volume, slicer.vtkMRMLScalarVolumeNode) and not isinstance(volume, slicer.vtkMRMLLabelMapVolumeNode):
            cases.append(LabelledCase(volume, segmentationNode))
    return cases


def planLabels(cases, labels=None):
    """Map segment names to label values over all cases. `labels` fixes the mapping (e.g. to continue a model);
    otherwise names are numbered in order of first appearance."""
    plan = LabelPlan()
    if not cases:
        plan.problems.append("Choose at least one labelled case (a CT volume with a segmentation).")
        return plan
    canonical = {}  # normalised name -> label name used in the dataset
    if labels:
        for name, value in sorted(labels.items(), key=lambda kv: kv[1]):
            plan.labels[name] = int(value)
            canonical[terminology.normaliseName(name)] = name
    for case in cases:
        _planCase(plan, canonical, case, fixed=bool(labels))
    for case in cases:
        present = {terminology.normaliseName(n) for n in case.segmentNames()}
        for name in plan.labels:
            if terminology.normaliseName(name) not in present:
                plan.warnings.append(f"{case.title} has no '{name}' segment: there its {name} would be learnt "
                                     f"as background. Add the segment, or leave this case out.")
    if len(cases) == 1:
        plan.warnings.append("Only one case: it is used for training and for validation, so the validation Dice "
                             "will look better than the model is.")
    if not plan.labels and not plan.problems:
        plan.problems.append("The chosen segmentations have no segments.")
    return plan


def _planCase(plan, canonical, case, fixed):
    names = case.segmentNames()
    if not names:
        plan.problems.append(f"{case.title} has no segments.")
    for segmentID, name in zip(case.segmentIDs(), names):
        key = terminology.normaliseName(name)
        if key.startswith(tuple(p.strip() for p in DEFAULT_SEGMENT_PREFIXES)) or not key:
            plan.warnings.append(f"{case.title}: '{name}' looks like a default name; rename it to the structure it "
                                 f"shows so it matches the other cases.")
        if key not in canonical:
            if fixed:
                plan.problems.append(f"{case.title}: segment '{name}' is not one of the model's labels "
                                     f"({', '.join(plan.labels)}); rename or remove it.")
                continue
            canonical[key] = name
            plan.labels[name] = len(plan.labels) + 1
        elif canonical[key] != name:
            plan.notes.append(f"{case.title}: '{name}' counted as '{canonical[key]}'.")
        plan.segmentLabels[(case.segmentationNode.GetID(), segmentID)] = plan.labels[canonical[key]]
        if _isEmpty(case, segmentID):
            plan.warnings.append(f"{case.title}: segment '{name}' is empty.")


def _isEmpty(case, segmentID):
    segment = case.segmentationNode.GetSegmentation().GetSegment(segmentID)
    representation = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if representation is None:
        return False  # closed-surface only: exported voxels decide
    array = slicer.util.arrayFromSegmentInternalBinaryLabelmap(case.segmentationNode, segmentID)
    return array is None or not np.any(array == segment.GetLabelValue())


def exportDataset(scene, cases, plan, folder):
    """Write images, labelmaps (on each CT's own grid) and dataset.json into `folder`; return dataset.json's path."""
    if not plan.ok:
        raise ValueError("; ".join(plan.problems))
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    records = []
    for i, case in enumerate(cases):
        image = volumeIO.writeVolume(case.volumeNode, os.path.join(folder, "imagesTr", f"case{i:03d}.nii.gz"))
        label = _writeLabelmap(scene, case, plan, os.path.join(folder, "labelsTr", f"case{i:03d}.nii.gz"))
        records.append({"image": os.path.relpath(image, folder), "label": os.path.relpath(label, folder)})
    validation = [r for i, r in enumerate(records) if i % 5 == 4 or (len(records) > 1 and i == len(records) - 1)]
    training = [r for r in records if r not in validation] or records
    dataset = {"name": "MiMSlicer fine-tune", "labels": {"background": 0, **plan.labels},
               "training": training, "validation": validation or records}
    path = os.path.join(folder, "dataset.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataset, f, indent=2)
    return path


def _writeLabelmap(scene, case, plan, path):
    """The case's segments as one labelmap on the CT's own grid, with the plan's label values."""
    segmentIDs = [i for i in case.segmentIDs() if plan.segmentLabels.get((case.segmentationNode.GetID(), i))]
    with TemporaryNodes(scene):  # the labelmap, and the colour table the export makes for it
        labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MiMSlicer_export")
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            case.segmentationNode, segmentIDs, labelNode, case.volumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not exported or not volumeIO.sameGeometry(labelNode, case.volumeNode):
            raise ValueError(f"{case.title}: the segmentation could not be put on the CT's grid")
        order = slicer.util.arrayFromVolume(labelNode)  # 1..n in the order of segmentIDs (later ones on top)
        table = np.array([0] + [plan.segmentLabels[(case.segmentationNode.GetID(), i)] for i in segmentIDs])
        table = table.astype(np.uint8 if table.max() < 256 else np.uint16)
        values = table[order]
        if not values.any():
            raise ValueError(f"{case.title}: no labelled voxel lies inside the CT volume")
        slicer.util.updateVolumeFromArray(labelNode, values)
        return volumeIO.writeVolume(labelNode, path)
