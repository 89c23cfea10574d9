"""The model card of a fine-tuned model (MODEL_CARD.md beside model.pt, docs/README.md in an exported bundle),
written from what model.pt records: task and labels, grid and window, training length and cases with their
licences, validation Dice and whether it came from held-out cases, software versions, intended use and limits,
citations. What the engine cannot know (the licence of unrecorded data, who releases the model) is left as a
field marked TO FILL."""
from __future__ import annotations

from pathlib import Path

from engine.imageio.geometry import plain_numbers
from engine.runtime.atomic import write_text

MODEL_CARD = "MODEL_CARD.md"
TO_FILL = "**TO FILL**"
NON_COMMERCIAL = ("NC", "non-commercial", "noncommercial")
REFERENCES = {
    "mim": "J. Zhuang, L. Wu, Q. Wang, P. Fei, V. Vardhanabhuti, L. Luo, H. Chen. MiM: Mask in Mask Self-Supervised "
           "Pre-Training for 3D Medical Image Analysis. IEEE Transactions on Medical Imaging, 2025. arXiv:2404.15580.",
    "hybridmim": "Z. Xing et al. HybridMIM: A Hybrid Masked Image Modeling Framework for 3D Medical Image "
                 "Segmentation. arXiv:2303.10333, 2023.",
    "monai": "M. J. Cardoso et al. MONAI: An open-source framework for deep learning in healthcare. "
             "arXiv:2211.02701, 2022.",
}


def write_model_card(ckpt: dict, path: str | Path) -> Path:
    return write_text(model_card(ckpt), path)


def model_card(ckpt: dict) -> str:
    """Markdown for a model.pt's contents (a checkpoint dict as `load_checkpoint` returns it)."""
    sections = (_title, _model, _training, _validation, _licences, _intended_use, _software, _citations)
    return "\n\n".join(section(ckpt) for section in sections).rstrip() + "\n"


def _title(ckpt: dict) -> str:
    what = ", ".join(foreground_names(ckpt)) if ckpt.get("kind") == "segmentation" else \
        ", ".join(ckpt.get("classes") or [])
    return (f"# Model card: CT {ckpt.get('kind', 'model')} ({what})\n\n"
            f"Written by the MiMSlicer engine from `model.pt` (step {ckpt.get('step')}). Fields marked {TO_FILL} "
            "are for whoever releases the model: the engine cannot know them.\n\n"
            f"- Released by / contact: {TO_FILL}\n- Model version: {TO_FILL}")


def foreground_names(ckpt: dict) -> list[str]:
    labels = ckpt.get("labels") or {}
    return [name for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if value != 0]


def _model(ckpt: dict) -> str:
    cfg = ckpt.get("config") or {}
    model, data, encoder = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("encoder") or {}
    lines = ["## Model", "",
             f"- Task: {ckpt.get('kind')} of CT volumes (one channel, Hounsfield units)",
             f"- Network: `{model.get('backbone')}` ({cfg.get('preset')} preset); encoder dims {encoder.get('dims')}, "
             f"depths {encoder.get('depths')}; decoder width {model.get('feature_size')}",
             f"- Input: the CT turned to the nearest RAS orientation, resampled to {data.get('spacing')} mm, "
             f"clipped to the window {_numbers(data.get('hu_window'))} HU and scaled to [0, 1]; windows of "
             f"{model.get('roi')}^3 voxels",
             f"- Pre-trained weights: {_pretrained(ckpt)}"]
    if ckpt.get("kind") == "segmentation":
        lines += ["- Output: one channel per label (softmax); the label map lies on the input's own grid", "",
                  "| value | label |", "|---|---|"]
        lines += [f"| {value} | {name} |" for name, value in sorted((ckpt.get("labels") or {}).items(),
                                                                   key=lambda kv: kv[1])]
    else:
        lines.append(f"- Output: one score per class, classes {ckpt.get('classes')}")
    return "\n".join(lines)


def _pretrained(ckpt: dict) -> str:
    pretrained = (ckpt.get("provenance") or {}).get("pretrained")
    if not pretrained:
        return "none (trained from scratch)" if ckpt.get("provenance") else "not recorded"
    method = f", method {pretrained['method']}" if pretrained.get("method") else ""
    return f"`{pretrained.get('path')}` ({pretrained.get('family')}{method})"


def _training(ckpt: dict) -> str:
    cfg, provenance = ckpt.get("config") or {}, ckpt.get("provenance") or {}
    train, crop = cfg.get("train") or {}, cfg.get("crop") or {}
    lines = ["## Training", "",
             f"- Steps: {train.get('steps')} planned; this model is the one of step {ckpt.get('step')} "
             "(the best validation score so far)",
             f"- Optimiser: AdamW, learning rate {train.get('lr')} (warm-up {train.get('warmup_steps')} steps, "
             f"cosine), batch {(cfg.get('data') or {}).get('batch_size')} volume(s) x {crop.get('samples')} crops, "
             f"seed {train.get('seed')}; encoder frozen: {cfg.get('freeze_encoder')}",
             f"- Dataset: `{provenance.get('dataset', 'not recorded')}`", ""]
    lines += _case_table("Training cases", provenance.get("training"))
    return "\n".join(lines)


