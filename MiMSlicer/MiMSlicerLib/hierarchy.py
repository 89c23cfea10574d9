"""Subject hierarchy placement. Desktop Slicer makes an item for every new data node; the slicer-core library
alone does not, so `itemFor` makes one when it is missing (never a second one)."""
import slicer


def shNode(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def itemFor(scene, node):
    hierarchy = shNode(scene)
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    return item


def moveUnder(scene, node, parentItem):
    hierarchy = shNode(scene)
    hierarchy.SetItemParent(itemFor(scene, node), parentItem)


def parentOf(scene, node):
    """The item holding `node` (its study, patient or folder), or the scene item."""
    hierarchy = shNode(scene)
    return hierarchy.GetItemParent(itemFor(scene, node)) or hierarchy.GetSceneItemID()
