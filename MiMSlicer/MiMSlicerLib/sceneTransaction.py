"""All-or-nothing scene updates: results are loaded inside a SceneTransaction; if anything fails half way, every
node and subject-hierarchy folder added since it opened is removed again, so the scene is never left
half-updated. Loading runs synchronously on the GUI thread, so nothing else adds nodes meanwhile."""
import logging

import vtk
import slicer

log = logging.getLogger("MiMSlicer")


class SceneTransaction:
    """Context manager: on an exception inside the block, remove what the block added and re-raise."""

    def __init__(self, scene):
        self.scene = scene
        self._nodeIDs = set()
        self._itemIDs = set()

    def __enter__(self):
        self._nodeIDs = set(self._currentNodeIDs())
        self._itemIDs = set(self._currentItemIDs())
        return self

    def __exit__(self, excType, exc, tb):
        if excType is not None:
            self.rollback()
        return False

    def addedNodes(self):
        return [self.scene.GetNodeByID(i) for i in self._currentNodeIDs() if i not in self._nodeIDs]

    def rollback(self):
        added = self.addedNodes()
        for node in reversed(added):
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        shNode = self._shNode()
        newItems = [i for i in self._currentItemIDs() if i not in self._itemIDs]
        for item in reversed(newItems):
            if shNode.GetItemName(item) and shNode.GetItemDataNode(item) is None:
                shNode.RemoveItem(item, False, True)
        if added or newItems:
            log.debug("MiMSlicer: removed %d nodes and %d folders", len(added), len(newItems))

    def _currentNodeIDs(self):
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]

    def _shNode(self):
        return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    def _currentItemIDs(self):
        shNode = self._shNode()
        ids = vtk.vtkIdList()
        shNode.GetItemChildren(shNode.GetSceneItemID(), ids, True)
        return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


class TemporaryNodes(SceneTransaction):
    """Context manager for scratch work: every node added inside the block is removed at its end, always."""

    def __exit__(self, excType, exc, tb):
        self.rollback()
        return False
