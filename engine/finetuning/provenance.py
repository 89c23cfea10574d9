"""Where a fine-tuned model comes from, as far as the engine can know it: the cases it trained and validated on
(with their licence and source where the data records them), the pre-trained weights, the length of training and
the software. Stored in model.pt (`provenance`, `versions`) and read by the model card and the exports.

The engine cannot know the licence of a user's data. It looks, per case, in this order:
1. the case's own entry in dataset.json: `"licence"` (or `"license"`), `"source"`, `"label_kind"`;
2. dataset.json's top-level `"licence"` (as in the Medical Segmentation Decathlon's files);
3. a `manifest.json` beside the image that lists it (a list of `{"case" | "ct", "licence", "source", "label_kind"}`
   entries: the convention of the project's shared test data).
Where none says, the licence is recorded as unknown, for the user to fill in on the model card."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from engine.data.labelled import CaseSelection, case_name

UNKNOWN = "unknown"
CASE_FIELDS = ("licence", "source", "label_kind")
MANIFEST = "manifest.json"


def run_provenance(dataset_path: str | Path, cases: CaseSelection, pretrained: dict | None) -> dict:
    """What model.pt records about its data and weights (plain data)."""
    find = RecordedFields(Path(dataset_path))
    return {
        "dataset": str(dataset_path),
        "training": [find.case(case) for case in cases.training],
        "validation": [find.case(case) for case in cases.validation],
        "validation_held_out": held_out(cases),
        "selection": {"fold": cases.fold, "train_cases": cases.train_cases, "seed": cases.seed, "note": cases.note},
        "pretrained": pretrained,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def held_out(cases: CaseSelection) -> bool:
    """True when no validation case is also a training case (the best model was chosen on unseen cases)."""
    trained = {case["image"] for case in cases.training}
    return bool(cases.validation) and not any(case["image"] in trained for case in cases.validation)


class RecordedFields:
    """Licence, source and label kind of the cases of one dataset, from wherever the data records them."""

    def __init__(self, dataset_path: Path):
        tree = _read_json(dataset_path)
        top = _fields(tree) if isinstance(tree, dict) else {}
        self.dataset_licence = top.get("licence")
        self._manifests: dict[Path, list] = {}

    def case(self, case: dict) -> dict:
        """{"name", "image", "label", "licence", "licence_from", "source", "label_kind"} of one dataset item."""
        record = {"name": case.get("name") or case_name(case["image"]), "image": case["image"]}
        if isinstance(case.get("label"), str):
            record["label"] = case["label"]
        found, where = self._recorded(case)
        record["licence"] = found.get("licence") or UNKNOWN
        record["licence_from"] = where
        record.update({key: found[key] for key in ("source", "label_kind") if found.get(key)})
        return record

    def _recorded(self, case: dict) -> tuple[dict, str | None]:
        """The case's fields and where its licence was found (None: nowhere)."""
        own = _fields(case)
        if own.get("licence"):
            return own, "dataset.json entry"
        if self.dataset_licence:
            return {**own, "licence": self.dataset_licence}, "dataset.json"
        image = Path(case["image"])
        entry = self._manifest_entry(image.parent, lambda e: image.name in (e.get("ct"), e.get("image"))
                                     or e.get("case") == case_name(image))
        found = {key: value for key, value in _fields(entry).items() if key != "label_kind"}
        found.update(self._label_kind(case.get("label")), **own)
        return found, str(image.parent / MANIFEST) if found.get("licence") else None

    def _label_kind(self, label) -> dict:
        """{"label_kind": ...} from the manifest beside the label file that lists it (manual, silver, model-made)."""
        if not isinstance(label, str):
            return {}
        label = Path(label)
        kind = _fields(self._manifest_entry(label.parent, lambda e: e.get("label") == label.name)).get("label_kind")
        return {"label_kind": kind} if kind else {}

    def _manifest_entry(self, folder: Path, matches) -> dict:
        """The first entry of `folder`/manifest.json that `matches` ({} if none, or no manifest)."""
        if folder not in self._manifests:
            entries = _read_json(folder / MANIFEST)
            entries = entries.get("cases") if isinstance(entries, dict) else entries
            self._manifests[folder] = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        return next((entry for entry in self._manifests[folder] if matches(entry)), {})


def _fields(tree: dict) -> dict[str, str]:
    """licence (or license), source and label_kind (or kind) of a JSON object, where present."""
    fields = {key: tree.get(key) for key in CASE_FIELDS if tree.get(key)}
    if not fields.get("licence") and tree.get("license"):
        fields["licence"] = tree["license"]
    if not fields.get("label_kind") and tree.get("kind"):
        fields["label_kind"] = tree["kind"]
    return {k: str(v) for k, v in fields.items()}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
