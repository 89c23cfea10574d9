"""dataset.json: indexing folders, reading descriptors, reproducible case selection, integrity checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from engine.cli import main
from engine.data.labelled import (
    case_name,
    index_folder,
    load_classification_dataset,
    load_dataset,
    parse_label_names,
    select_cases,
    verify_cases,
)
from engine.errors import UserError
from engine.runtime.atomic import write_json


def _volume(path, values: np.ndarray, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _pair(folder, name, label_values=(0, 1), image_name=None, label_name=None):
    ct = np.full((4, 5, 6), -1000, np.int16)
    lab = np.zeros((4, 5, 6), np.uint8)
    for i, v in enumerate(label_values):
        lab[i, 0, 0] = v
    _volume(folder / (image_name or f"{name}_ct.nii.gz"), ct)
    _volume(folder / (label_name or f"{name}_label.nii.gz"), lab)


def test_case_names_pair_files_across_conventions():
    assert case_name("/a/liver_003_0000.nii.gz") == "liver_003"
    assert case_name("x/pat_1_ct.nii.gz") == case_name("x/pat_1_label.nii.gz") == "pat_1"
    assert case_name("pat_1_seg.nrrd") == "pat_1"


def test_index_pairs_folder_with_names_folds_and_relative_paths(tmp_path):
    for i in range(6):
        _pair(tmp_path / "data", f"case{i}", label_values=(0, 1, 2))
    _volume(tmp_path / "data" / "unlabelled_ct.nii.gz", np.zeros((2, 2, 2), np.int16))
    out = tmp_path / "meta" / "dataset.json"
    assert main(["data", "index", str(tmp_path / "data"), "-o", str(out), "--labels", "heart=1", "aorta=2",
                 "--folds", "3"]) == 0
    tree = json.loads(out.read_text())
    assert tree["labels"] == {"background": 0, "heart": 1, "aorta": 2}
    assert sorted(it["fold"] for it in tree["training"]) == [0, 0, 1, 1, 2, 2]
    assert all(it["image"].startswith("../data/") for it in tree["training"])
    assert [it["name"] for it in tree["test"]] == ["unlabelled"]
    ds = load_dataset(out)
    assert ds.foreground == {"heart": 1, "aorta": 2}
    assert all(p.endswith("_label.nii.gz") for p in (it["label"] for it in ds.training))


def test_index_nnunet_folder_names_labels_from_values(tmp_path):
    root = tmp_path / "Dataset001"
    for i in range(2):
        _pair(root, f"liver_{i:03d}", (0, 1, 5), image_name=f"imagesTr/liver_{i:03d}_0000.nii.gz",
              label_name=f"labelsTr/liver_{i:03d}.nii.gz")
    tree = index_folder(root, tmp_path / "dataset.json")
    assert tree["labels"] == {"background": 0, "label_1": 1, "label_5": 5}
    assert [it["name"] for it in tree["training"]] == ["liver_000", "liver_001"]


def test_decathlon_style_labels_are_accepted(tmp_path):
    _pair(tmp_path, "a")
    tree = {"labels": {"0": "background", "1": "tumour"}, "training": [{"image": "a_ct.nii.gz", "label": "a_label.nii.gz"}]}
    path = write_json(tree, tmp_path / "d.json")
    assert load_dataset(path).labels == {"background": 0, "tumour": 1}


def test_selection_is_reproducible_and_respects_folds(tmp_path):
    for i in range(10):
        _pair(tmp_path / "d", f"c{i}")
    path = write_json(index_folder(tmp_path / "d", tmp_path / "d.json", {"background": 0, "x": 1}, folds=5),
                             tmp_path / "d.json")
    ds = load_dataset(path)
    a = select_cases(ds, fold=2, train_cases=3, seed=7)
    b = select_cases(ds, fold=2, train_cases=3, seed=7)
    names = lambda sel: [it["name"] for it in sel.training]  # noqa: E731
    assert names(a) == names(b) and len(names(a)) == 3
    draws = {tuple(names(select_cases(ds, fold=2, train_cases=3, seed=s))) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    assert {it["fold"] for it in a.validation} == {2} and len(a.validation) == 2
    assert not {it["name"] for it in a.validation} & set(names(a))
    with pytest.raises(UserError, match="--fold 7"):
        select_cases(ds, fold=7)
    with pytest.raises(UserError, match="training pool has 8"):
        select_cases(ds, fold=2, train_cases=9)
    whole = select_cases(ds)
    assert whole.validation == whole.training and "no held-out" in whole.note


def test_verify_catches_undeclared_values_and_misaligned_labels(tmp_path):
    _pair(tmp_path, "a", (0, 1, 3))
    case = {"image": str(tmp_path / "a_ct.nii.gz"), "label": str(tmp_path / "a_label.nii.gz")}
    with pytest.raises(UserError, match=r"label values \[3\]"):
        verify_cases([case], {"background": 0, "x": 1})
    verify_cases([case], {"background": 0, "x": 1, "y": 3})
    _volume(tmp_path / "a_label.nii.gz", np.zeros((4, 5, 6), np.uint8), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(UserError, match="spacing"):
        verify_cases([case], {"background": 0, "x": 1})


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such dataset file"):
        load_dataset(tmp_path / "missing.json")
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_label_names(["heart"])
    with pytest.raises(UserError, match="no image/label pairs"):
        index_folder(tmp_path, tmp_path / "d.json")


def test_classification_list_from_csv(tmp_path):
    for i in range(4):
        _volume(tmp_path / f"v{i}.nii.gz", np.zeros((2, 2, 2), np.int16))
    (tmp_path / "labels.csv").write_text("image,label,fold\n" + "".join(
        f"v{i}.nii.gz,{'malignant' if i % 2 else 'benign'},{i % 2}\n" for i in range(4)))
    ds = load_classification_dataset(tmp_path / "labels.csv")
    assert ds.classes == ["benign", "malignant"]
    assert [it["label"] for it in ds.training] == [0, 1, 0, 1]
    sel = select_cases(ds, fold=1)
    assert [it["label"] for it in sel.validation] == [1, 1]
