"""Which segmentations the user is working on, for the Fine-tune case list (no Qt: the widget gathers the
`changed` calls with a timer and rebuilds the list).

Segment Editor adds a segmentation node before it sets its CT, and painting adds no node, so a scene observer alone
misses both: every segmentation is observed from the moment it enters the scene. A case starts ticked only if the
user ticked it, added it by hand, or edited its segmentation (added, removed, renamed or painted a segment) after the
node was armed; a node is armed once the events of its creation have been handled, so loading a file or a model
writing its output is no edit."""
import slicer
import vtk
from slicer.util import VTKObservationMixin

# Events of a segmentation node: its CT is set or changed (Segment Editor sets it after adding the node) ...
CASE_EVENTS = (slicer.vtkMRMLNode.ReferenceAddedEvent, slicer.vtkMRMLNode.ReferenceModifiedEvent,
               slicer.vtkMRMLNode.ReferenceRemovedEvent)
# ... or its segments change: added, removed, renamed or recoloured, painted (the node relays these)
EDIT_EVENTS = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
               slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.SourceRepresentationModified)


class CaseWatch(VTKObservationMixin):
    """`changed()` when the case list may have changed; `busy()` true while the module itself adds nodes."""

    def __init__(self, scene, changed, busy):
        VTKObservationMixin.__init__(self)
        self.scene, self._changed, self._busy = scene, changed, busy
        self._nodes, self._armed, self._edited, self._ticks = {}, set(), set(), {}
        self.addObserver(scene, scene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(scene, scene.NodeRemovedEvent, self.onNodeRemoved)
        self.watchAll()

    def stop(self):
        self.removeObservers()

    def reset(self):
        """A new scene: nothing armed, edited or ticked."""
        self._armed, self._edited, self._ticks = set(), set(), {}

    # -- what starts ticked --------------------------------------------------------------------------------------
    def startsTicked(self, case):
        """`case`: a finetuneDataset.LabelledCase."""
        return self._ticks.get(case.key, case.segmentationNode.GetID() in self._edited)

    def setTicked(self, key, ticked):
        """The user's tick (or a case added by hand): kept through later edits."""
        self._ticks[key] = bool(ticked)

    def arm(self):
        """The events so far are handled: from now on, changes to the watched segmentations are the user's edits."""
        self._armed.update(self._nodes)

    # -- observing -----------------------------------------------------------------------------------------------
    def watchAll(self):
        """Observe every segmentation in the scene; forget removed ones."""
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
            self._watch(self.scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode"))
        for nodeID, node in list(self._nodes.items()):
            if not self.scene.IsNodePresent(node):
                for event, method in self._observers():
                    self.removeObserver(node, event, method)
                del self._nodes[nodeID]
                self._armed.discard(nodeID)

    def _observers(self):
        """(event, method): VTK gives a Python observer no usable id for these custom events, so one method each."""
        return [(e, self.onReferenceChanged) for e in CASE_EVENTS] + [(e, self.onEdited) for e in EDIT_EVENTS]

    def _watch(self, node):
        self._nodes[node.GetID()] = node
        for event, method in self._observers():
            if not self.hasObserver(node, event, method):
                self.addObserver(node, event, method)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, scene, event, node):
        if isinstance(node, slicer.vtkMRMLSegmentationNode):
            self._watch(node)
        self._notify()

    def onNodeRemoved(self, scene, event):
        self._notify()

    def onReferenceChanged(self, node, event):
        self._notify()

    def onEdited(self, node, event):
        if self._busy():
            return
        if node.GetID() in self._armed:
            self._edited.add(node.GetID())
        self._changed()

    def _notify(self):
        if not self._busy():
            self._changed()
