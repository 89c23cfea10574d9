"""Helpers for the Slicer module tests (imported by name, so they never clash with another folder's conftest)."""
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = (REPO / ".." / "shared" / "data" / "ct-2mm").resolve()
SHOTS = os.environ.get("MIMSLICER_SHOTS")  # set it to also get copies of the screenshots there


def addSliceViews(scene):
    """The three slice views' MRML nodes, as Slicer's layout manager makes them (no rendering here)."""
    import slicer
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        if scene.GetSingletonNode(name, "vtkMRMLSliceNode") is None:
            sliceNode = scene.CreateNodeByClass("vtkMRMLSliceNode")
            sliceNode.UnRegister(None)
            sliceNode.SetName(name)
            sliceNode.SetLayoutName(name)
            sliceNode.SetSingletonTag(name)
            sliceNode.SetOrientation(orientation)
            sliceNode.SetFieldOfView(250.0, 250.0, 1.0)
            scene.AddNode(sliceNode)
        if scene.GetSingletonNode(name, "vtkMRMLSliceCompositeNode") is None:
            composite = slicer.vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(name)
            composite.SetSingletonTag(name)
            scene.AddNode(composite)


def cropNifti(source, target, start, size):
    """Crop a NIfTI to voxels [start, start+size) along i, j, k, keeping its physical placement."""
    image = nib.load(str(source))
    i, j, k = start
    a, b, c = size
    data = np.asarray(image.dataobj)[i:i + a, j:j + b, k:k + c]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array(start, float) + image.affine[:3, 3]
    out = nib.Nifti1Image(data, affine, image.header)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, str(target))
    return target


def loadVolume(path, name=None):
    """A volume node from a file, with its subject-hierarchy item, as Slicer's Add Data makes it."""
    import slicer
    from MiMSlicerLib import hierarchy, volumeIO
    node = volumeIO.readVolume(slicer.mrmlScene, str(path), name or Path(path).name.split(".")[0])
    hierarchy.itemFor(slicer.mrmlScene, node)
    return node


def loadLabelsAsSegmentation(volume, labelPath, names):
    """A segmentation drawn on `volume` (as a user would have): one segment per label value, reference = volume."""
    import slicer
    from MiMSlicerLib import segmentationImport
    from MiMSlicerLib.sceneTransaction import SceneTransaction
    with SceneTransaction(slicer.mrmlScene):
        return segmentationImport.importLabelmap(slicer.mrmlScene, str(labelPath), volume, names,
                                                 f"{volume.GetName()} labels")


def saveShot(widget, tmp_path, name):
    """Grab a widget to PNG in tmp_path and copy it to SHOTS for a person to look at."""
    import shutil
    path = tmp_path / f"{name}.png"
    assert widget.grab().save(str(path))
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        shutil.copy(path, os.path.join(SHOTS, path.name))
    return path


def renderSliceView(scene, name, path, size=320):
    """Render a slice view (background + foreground blend) with Slicer's own vtkMRMLSliceLogic, offscreen, to PNG.
    Segmentation outlines and markups are drawn by displayable managers, which need a render window: not here."""
    import slicer
    import vtk
    from vtk.util import numpy_support
    sliceNode = scene.GetSingletonNode(name, "vtkMRMLSliceNode")
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
    logic.SetMRMLScene(scene)
    logic.SetSliceNode(sliceNode)
    sliceNode.SetDimensions(size, size, 1)
    logic.UpdateSliceNode()
    logic.UpdateImageData()
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        shutil.copy(path, os.path.join(SHOTS, Path(path).name))
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)


def sampleVolumeAt(volumeNode, rasPoints):
    """Nearest-voxel values of a volume at RAS points (N x 3); NaN outside."""
    import slicer
    import vtk
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(matrix)
    rasToIjk = slicer.util.arrayFromVTKMatrix(matrix)
    ijk = np.rint((np.c_[rasPoints, np.ones(len(rasPoints))] @ rasToIjk.T)[:, :3]).astype(int)
    array = slicer.util.arrayFromVolume(volumeNode)  # k, j, i
    inside = np.all((ijk >= 0) & (ijk < np.array(array.shape[::-1])), axis=1)
    values = np.full(len(rasPoints), np.nan)
    values[inside] = array[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    return values


def voxelCentres(volumeNode):
    """RAS of every voxel centre, in arrayFromVolume order."""
    from MiMSlicerLib import volumeIO
    dims = volumeNode.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(*[np.arange(d) for d in dims[::-1]], indexing="ij")
    ijk = np.c_[i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]
    return (ijk @ volumeIO.ijkToRas(volumeNode).T)[:, :3]
