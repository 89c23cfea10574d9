"""Volumes between the scene and the engine's files, through MRML storage nodes (the same code path in desktop
Slicer and in slicer-core), so geometry (IJK to RAS) is carried by the files, never by array order."""
import gzip
import os
import struct
import zlib

import numpy as np
import vtk
import slicer

from . import hierarchy


def writeVolume(volumeNode, path):
    """Write a scalar or labelmap volume (NIfTI/NRRD by extension). Linear world transforms are not applied: the
    engine sees the volume's own RAS geometry, as a file saved from Slicer would have. A non-linear one is: it is
    how Slicer's DICOM loader regularises an irregular series (missing slices, gantry tilt: its acquisition
    transform), so the engine gets what the loader regularised, not the raw slices at their averaged spacing."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.UseCompressionOff()
    if not storage.WriteData(regularised(volumeNode)):
        raise RuntimeError(f"could not write '{volumeNode.GetName()}' to {path}")
    return os.fspath(path)


def hasNonLinearTransform(volumeNode):
    parent = volumeNode.GetParentTransformNode()
    return parent is not None and not parent.IsTransformToWorldLinear()


def regularised(volumeNode):
    """The volume itself or, under a non-linear transform, a copy outside the scene resampled through it onto the
    volume's own grid: the voxels where the transform shows them, as hardening the transform in Slicer gives."""
    if not hasNonLinearTransform(volumeNode) or isinstance(volumeNode, slicer.vtkMRMLLabelMapVolumeNode):
        return volumeNode
    toWorld = vtk.vtkGeneralTransform()
    volumeNode.GetParentTransformNode().GetTransformToWorld(toWorld)
    copy = slicer.vtkMRMLScalarVolumeNode()
    image = vtk.vtkImageData()
    image.DeepCopy(volumeNode.GetImageData())
    copy.SetAndObserveImageData(image)
    copy.SetIJKToRASMatrix(ijkToRasMatrix(volumeNode))
    copy.ApplyNonLinearTransform(toWorld)
    return copy


def readVolume(scene, path, name, className="vtkMRMLScalarVolumeNode", hidden=False):
    """A new volume node (with display node) filled from a file. The node keeps no link to the file, so the
    file may be deleted afterwards; saving the scene writes the data anew. `hidden`: kept out of node selectors."""
    node = hierarchy.addNode(scene, className, name, hidden)
    readVolumeInto(node, path)
    node.CreateDefaultDisplayNodes()
    return node


def readVolumeInto(node, path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the engine did not write {path}")
    if path.endswith((".nii", ".nii.gz")):
        checkNiftiComplete(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    if isinstance(node, slicer.vtkMRMLLabelMapVolumeNode):
        storage.SetSingleFile(True)
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read {path}")
    return node


def checkNiftiComplete(path):
    """Raise if a NIfTI-1 file is truncated or corrupt (the MRML reader would silently give a zero-filled volume)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(352)
            if len(header) < 348:
                raise ValueError("header cut short")
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            expected = offset + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bitpix // 8
            size = len(header)
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as err:
        raise RuntimeError(f"{os.path.basename(path)} is unreadable ({err})") from None
    if size < expected:
        raise RuntimeError(f"{os.path.basename(path)} is truncated ({size} of {expected} bytes)")


def removeNode(scene, node):
    """Remove a node with its display and storage nodes (the MRML library alone leaves those behind)."""
    if node is None or not scene.IsNodePresent(node):
        return
    helpers = []
    for getCount, getNth in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                             ("GetNumberOfStorageNodes", "GetNthStorageNode")):
        if hasattr(node, getCount):
            helpers += [getattr(node, getNth)(i) for i in range(getattr(node, getCount)())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def ijkToRasMatrix(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def ijkToRas(volumeNode):
    return slicer.util.arrayFromVTKMatrix(ijkToRasMatrix(volumeNode))


def voxelCornerBounds(volumeNode):
    """RAS (min, max) of the volume's voxel-corner extent (what the engine calls box_world)."""
    dims = volumeNode.GetImageData().GetDimensions()
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, dims[0] - 0.5) for j in (-0.5, dims[1] - 0.5)
                        for k in (-0.5, dims[2] - 0.5)])
    ras = corners @ ijkToRas(volumeNode).T
    return ras[:, :3].min(axis=0), ras[:, :3].max(axis=0)


def sameGeometry(volumeA, volumeB, tolerance=1e-3):
    """True when both volumes have the same grid: dimensions and IJK to RAS."""
    if volumeA.GetImageData() is None or volumeB.GetImageData() is None:
        return False
    if volumeA.GetImageData().GetDimensions() != volumeB.GetImageData().GetDimensions():
        return False
    return np.allclose(ijkToRas(volumeA), ijkToRas(volumeB), atol=tolerance)
