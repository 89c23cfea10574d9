"""An irregular DICOM series as Slicer's DICOM loader leaves it (acquisition-geometry regularisation): the slices on a
grid at their averaged spacing, under a non-linear transform that moves each slice to where it was acquired. The
module sends the engine what the loader regularised, never the raw slices, and says so in the task's log."""
import nibabel as nib
import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from mimslicer_testing import DATA, cropNifti, loadVolume
from MiMSlicerLib import tasks, volumeIO

LOST = 5  # the slice the export lost


def realCtWithALostSlice(tmp_path):
    """A real CT crop (2 mm slices) without slice LOST, as SimpleITK or Slicer stack it: 11 slices spread evenly
    from the first to the last, 2.2 mm apart. Returns the stack's file and the crop."""
    crop = cropNifti(DATA / "pycerr_pat_2_ct.nii.gz", tmp_path / "crop.nii.gz", (14, 14, 12), (40, 40, 12))
    image = nib.load(str(crop))
    kept = np.delete(np.asarray(image.dataobj), LOST, axis=2)
    affine = image.affine.copy()
    affine[:3, 2] *= (image.shape[2] - 1) / (kept.shape[2] - 1)  # 11 slices over the 12-slice extent
    stacked = nib.Nifti1Image(kept, affine)
    stacked.set_qform(affine, code=1)
    stacked.set_sform(affine, code=1)
    nib.save(stacked, str(tmp_path / "stacked.nii.gz"))
    return tmp_path / "stacked.nii.gz", image


def acquisitionTransform(scene, volume, acquiredAffine):
    """A grid transform that moves each slice of `volume` to where it was acquired (slices 0..LOST-1 and
    LOST+1.. of the acquired grid), as the DICOM loader builds one: displacements in RAS, one grid point per slice
    corner."""
    dims = volume.GetImageData().GetDimensions()
    ijkToRas = volumeIO.ijkToRas(volume)
    acquiredK = [k if k < LOST else k + 1 for k in range(dims[2])]
    grid = vtk.vtkImageData()
    grid.SetDimensions(2, 2, dims[2])
    grid.SetSpacing(*(np.linalg.norm(ijkToRas[:3, a]) * (dims[a] - 1 if a < 2 else 1) for a in range(3)))
    grid.SetOrigin(*ijkToRas[:3, 3])
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacement = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(dims[2], 2, 2, 3)
    for k, acquired in enumerate(acquiredK):
        shift = (acquiredAffine @ [0, 0, acquired, 1] - ijkToRas @ [0, 0, k, 1])[:3]
        displacement[k] = shift
    gridTransform = slicer.vtkOrientedGridTransform()
    direction = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            direction.SetElement(r, c, ijkToRas[r, c] / np.linalg.norm(ijkToRas[:3, c]))
    gridTransform.SetGridDirectionMatrix(direction)
    gridTransform.SetDisplacementGridData(grid)
    gridTransform.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Acquisition transform")
    node.SetAndObserveTransformToParent(gridTransform)
    volume.SetAndObserveTransformNodeID(node.GetID())
    return node


def expectedVoxels(acquired, spacing):
    """The acquired slices (all but LOST) interpolated linearly along k at the stacked grid's slice positions."""
    data = np.asarray(acquired.dataobj).astype(np.float64)  # [i, j, k]
    kept = [k for k in range(data.shape[2]) if k != LOST]
    at = np.arange(len(kept)) * spacing / np.linalg.norm(acquired.affine[:3, 2])  # in acquired slice units
    out = np.empty(data.shape[:2] + (len(kept),))
    for m, position in enumerate(at):
        upper = next(n for n, k in enumerate(kept) if k >= position - 1e-6)
        if abs(kept[upper] - position) < 1e-6 or upper == 0:
            out[..., m] = data[..., kept[upper]]
            continue
        lo, hi = kept[upper - 1], kept[upper]
        w = (position - lo) / (hi - lo)
        out[..., m] = (1 - w) * data[..., lo] + w * data[..., hi]
    return out


def test_the_engine_gets_the_series_where_the_loader_placed_it(scene, tmp_path):
    stacked, acquired = realCtWithALostSlice(tmp_path)
    volume = loadVolume(stacked, "CT")
    raw = nib.load(str(stacked))
    acquisitionTransform(scene, volume, acquired.affine)
    task = tasks.SegmentTask(scene, volume, model=str(tmp_path / "model.pt"))
    task.prepare(str(tmp_path))
    written = nib.load(str(tmp_path / "input.nii"))
    assert np.allclose(written.affine, raw.affine, atol=1e-4)  # the volume's own grid: the segmentation fits it
    got = np.asarray(written.dataobj).astype(np.float64)
    want = expectedVoxels(acquired, np.linalg.norm(raw.affine[:3, 2]))
    assert np.abs(got - want).max() <= 1.0  # HU, stored as integers
    after = slice(LOST, None)  # the raw slices there lie 0.2-2 mm from where they were acquired: 14 HU off on average
    assert np.abs(np.asarray(raw.dataobj) - want)[..., after].mean() > 10
    assert any("non-linear transform" in line for line in task.logLines)
    assert slicer.util.arrayFromVolume(volume).transpose(2, 1, 0).tolist() == np.asarray(raw.dataobj).tolist()


def test_a_linear_transform_is_still_not_applied(scene, tmp_path):
    stacked, _ = realCtWithALostSlice(tmp_path)
    volume = loadVolume(stacked, "CT")
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 30.0)
    moved.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(moved.GetID())
    task = tasks.SegmentTask(scene, volume, model=str(tmp_path / "model.pt"))
    task.prepare(str(tmp_path))
    written, raw = nib.load(str(tmp_path / "input.nii")), nib.load(str(stacked))
    assert np.allclose(written.affine, raw.affine, atol=1e-4) and not task.logLines
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(raw.dataobj))