def _case_table(title: str, cases: list[dict] | None) -> list[str]:
    if cases is None:
        return [f"{title}: not recorded in this model.pt (made by an older engine)."]
    rows = [f"{title} ({len(cases)}):", "", "| case | licence | source | label kind |", "|---|---|---|---|"]
    for case in cases:
        licence = case.get("licence") or "unknown"
        licence = f"{TO_FILL} (not recorded)" if licence == "unknown" else licence
        rows.append(f"| {case.get('name')} | {licence} | {case.get('source', '')} | {case.get('label_kind', '')} |")
    return rows


def _validation(ckpt: dict) -> str:
    provenance, metrics = ckpt.get("provenance") or {}, ckpt.get("metrics") or {}
    cases = provenance.get("validation")
    held_out = provenance.get("validation_held_out")
    where = ("held-out cases (none of them trained on)" if held_out else
             "the training cases themselves (no held-out case): an optimistic figure" if held_out is False else
             "cases not recorded")
    lines = ["## Validation", ""]
    if metrics:
        lines += [f"Sliding-window scores on the model grid at step {ckpt.get('step')}, on {where}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_number(value)} |" for name, value in metrics.items()]
    else:
        lines.append("No validation score was recorded (the run stopped before its first validation).")
    note = (provenance.get("selection") or {}).get("note")
    if note:
        lines += ["", f"Case selection: {note}."]
    lines += [""] + _case_table("Validation cases", cases)
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}" if isinstance(value, float) else str(value)


def _licences(ckpt: dict) -> str:
    provenance = ckpt.get("provenance") or {}
    training = provenance.get("training") or []
    licences = sorted({case.get("licence") or "unknown" for case in training})
    lines = ["## Licences", "",
             "- Engine code: Apache-2.0. The weights are derived from the training data; their terms follow from "
             "the data's licences below."]
    known = [lic for lic in licences if lic != "unknown"]
    if known:
        lines.append(f"- Training data licences recorded: {'; '.join(known)}")
    if any(marker.lower() in lic.lower() for lic in known for marker in NON_COMMERCIAL):
        lines.append("- Some training data are licensed for non-commercial use only (NC): do not use or release "
                     "this model commercially without checking those terms.")
    if "unknown" in licences or not training:
        lines.append(f"- Licence of the training data whose licence was not recorded: {TO_FILL}")
    lines.append(f"- Licence under which this model is released: {TO_FILL}")
    return "\n".join(lines)


def _intended_use(ckpt: dict) -> str:
    cfg, provenance = ckpt.get("config") or {}, ckpt.get("provenance") or {}
    data = cfg.get("data") or {}
    n = len(provenance.get("training") or [])
    kinds = " ".join(case.get("label_kind", "") for case in provenance.get("training") or []).lower()
    lines = ["## Intended use and limits", "",
             "- Intended use: research on CT segmentation, e.g. as a starting point to annotate more cases in "
             "3D Slicer. Not a medical device; not for diagnosis, treatment or any clinical decision.",
             f"- Trained on {n} case(s): it has seen little anatomy, few scanners and few protocols. Expect it to "
             "fail on CT unlike the training cases (other body regions, contrast phases, children, implants).",
             f"- Inputs are read at {data.get('spacing')} mm and through the window "
             f"{_numbers(data.get('hu_window'))} HU: "
             "detail finer than that spacing, and contrast outside the window, is not seen.",
             "- The validation figures above come from few cases and are no measure of performance elsewhere.",
             f"- Intended users and setting: {TO_FILL}"]
    if any(word in kinds for word in ("pseudo", "model output", "silver")):
        lines.insert(4, "- Some training labels are not manual (model-made or silver labels): the model learns "
                        "their errors too.")
    return "\n".join(lines)


def _software(ckpt: dict) -> str:
    versions = ckpt.get("versions") or {}
    if not versions:
        return "## Software\n\nNot recorded in this model.pt (made by an older engine)."
    rows = ["## Software", "", "| package | version |", "|---|---|"]
    return "\n".join(rows + [f"| {name} | {version} |" for name, version in versions.items()])


def _citations(ckpt: dict) -> str:
    pretrained = (ckpt.get("provenance") or {}).get("pretrained") or {}
    method = pretrained.get("method")
    used = f" This model's encoder was pre-trained with {method}." if method in ("mim", "mae", "hybridmim") else ""
    return "\n".join(["## Citations", "",
                      "The engine implements MiM and HybridMIM pre-training and builds on MONAI; please cite them "
                      f"when you use this model.{used}", ""] + [f"- {text}" for text in REFERENCES.values()])


def _numbers(values) -> list | None:
    """[-1000.0, 1000.0] as a reader writes it, [-1000, 1000]; None stays None."""
    return None if values is None else list(plain_numbers(values))
