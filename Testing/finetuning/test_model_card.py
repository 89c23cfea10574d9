"""The model card and the provenance model.pt records: a real fine-tuning run on lung crops whose manifest.json
records licences (one of them CC BY-NC 3.0), and the card's rules on hand-made checkpoints (unknown licences,
validation on the training cases, older model.pt files without provenance)."""
from __future__ import annotations

import json

import monai
import torch

import engine
from engine.data.labelled import CaseSelection
from engine.finetuning.model_card import TO_FILL, model_card
from engine.finetuning.provenance import UNKNOWN, run_provenance
from engine.runtime.checkpoint import load_checkpoint


def test_model_pt_records_versions_and_where_its_cases_come_from(lung_run, lung_data):
    model = load_checkpoint(lung_run / "model.pt")
    versions = model["versions"]
    assert (versions["engine"], versions["torch"], versions["monai"]) == \
        (engine.__version__, torch.__version__, monai.__version__)
    provenance = model["provenance"]
    manifest = {e["case"]: e for e in json.loads((lung_data.parent / "manifest.json").read_text())}
    cases = json.loads((lung_run / "cases.json").read_text())
    assert [c["name"] for c in provenance["training"]] == [c["name"] for c in cases["training"]]
    for case in provenance["training"] + provenance["validation"]:
        assert case["licence"] == manifest[case["name"]]["licence"]
        assert case["label_kind"] == manifest[case["name"]]["label_kind"]
        assert case["licence_from"].endswith("manifest.json")
    assert provenance["validation_held_out"] is True and provenance["pretrained"] is None
    assert load_checkpoint(lung_run / "checkpoint.pt")["provenance"] == provenance  # what --resume keeps


def test_model_card_beside_model_pt_says_what_model_pt_records(lung_run):
    model = load_checkpoint(lung_run / "model.pt")
    card = (lung_run / "MODEL_CARD.md").read_text()
    assert card == model_card(model)  # rewritten with every model.pt
    for name in ("lung_right", "lung_left"):
        assert f"| {name} |" in card
    for case in model["provenance"]["training"]:
        assert f"| {case['name']} | {case['licence']} |" in card
    assert "CC BY-NC 3.0" in card and "non-commercial use only" in card
    assert "held-out cases (none of them trained on)" in card
    assert f"| val_mean_dice | {model['metrics']['val_mean_dice']:.4f} |" in card
    assert "[3.0, 3.0, 3.0] mm" in card and "[-1000, 1000] HU" in card and "4 planned" in card
    assert f"| torch | {torch.__version__} |" in card and f"| monai | {monai.__version__} |" in card
    assert "MiM: Mask in Mask" in card and "HybridMIM" in card and "arXiv:2404.15580" in card
    assert "Not a medical device" in card
    assert f"Licence under which this model is released: {TO_FILL}" in card


def _checkpoint(training: list[dict], validation: list[dict], held_out: bool) -> dict:
    return {"kind": "segmentation", "step": 3, "labels": {"background": 0, "tumour": 1},
            "metrics": {"val_mean_dice": 0.5, "dice/tumour": 0.5},
            "config": {"preset": "tiny", "data": {"spacing": [3.0, 3.0, 3.0], "hu_window": [-1000, 1000]}},
            "provenance": {"dataset": "d.json", "training": training, "validation": validation,
                           "validation_held_out": held_out, "selection": {"note": ""}, "pretrained": None}}


def test_unknown_licences_are_left_to_fill_and_validation_on_training_cases_is_flagged():
    case = {"name": "mine", "licence": UNKNOWN}
    card = model_card(_checkpoint([case], [case], held_out=False))
    assert f"| mine | {TO_FILL} (not recorded) |" in card
    assert f"Licence of the training data whose licence was not recorded: {TO_FILL}" in card
    assert "the training cases themselves (no held-out case)" in card
    assert "non-commercial" not in card


def test_a_model_pt_without_provenance_still_gets_a_card():
    ckpt = {"kind": "segmentation", "step": 1, "labels": {"background": 0, "liver": 1}, "config": {}}
    card = model_card(ckpt)
    assert "not recorded in this model.pt" in card and "| 1 | liver |" in card


def test_licence_comes_from_the_case_then_the_dataset_then_a_manifest(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}_ct.nii.gz").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps([{"case": "a", "licence": "CC BY 4.0", "source": "web"},
                                                        {"ct": "b_ct.nii.gz", "licence": "CC BY-NC 3.0"}]))
    dataset = tmp_path / "dataset.json"
    a = {"image": str(tmp_path / "a_ct.nii.gz"), "name": "a"}
    b = {"image": str(tmp_path / "b_ct.nii.gz"), "name": "b", "licence": "mine, CC0"}
    dataset.write_text("{}")
    found = run_provenance(dataset, CaseSelection([a, b], [a], None, None, 0), None)
    assert [(c["licence"], c["licence_from"]) for c in found["training"]] == \
        [("CC BY 4.0", str(tmp_path / "manifest.json")), ("mine, CC0", "dataset.json entry")]
    assert found["training"][0]["source"] == "web" and found["validation_held_out"] is False
    dataset.write_text(json.dumps({"licence": "CC BY-SA 4.0"}))  # a decathlon dataset.json's top-level licence
    found = run_provenance(dataset, CaseSelection([a], [], None, None, 0), None)
    assert (found["training"][0]["licence"], found["training"][0]["licence_from"]) == ("CC BY-SA 4.0", "dataset.json")
    (tmp_path / "manifest.json").unlink()
    dataset.write_text("{}")
    found = run_provenance(dataset, CaseSelection([a], [], None, None, 0), None)
    assert (found["training"][0]["licence"], found["training"][0]["licence_from"]) == (UNKNOWN, None)
