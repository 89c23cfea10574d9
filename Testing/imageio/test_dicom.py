"""Irregular DICOM series as they arrive from PACS, each built from a real CT series on disk by editing its files with
pydicom (remove, duplicate, rename, shift, shear, re-orient, re-tag). Each kind gets one behaviour, the same in
`infer`, `data check`, `pretrain` and `finetune`: refused in one line (exit 2, nothing written) or resampled onto a
regular grid on which every voxel lies where it was acquired, said in one line and recorded in the sidecar."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from engine_testing import real_ct_series

from engine.cli import main
from engine.config.finetune import build_finetune_config
from engine.data.check import check_dataset
from engine.errors import UserError
from engine.imageio import slices as kinds
from engine.imageio.dicom import read_dicom, series_geometry
from engine.imageio.volumes import read_header, read_image
from engine.models.segmenter import build_segmenter
from engine.runtime.checkpoint import save_checkpoint

PIXEL_MM = 0.9765625  # the series' pixel spacing
MANY = 10**9  # voxels: no memory limit in these tests


def _slices(folder: Path) -> list[Path]:
    """The slice files, in order along the normal (+z for this axial series)."""
    return sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _reordered(folder):  # file names and instance numbers in reverse order: still a regular series
    files = _slices(folder)
    for n, f in enumerate(files):
        f.rename(folder / f"tmp{n}.dcm")
    for n in range(len(files)):
        path = folder / f"x{len(files) - 1 - n:03d}.dcm"
        (folder / f"tmp{n}.dcm").rename(path)
        _edit(path, lambda ds, n=n: setattr(ds, "InstanceNumber", len(files) - n))


def _remove(*indices):
    def remove(folder):
        files = _slices(folder)
        for k in indices:
            files[k].unlink()
    return remove


def _duplicate(k):
    def duplicate(folder):
        copy = folder / "copy.dcm"
        shutil.copy(_slices(folder)[k], copy)
        _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", ds.SOPInstanceUID + ".99"))
    return duplicate


def _move(ds, shift):
    ds.ImagePositionPatient = [float(p) + s for p, s in zip(ds.ImagePositionPatient, shift)]


def _shift_from(k, mm):  # slices k.. move along the normal: one gap of 3 + mm
    def shift(folder):
        for f in _slices(folder)[k:]:
            _edit(f, lambda ds: _move(ds, (0, 0, mm)))
    return shift


def _shear(mm_per_slice):  # each slice shifted along its columns: a gantry tilt
    def shear(folder):
        for n, f in enumerate(_slices(folder)):
            _edit(f, lambda ds, n=n: _move(ds, (0, n * mm_per_slice, 0)))
    return shear


def _reorient(k):
    def reorient(folder):
        _edit(_slices(folder)[k], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    return reorient


def _other_frame(k):
    def other(folder):
        for f in _slices(folder)[k:]:
            _edit(f, lambda ds: setattr(ds, "FrameOfReferenceUID", ds.FrameOfReferenceUID + ".2"))
    return other


def _second_acquisition(folder):  # a second pass 1.5 mm off the first, interleaved with it in one series
    for n, f in enumerate(_slices(folder)):
        copy = folder / f"second{n:03d}.dcm"
        shutil.copy(f, copy)

        def second(ds):
            ds.SOPInstanceUID, ds.AcquisitionNumber = ds.SOPInstanceUID + ".2", 2
            _move(ds, (0, 0, 1.5))
        _edit(copy, second)


def _unplace(k):
    def unplace(folder):
        _edit(_slices(folder)[k], lambda ds: delattr(ds, "ImagePositionPatient"))
    return unplace


# name -> (edit, kind, what the one line says)
RESAMPLED = {
    "missing": (_remove(9), kinds.MISSING, ("slice 10 missing: 6.00 mm between positions -471.5 and -465.5, "
                                            "expected 3.00")),
    "non_uniform": (_shift_from(12, 1.4), kinds.NON_UNIFORM, "slice spacing varies from 3.00 to 4.40 mm"),
    "tilted": (_shear(PIXEL_MM), kinds.TILTED, "gantry tilt of 18.0°"),
}
REFUSED = {
    "gap": (_remove(8, 9, 10), kinds.TOO_WIDE, "slices 9-11 missing: 12.00 mm between positions -474.5 and -462.5"),
    "duplicate": (_duplicate(5), kinds.DUPLICATE, "1 pair(s) of slices at the same position: -480.5 mm"),
    "mixed": (_reorient(7), kinds.MIXED, "slices in 2 orientations"),
    "two_frames": (_other_frame(12), kinds.SEVERAL, "2 frames of reference"),
    "two_acquisitions": (_second_acquisition, kinds.SEVERAL, "acquisitions 1 (24 slices"),
    "unplaced": (_unplace(4), kinds.UNPLACED, "no readable Image Position/Orientation"),
}
CASES = {"reordered": (_reordered, kinds.REGULAR, ""), **RESAMPLED, **REFUSED}


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict:
    """The real series, and one edited copy of it per case (with the real series' label file beside each)."""
    root = tmp_path_factory.mktemp("dicom")
    regular, label = real_ct_series(root / "regular")
    cases = {"regular": regular}
    for name, (edit, _, _) in CASES.items():
        cases[name] = root / name
        shutil.copytree(regular, cases[name])
        edit(cases[name])
    return {"root": root, "label": label, **cases}


@pytest.mark.parametrize("name", list(CASES))
def test_each_kind_is_told_from_the_headers_alone(name, series):
    _, kind, words = CASES[name]
    if name in REFUSED:
        with pytest.raises(UserError) as err:
            series_geometry(series[name])
        assert words in str(err.value) and str(series[name]) in str(err.value)
        return
    _, geometry = series_geometry(series[name])
    assert geometry.kinds == (kind,) and words in geometry.describe()


def test_reordered_files_read_as_the_regular_series(series):
    regular, reordered = read_image(series["regular"]), read_image(series["reordered"])
    assert _grid(reordered) == _grid(regular)
    assert np.array_equal(sitk.GetArrayFromImage(reordered), sitk.GetArrayFromImage(regular))


def test_a_missing_slice_is_filled_in_at_its_place(series):
    regular = read_image(series["regular"])
    filled = read_dicom(series["missing"], MANY).image
    assert _same_grid(filled, regular)  # the grid of the series before the slice was lost
    want, got = sitk.GetArrayFromImage(regular).astype(np.float32), sitk.GetArrayFromImage(filled)
    acquired = [k for k in range(want.shape[0]) if k != 9]
    assert np.array_equal(got[acquired], want[acquired])  # every acquired slice where it was, untouched
    assert np.allclose(got[9], (want[8] + want[10]) / 2)  # the missing one, linear between its neighbours
    naive = sitk.ReadImage([str(f) for f in _slices(series["missing"])])  # SimpleITK alone: averaged spacing
    assert naive.GetSize()[2] == 23 and naive.GetSpacing()[2] == pytest.approx(69 / 22)


def test_a_non_uniform_series_is_interpolated_at_the_true_positions(series):
    files = _slices(series["non_uniform"])
    z = np.array([float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files])
    pixels = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float32) for f in files])  # [k, rows, columns]
    image = read_dicom(series["non_uniform"], MANY).image
    assert image.GetSize()[2] == 24 and image.GetSpacing()[2] == pytest.approx((z[-1] - z[0]) / 23)
    got = sitk.GetArrayFromImage(image)
    for k in range(image.GetSize()[2]):
        at = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        expected = np.array([np.interp(at, z, pixels[:, j, i]) for j, i in ((0, 0), (40, 40), (79, 13))])
        assert np.allclose([got[k, 0, 0], got[k, 40, 40], got[k, 79, 13]], expected, atol=1e-3), k
    assert got[0].tolist() == pixels[0].tolist() and got[-1].tolist() == pixels[-1].tolist()


