"""What the slice views show, through their MRML nodes (composite and slice nodes): the same calls drive desktop
Slicer's views and, in tests, Slicer's slice pipeline rendered offscreen."""
import slicer


def setLayers(scene, background, foreground=None, foregroundOpacity=1.0):
    """Background and foreground volume of every slice view (foreground None: nothing in front)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(foregroundOpacity)


def focus(scene, center, size):
    """Centre every slice view on `center` (RAS) with a field of view of 1.6 times `size` (mm) on its short side."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(c) for c in center], slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        sliceNode = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        fov = sliceNode.GetFieldOfView()
        aspect = fov[1] / fov[0] if fov[0] else 1.0
        width = 1.6 * size / min(aspect, 1.0)
        sliceNode.SetFieldOfView(width, width * aspect, fov[2])
