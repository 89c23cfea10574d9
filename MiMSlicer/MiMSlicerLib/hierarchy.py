"""Subject hierarchy placement. Desktop Slicer makes an item for every new data node that is not hidden from editors;
the slicer-core library alone does not, so `itemFor` makes one when it is missing (never a second one)."""
import slicer
import vtk


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


def addNode(scene, className, name, hidden=False):
    """A new node named `name`. `hidden`: kept out of every node selector and of the Data module's tree (Slicer reads
    HideFromEditors when the node enters the scene, so it is set before); it still gets a subject-hierarchy item
    from `moveUnder`, so deleting its folder deletes it."""
    node = scene.CreateNodeByClass(className)
    node.UnRegister(None)  # CreateNodeByClass hands over a reference the Python object already holds
    node.SetName(name)
    node.SetHideFromEditors(hidden)
    return scene.AddNode(node)


def dataNodesUnder(scene, folderItem):
    """Every data node in the folder's subtree."""
    hierarchy, children = shNode(scene), vtk.vtkIdList()
    hierarchy.GetItemChildren(folderItem, children, True)
    nodes = (hierarchy.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds()))
    return [node for node in nodes if node is not None]


def itemsWithAttribute(scene, name):
    """Subject-hierarchy items (folders included) that carry the attribute `name`."""
    hierarchy, items = shNode(scene), vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), items, True)
    found = (items.GetId(i) for i in range(items.GetNumberOfIds()))
    return [item for item in found if hierarchy.GetItemAttribute(item, name)]