def test_a_tilted_series_puts_every_pixel_where_it_was_acquired(series):
    image = read_dicom(series["tilted"], MANY).image
    assert image.GetSize() == (80, 80 + 23, 24)  # one more row per slice of shear
    got = sitk.GetArrayFromImage(image)
    for f in _slices(series["tilted"])[::5]:
        ds = pydicom.dcmread(f)
        corner = np.array(ds.ImagePositionPatient, dtype=float)
        for j, i in ((0, 0), (17, 61), (79, 79)):
            world = corner + np.array([i * PIXEL_MM, j * PIXEL_MM, 0.0])  # rows along x, columns along y
            index = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(world)))
            assert np.allclose(index, np.round(index), atol=1e-6)
            x, y, k = np.round(index).astype(int)
            assert got[k, y, x] == pytest.approx(float(ds.pixel_array[j, i]), abs=1e-3)
    assert got.min() == pytest.approx(-1024.0)  # outside each tilted slice: air


def test_the_header_says_the_grid_before_any_voxel_is_read(series):
    for name in ("regular", "missing", "tilted"):
        header, image = read_header(series[name]), read_image(series[name])
        assert header.size == image.GetSize() and np.allclose(header.spacing, image.GetSpacing())


def _grid(image):
    return image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def _same_grid(a, b) -> bool:
    return a.GetSize() == b.GetSize() and all(np.allclose(x, y, atol=1e-6) for x, y in zip(_grid(a)[1:], _grid(b)[1:]))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny segmentation model.pt (untrained: these tests are about where the labelmap lies)."""
    cfg = build_finetune_config("tiny", overrides={"model.feature_size": 4})
    labels = {"background": 0, "tumour": 1}
    torch.manual_seed(0)
    net = build_segmenter("hybrid", cfg.encoder, cfg.model.roi, len(labels), cfg.model.feature_size)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, kind="segmentation", config=cfg.to_dict(), model=net, step=1,
                    extra={"labels": labels, "spacing": [4.0, 4.0, 4.0], "hu_window": [-1000, 1000], "roi": 32})
    return path


def _said(caplog) -> list[str]:
    """The engine's one-line reports of a resampled series (in-process, its warnings go to pytest's log capture)."""
    return [r.getMessage() for r in caplog.records if "resampled onto a regular grid" in r.getMessage()]


def _one_line_error(argv, capfd, words) -> str:
    code = main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert words in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", list(REFUSED))
def test_infer_refuses_in_one_line_and_writes_nothing(name, series, model, tmp_path, capfd):
    out = tmp_path / "out"
    _one_line_error(["infer", "--checkpoint", str(model), "--input", str(series[name]), "--output",
                     str(out / "seg.nii.gz"), "--progress", "none"], capfd, REFUSED[name][2])
    assert not out.exists()


@pytest.mark.parametrize("name", list(RESAMPLED))
def test_infer_resamples_says_so_and_records_it(name, series, model, tmp_path, capfd, caplog):
    out = tmp_path / "seg.nii.gz"
    assert main(["infer", "--checkpoint", str(model), "--input", str(series[name]), "--output", str(out),
                 "--progress", "none"]) == 0
    said = _said(caplog)
    assert len(said) == 1 and RESAMPLED[name][2] in said[0], said
    assert "Non uniform sampling" not in capfd.readouterr().err  # SimpleITK's own warning: we said it better
    record = json.loads(out.with_name("seg.json").read_text())["dicom"]
    assert record["geometry"] == [RESAMPLED[name][1]] and record["resampled"] and record["message"] in said[0]
    written, read = sitk.ReadImage(str(out)), read_dicom(series[name], MANY).image
    assert written.GetSize() == read.GetSize() == tuple(record["grid"]["size"])
    assert _same_grid(written, read) and np.allclose(written.GetOrigin(), record["grid"]["origin"], atol=1e-5)


def test_infer_on_a_regular_series_records_it_as_such(series, model, tmp_path, caplog):
    out = tmp_path / "seg.nii.gz"
    assert main(["infer", "--checkpoint", str(model), "--input", str(series["reordered"]), "--output", str(out),
                 "--progress", "none"]) == 0
    assert not _said(caplog)
    record = json.loads(out.with_name("seg.json").read_text())["dicom"]
    assert record == {"series": "1.2.826.0.1.3680043.2.1125.1.20", "slices": 24, "geometry": ["regular"],
                      "resampled": False}
    assert _same_grid(sitk.ReadImage(str(out)), read_image(series["regular"]))


def test_data_check_lists_every_kind_for_a_whole_dataset(series, tmp_path, capfd):
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "training": [
        {"image": str(series[name])} for name in CASES]}))
    report = check_dataset(str(dataset))
    by_image = {Path(r["image"]).name: r for r in report["reports"]}
    for name, (_, _, words) in CASES.items():
        problems, notes = by_image[name]["problems"], by_image[name]["notes"]
        if name in REFUSED:
            assert len(problems) == 1 and words in problems[0] and not notes, (name, problems, notes)
        elif name in RESAMPLED:
            assert not problems and len(notes) == 1 and words in notes[0], (name, problems, notes)
        else:
            assert not problems and not notes
    assert report["ok"] == 1 + len(RESAMPLED) and report["notes"] == len(RESAMPLED)
    assert main(["data", "check", str(series["root"])]) == 1  # the folder: every series folder under it
    out = capfd.readouterr().out
    assert f"{len(CASES) + 1} case(s): {2 + len(RESAMPLED)} fine, {len(REFUSED)} with problems; " \
           f"{len(RESAMPLED)} DICOM series will be resampled (~)" in out
    assert out.count("\n  - ") == len(REFUSED) and out.count("\n  ~ ") == len(RESAMPLED)


@pytest.mark.parametrize("name", list(REFUSED))
def test_pretrain_refuses_in_one_line_and_writes_nothing(name, series, tmp_path, capfd):
    out = tmp_path / "run"
    _one_line_error(["pretrain", "--data", str(series[name]), "--out", str(out), "--preset", "tiny", "--steps", "1",
                     "--progress", "none"], capfd, REFUSED[name][2])
    assert not out.exists()


@pytest.mark.parametrize("name", list(REFUSED))
def test_finetune_refuses_in_one_line_and_writes_nothing(name, series, tmp_path, capfd):
    dataset = _labelled(tmp_path, [series[name], series["regular"]], series["label"])
    out = tmp_path / "ft"
    _one_line_error(["finetune", "--data", str(dataset), "--out", str(out), "--steps", "1", "--progress", "none"],
                    capfd, REFUSED[name][2])
    assert not out.exists()


def _labelled(folder: Path, images: list[Path], label: Path) -> Path:
    dataset = folder / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "tumour": 1, "cord": 2, "lung_r": 3, "lung_l": 4},
                                   "training": [{"image": str(i), "label": str(label)} for i in images]}))
    return dataset


def test_pretrain_on_resampled_series_says_so_once_each(series, tmp_path, caplog):
    data = tmp_path / "data"  # new folders: a resampled series is said once per folder and process
    for name in ("reordered", *RESAMPLED):
        shutil.copytree(series[name], data / name)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1",
                 "--progress", "none"]) == 0
    said = _said(caplog)
    assert sorted(Path(line.split(": ")[0]).name for line in said) == sorted(RESAMPLED), said
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_finetune_on_a_series_with_a_missing_slice_uses_its_own_label(series, tmp_path, caplog):
    """The filled-in series lies on the regular series' grid, so the label drawn on that grid fits it exactly."""
    shutil.copytree(series["missing"], tmp_path / "missing")  # a new folder: said once per folder and process
    dataset = _labelled(tmp_path, [tmp_path / "missing"], series["label"])
    assert main(["finetune", "--data", str(dataset), "--out", str(tmp_path / "ft"), "--steps", "1",
                 "--progress", "none"]) == 0
    said = _said(caplog)
    assert len(said) == 1 and RESAMPLED["missing"][2] in said[0], said
    assert (tmp_path / "ft" / "model.pt").exists()
