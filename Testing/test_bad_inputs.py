"""Every command that reads user data, against a corpus of bad inputs: one line naming the file and the problem,
exit status 2, no traceback, and no partial output left behind."""
import json
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from engine_testing import CT_2MM, crop_ct, require_shared_data

from engine.cli import main
from engine.config.finetune import build_finetune_config
from engine.models.segmenter import build_segmenter
from engine.runtime.checkpoint import save_checkpoint

KINDS = ["missing", "empty_folder", "corrupt_gzip", "truncated", "flat_2d", "series_4d", "nan_voxels",
         "absurd_header", "not_a_volume_folder"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One folder per kind of bad volume (each also holding nothing else), plus a good CT and label."""
    require_shared_data()
    root = tmp_path_factory.mktemp("corpus")
    (root / "good").mkdir()
    good = crop_ct(CT_2MM / "pycerr_pat_2_ct.nii.gz", root / "good" / "good_ct.nii.gz", size=(40, 40, 32))
    label = crop_ct(CT_2MM / "pycerr_pat_2_label.nii.gz", root / "good" / "good_label.nii.gz", size=(40, 40, 32))
    files = {}
    for kind in KINDS:
        (root / kind).mkdir()
    files["missing"] = root / "missing" / "gone_ct.nii.gz"
    files["empty_folder"] = root / "empty_folder"
    files["corrupt_gzip"] = root / "corrupt_gzip" / "x_ct.nii.gz"
    files["corrupt_gzip"].write_bytes(b"this is not a gzip stream" * 10)
    raw = good.read_bytes()
    files["truncated"] = root / "truncated" / "x_ct.nii.gz"
    files["truncated"].write_bytes(raw[: len(raw) * 2 // 3])
    files["flat_2d"] = _nifti(root / "flat_2d" / "x_ct.nii.gz", np.zeros((40, 40), np.int16))
    files["series_4d"] = _nifti(root / "series_4d" / "x_ct.nii.gz", np.zeros((20, 20, 20, 4), np.int16))
    nan = np.zeros((20, 20, 20), np.float32)
    nan[4, 5, 6] = np.inf
    nan[1, 1, 1] = np.nan
    files["nan_voxels"] = _nifti(root / "nan_voxels" / "x_ct.nii.gz", nan)
    huge = _nifti(root / "absurd_header" / "x_ct.nii", np.zeros((2, 2, 2), np.int16))
    header = bytearray(huge.read_bytes())
    header[40:56] = struct.pack("<8h", 3, 32000, 32000, 32000, 1, 1, 1, 1)
    huge.write_bytes(bytes(header))
    files["absurd_header"] = huge
    files["not_a_volume_folder"] = root / "not_a_volume_folder"
    (root / "not_a_volume_folder" / "notes.txt").write_text("no DICOM here")
    return {"root": root, "good": good, "label": label, "files": files}


def _nifti(path, array):
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = build_finetune_config("tiny", overrides={"model.feature_size": 4})
    labels = {"background": 0, "tumour": 1}
    net = build_segmenter("hybrid", cfg.encoder, cfg.model.roi, len(labels), cfg.model.feature_size)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, kind="segmentation", config=cfg.to_dict(), model=net, step=1,
                    extra={"labels": labels, "spacing": [4.0, 4.0, 4.0], "hu_window": [-1000, 1000], "roi": 32})
    return path


def _expect_one_line_error(argv, capsys, *needles, code=2):
    result = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert result == code, f"{argv}: exit {result}\n{err[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _file_or_folder(corpus, kind):
    return corpus["files"][kind]


@pytest.mark.parametrize("kind", KINDS)
def test_pretrain(kind, corpus, tmp_path, capsys):
    data = corpus["files"][kind] if kind in ("missing", "empty_folder", "not_a_volume_folder") else corpus["files"][kind].parent
    out = tmp_path / "run"
    _expect_one_line_error(["pretrain", "--data", str(data), "--out", str(out), "--steps", "1"], capsys,
                           str(data if kind != "missing" else corpus["files"][kind]).split("/")[-1])
    assert not out.exists(), "no run folder is left behind"


@pytest.mark.parametrize("kind", KINDS)
def test_infer(kind, corpus, model, tmp_path, capsys):
    out = tmp_path / "pred.nii.gz"
    source = _file_or_folder(corpus, kind)
    _expect_one_line_error(["infer", "--checkpoint", str(model), "--input", str(source), "--output", str(out)],
                           capsys, source.name)
    assert not list(tmp_path.iterdir()), "no partial output"


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("empty_folder", "not_a_volume_folder")])
def test_reconstruct(kind, corpus, tiny_pretrain_run, tmp_path, capsys):
    out = tmp_path / "recon"
    source = corpus["files"][kind]
    _expect_one_line_error(["reconstruct", "--checkpoint", str(tiny_pretrain_run / "checkpoint.pt"),
                            "--image", str(source), "--out", str(out)], capsys, source.name)
    assert not out.exists()


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("empty_folder", "not_a_volume_folder")])
def test_evaluate(kind, corpus, tmp_path, capsys):
    source = corpus["files"][kind]
    out = tmp_path / "scores.json"
    _expect_one_line_error(["evaluate", "--pred", str(source), "--ref", str(corpus["label"]), "--out", str(out)],
                           capsys, source.name)
    assert not out.exists()


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("missing", "empty_folder", "not_a_volume_folder")])
def test_finetune_and_data_check(kind, corpus, tmp_path, capsys):
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "training": [
        {"image": str(corpus["files"][kind]), "label": str(corpus["label"])},
        {"image": str(corpus["good"]), "label": str(corpus["label"])}]}))
    out = tmp_path / "ft"
    _expect_one_line_error(["finetune", "--data", str(dataset), "--out", str(out), "--steps", "1"], capsys,
                           corpus["files"][kind].name)
    assert not out.exists()
    assert main(["data", "check", str(dataset)]) == 1
    assert corpus["files"][kind].name in capsys.readouterr().out


def _label_case(corpus, tmp_path, transform):
    label = sitk.ReadImage(str(corpus["label"]))
    bad = transform(label)
    path = tmp_path / "bad_label.nii.gz"
    sitk.WriteImage(bad, str(path))
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "training": [
        {"image": str(corpus["good"]), "label": str(path)}, {"image": str(corpus["good"]), "label": str(corpus["label"])}]}))
    return dataset, path


def _shifted(label):
    moved = sitk.Image(label)
    moved.SetOrigin([o + 7.0 for o in label.GetOrigin()])
    return moved


def _undeclared(label):
    arr = sitk.GetArrayFromImage(label)
    arr[0, 0, 0] = 9
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    return out


@pytest.mark.parametrize("transform,needle", [(_shifted, "grid"), (_undeclared, "9")], ids=["geometry", "values"])
def test_label_problems(transform, needle, corpus, tmp_path, capsys):
    dataset, bad = _label_case(corpus, tmp_path, transform)
    out = tmp_path / "ft"
    line = _expect_one_line_error(["finetune", "--data", str(dataset), "--out", str(out), "--steps", "1"], capsys,
                                  bad.name)
    assert needle in line
    assert not out.exists()
    assert main(["data", "check", str(dataset)]) == 1


def test_labels_file_that_does_not_parse(corpus, tmp_path, capsys):
    broken = tmp_path / "dataset.json"
    broken.write_text('{"labels": {"background": 0, "tumour": 1}, "training": [')
    for argv in (["finetune", "--data", str(broken), "--out", str(tmp_path / "ft")],
                 ["pretrain", "--data", str(broken), "--out", str(tmp_path / "pt")],
                 ["evaluate", "--pred", str(corpus["label"]), "--ref", str(corpus["label"]), "--labels", str(broken)]):
        _expect_one_line_error(argv, capsys, "dataset.json")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "pt").exists()


def test_unwritable_output_paths(corpus, model, tiny_pretrain_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    _expect_one_line_error(["infer", "--checkpoint", str(model), "--input", str(corpus["good"]),
                            "--output", str(blocker / "pred.nii.gz")], capsys, "a_file")
    _expect_one_line_error(["pretrain", "--data", str(corpus["good"].parent), "--out", str(blocker / "run")],
                           capsys, "a_file")
    _expect_one_line_error(["reconstruct", "--checkpoint", str(tiny_pretrain_run / "checkpoint.pt"), "--image",
                            str(corpus["good"]), "--out", str(blocker / "recon")], capsys, "a_file")
