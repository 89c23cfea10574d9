"""What the model selector points at (a catalogue entry or a checkpoint file), and, for each panel, why its button
cannot run yet: one sentence telling the user what to do, or '' when it can run."""
import html
import os
import re

NO_VOLUME = ("Choose a CT volume in step 1 (none loaded? The Sample Data module has CT volumes to try, e.g. "
             "CTChest).")
KIND_TEXT = {"pretraining": "MiM pre-training checkpoint", "segmentation": "Segmentation model (fine-tuned)"}


def checkpointKind(path):
    """(task, preset) of a checkpoint file from the run folder's config.yaml that the engine writes beside it
    (pretrain: 'method:', finetune: 'task:'); ('any', '') when there is none: the engine will judge the file."""
    try:
        with open(os.path.join(os.path.dirname(path), "config.yaml"), encoding="utf-8") as f:
            top = dict(re.findall(r"^(task|method|preset):\s*(\S+)\s*$", f.read(), re.M))
    except OSError:
        return "any", ""
    if top.get("task"):
        return top["task"], top.get("preset", "")
    return ("pretraining" if "method" in top else "any"), top.get("preset", "")


class SelectedModel:
    def __init__(self, entry=None, path="", isFile=False):
        self.entry, self.path, self.isFile = entry, path or "", isFile
        self.preset = entry.get("preset", "") if entry else ""
        if entry:
            self.task = entry["task"]
        elif self.path:
            self.task, self.preset = checkpointKind(self.path)
        else:
            self.task = None
        self.labels = entry.get("labels") if entry else None
        self.name = entry["name"] if entry else (os.path.basename(self.path) if self.path else "")

    @property
    def exists(self):
        return bool(self.path) and os.path.isfile(self.path)

    @property
    def needsDownload(self):
        return bool(self.entry and "url" in self.entry and not self.exists)

    @property
    def canReconstruct(self):
        return self.task in ("pretraining", "any")

    @property
    def canSegment(self):
        return self.task in ("segmentation", "any")

    def infoHtml(self):
        if self.entry is None:
            if not self.path:
                return "Choose a catalogue model, or a checkpoint file below."
            if not self.exists:
                return f'<span style="color:#b00020">No file at {html.escape(self.path)}</span>'
            kind = KIND_TEXT.get(self.task, "Checkpoint of unknown kind: the engine will check it")
            return kind + (f", preset {html.escape(self.preset)}" if self.preset else "") + "."
        parts = [html.escape(self.entry.get("description", ""))]
        if self.labels:
            parts.append("<b>Structures:</b> " + html.escape(", ".join(self.labels)))
        if "validationDice" in self.entry:
            parts.append(f"<b>Validation Dice:</b> {self.entry['validationDice']:.3f}")
        times = self.entry.get("expectedTimeSec", {})
        if times:
            parts.append("<b>Time:</b> " + " / ".join(f"~{v:.0f} s on {k.upper()}" for k, v in times.items()))
        if self.needsDownload:
            parts.append("Not downloaded yet.")
        elif not self.exists:
            parts.append('<span style="color:#b00020">The model file is missing: ' + html.escape(self.path) + "</span>")
        return "<br>".join(p for p in parts if p)

    def startFromText(self, fromScratch=False):
        if fromScratch:
            return "nothing: the network learns from your cases alone (pre-training usually helps with few cases)"
        if self.canReconstruct and self.exists:
            return self.name
        return "— choose a pre-trained model in step 1, or train with no pre-training"


def whyNotReconstruct(volume, model):
    if volume is None:
        return NO_VOLUME
    if model.task is None:
        return "Choose a MiM pre-trained model in step 1."
    if not model.canReconstruct:
        return "Exploring needs a MiM pre-trained model; the selected model is a segmentation model."
    return "" if model.exists else _missing(model)


def whyNotSegment(volume, model):
    if volume is None:
        return NO_VOLUME
    if model.task == "pretraining":
        return "The selected model is a pre-trained encoder: fine-tune it in step 4 to get a segmentation model."
    if model.task is None or not model.canSegment:
        return "Segmenting needs a segmentation model: fine-tune one in step 4, or choose one in step 1."
    return "" if model.exists else _missing(model)


def whyNotFinetune(model, plan, modelName, fromScratch=False):
    if not fromScratch and model.canReconstruct and not model.exists and model.path:
        return _missing(model)
    if not fromScratch and not (model.canReconstruct and model.exists):
        return "Choose the pre-trained model to start from in step 1, or tick 'No pre-training' in step 4."
    if not plan.ok:
        return plan.problems[0]
    return "" if modelName.strip() else "Name the new model."


def _missing(model):
    return "Download the model first (step 1)." if model.needsDownload else "The selected model file does not exist."


def whyNotPretrain(volumes, folder):
    """volumes: the scene's CT volumes; folder: the folder typed or chosen ('' for the scene's volumes)."""
    if folder:
        return "" if os.path.isdir(folder) else f"There is no folder {folder}."
    if not volumes:
        return ("Load CT volumes to pre-train on (the Sample Data module has some, under MiMSlicer), or choose a "
                "folder of CT files.")
    return ""


def pretrainSourceText(volumes, folder, minutes, recipe):
    """What 'Pre-train on these volumes' will do, in one line."""
    if folder:
        what = f"the CT files and DICOM series in {folder}"
    elif volumes:
        names = ", ".join(v.GetName() for v in volumes[:4]) + (", …" if len(volumes) > 4 else "")
        what = f"{len(volumes)} CT volume(s) of the scene ({names})"
    else:
        return ""
    return (f"Pre-trains on {what} for {minutes} min, on the grid and window of the '{recipe}' fine-tuning recipe "
            "(step 4), so a fine-tune sees the CT as the encoder did.")
