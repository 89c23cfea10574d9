"""`data check` reports each kind of bad entry; `data cache` builds a cache that pre-training then uses."""
import json
import struct

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from engine_testing import CT_2MM, crop_ct, require_shared_data, run_engine

from engine.data.check import check_dataset


def _nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def test_each_kind_of_bad_entry_is_reported(tmp_path):
    require_shared_data()
    good = crop_ct(CT_2MM / "pycerr_pat_2_ct.nii.gz", tmp_path / "good_ct.nii.gz", size=(32, 32, 32))
    label = tmp_path / "good_label.nii.gz"
    image = sitk.ReadImage(str(good))
    lab = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    lab.CopyInformation(image)
    lab[5, 5, 5] = 7  # 7 is not a declared label
    sitk.WriteImage(lab, str(label))
    shifted = tmp_path / "shifted_label.nii.gz"
    lab2 = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    lab2.CopyInformation(image)
    lab2.SetOrigin([o + 10 for o in image.GetOrigin()])
    sitk.WriteImage(lab2, str(shifted))
    raw = good.read_bytes()
    (tmp_path / "truncated_ct.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "corrupt_ct.nii.gz").write_bytes(b"not a volume" * 20)
    _nifti(tmp_path / "flat_ct.nii.gz", np.zeros((20, 20), np.int16))
    _nifti(tmp_path / "series_ct.nii.gz", np.zeros((20, 20, 20, 3), np.int16))
    nan = np.zeros((20, 20, 20), np.float32)
    nan[3, 3, 3] = np.nan
    _nifti(tmp_path / "nan_ct.nii.gz", nan)
    _nifti(tmp_path / "coarse_ct.nii.gz", np.zeros((20, 20, 20), np.int16), np.diag([50.0, 1, 1, 1]))
    _nifti(tmp_path / "huge_ct.nii", np.zeros((2, 2, 2), np.int16))
    header = bytearray((tmp_path / "huge_ct.nii").read_bytes())
    header[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)
    (tmp_path / "huge_ct.nii").write_bytes(bytes(header))
    entries = [{"image": p.name} for p in sorted(tmp_path.glob("*_ct.nii*"))]
    entries += [{"image": good.name, "label": label.name}, {"image": good.name, "label": shifted.name},
                {"image": "missing_ct.nii.gz"}]
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "training": entries}))
    report = check_dataset(str(dataset))
    problems = "\n".join(p for r in report["reports"] for p in r["problems"])
    for expected in ["truncated or corrupt", "found 2D", "found 4D", "NaN or infinite", "outside [0.05, 20.0]",
                     "refusing to allocate", "label values [7] are not declared", "differs from its image's",
                     "missing_ct.nii.gz: no such file"]:
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"
    assert report["ok"] == 1 and report["cases"] == len(entries)
    result = run_engine("data", "check", str(dataset), check=False)
    assert result.returncode == 1 and "with problems" in result.stdout


def test_cache_then_pretrain_uses_it(ct_dir, tmp_path):
    cache = tmp_path / "cache"
    run_engine("data", "cache", str(ct_dir), "--cache-dir", str(cache), "--preset", "tiny")
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    run_engine("pretrain", "--data", str(ct_dir), "--preset", "tiny", "--steps", "1", "--set",
               f"data.cache_dir={cache}", "--out", str(tmp_path / "run"), "--progress", "none")
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.pt"))] == stamps, "the cache was reused, not rebuilt"
