"""The model catalogue: models shipped with the extension (Resources/models.json) plus the user's own models
(<user data>/models.json, see paths.userDataDir: fine-tuned here, or checkpoints added by hand). Both files follow
Resources/models-schema.json and are validated on every read and write."""
import datetime
import json
import os
import re

from . import jsonSchema, paths

FORMAT = "mimslicer-models/1"
TASKS = ("pretraining", "segmentation")


class CatalogueError(ValueError):
    """A catalogue file or entry is not valid; the message says which and why."""


class ModelCatalogue:
    def __init__(self, builtinPath=None, userPath=None, schemaPath=None):
        self.builtinPath = builtinPath or paths.resourcePath("models.json")
        self._userPath = userPath
        with open(schemaPath or paths.resourcePath("models-schema.json"), encoding="utf-8") as f:
            self.schema = json.load(f)

    @property
    def userPath(self):
        """The user's catalogue file: the one given, or <user data>/models.json as MIMSLICER_HOME says now (so a
        catalogue made before a test points MIMSLICER_HOME elsewhere follows it)."""
        return self._userPath or os.path.join(paths.userDataDir(), "models.json")

    # -- reading ---------------------------------------------------------------------------------------------
    def entries(self, task=None):
        """Every model, shipped first; each entry gains 'source' ('builtin' or 'user') and 'catalogue' (its file)."""
        found = []
        for source, path in (("builtin", self.builtinPath), ("user", self.userPath)):
            for entry in self._read(path)["models"]:
                if task is None or entry["task"] == task:
                    found.append(dict(entry, source=source, catalogue=path))
        return found

    def get(self, modelID):
        for entry in self.entries():
            if entry["id"] == modelID:
                return entry
        raise KeyError(f"no model '{modelID}' in the catalogue")

    def localFile(self, entry):
        """Absolute checkpoint path of an entry; for URL entries, where the download is (or will be) cached."""
        if "file" in entry:
            base = os.path.dirname(entry.get("catalogue", self.userPath))
            return os.path.normpath(os.path.join(base, os.path.expanduser(entry["file"])))
        name = os.path.basename(entry["url"].split("?")[0]) or "model.pt"
        return os.path.join(paths.userDataDir(), "downloads", entry["id"], name)

    # -- writing (user catalogue only) -----------------------------------------------------------------------
    def register(self, entry):
        """Add (or replace, same id) a user model; returns the stored entry."""
        entry = {k: v for k, v in entry.items() if k not in ("source", "catalogue")}
        entry.setdefault("created", datetime.datetime.now().isoformat(timespec="seconds"))
        document = self._read(self.userPath)
        if any(e["id"] == entry["id"] for e in self._read(self.builtinPath)["models"]):
            raise CatalogueError(f"'{entry['id']}' is a model shipped with the extension; choose another id")
        document["models"] = [e for e in document["models"] if e["id"] != entry["id"]] + [entry]
        self._validate(document, self.userPath)
        self._write(document)
        return dict(entry, source="user", catalogue=self.userPath)

    def remove(self, modelID):
        document = self._read(self.userPath)
        document["models"] = [e for e in document["models"] if e["id"] != modelID]
        self._write(document)

    def uniqueID(self, name):
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"
        taken = {e["id"] for e in self.entries()}
        candidate, n = base, 2
        while candidate in taken:
            candidate, n = f"{base}-{n}", n + 1
        return candidate

    # -- files -----------------------------------------------------------------------------------------------
    def _read(self, path):
        if not os.path.exists(path):
            return {"format": FORMAT, "models": []}
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
        except ValueError as err:
            raise CatalogueError(f"{path} is not valid JSON: {err}") from None
        self._validate(document, path)
        return document

    def _validate(self, document, path):
        try:
            jsonSchema.validate(document, self.schema)
        except jsonSchema.SchemaError as err:
            raise CatalogueError(f"{path}: {err}") from None
        ids = [e["id"] for e in document["models"]]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise CatalogueError(f"{path}: model ids used twice: {', '.join(duplicates)}")
        for entry in document["models"]:
            if entry["task"] == "segmentation" and not entry.get("labels"):
                raise CatalogueError(f"{path}: segmentation model '{entry['id']}' needs its 'labels'")

    def _write(self, document):
        os.makedirs(os.path.dirname(self.userPath), exist_ok=True)
        temporary = self.userPath + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
        os.replace(temporary, self.userPath)
