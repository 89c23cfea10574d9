"""`engine export --format monai-bundle`: a fine-tuned segmentation model.pt as a MONAI bundle
(https://docs.monai.io/en/latest/mb_specification.html):

    configs/metadata.json   MONAI's metadata (see bundle_config), plus the engine's own record under "mimslicer"
    configs/inference.json  run by MONAI's runner: python -m monai.bundle run --config_file configs/inference.json
    models/model.pt         the network's state dict: plain tensors, loads with torch.load(weights_only=True)
    docs/README.md          the model card, how to run the bundle, and how its output compares with `engine infer`
    LICENSE                 the terms of the configs and of the weights (the latter follow the training data)

The network is built by `engine.models.segmenter.segmenter_from_config` (the `_target_` of `network_def`), and
`engine.export.bundle_transforms` makes MONAI's transforms compute what `engine infer` does, so the bundle needs this
engine importable (`required_packages_version`), besides MONAI, torch and nibabel."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.export.bundle_config import bundle_metadata, inference_config
from engine.finetuning.model_card import TO_FILL, model_card
from engine.runtime.atomic import write_atomic, write_json, write_text

REPO_LICENSE = Path(__file__).resolve().parents[2] / "LICENSE"  # the engine's Apache-2.0 text, in a source checkout


def write_bundle(ckpt: dict, out: Path, version: str = "0.1.0", agreement: dict | None = None) -> list[Path]:
    """The bundle's files under `out`; `agreement` (from `bundle_agreement`) goes into its README."""
    metadata = bundle_metadata(ckpt, version)
    if agreement is not None:
        metadata["mimslicer"]["agreement_with_engine_infer"] = agreement
    return [
        write_json(metadata, out / "configs" / "metadata.json"),
        write_json(inference_config(ckpt), out / "configs" / "inference.json"),
        write_atomic(out / "models" / "model.pt", lambda tmp: torch.save(ckpt["model"], tmp)),
        write_text(bundle_readme(ckpt, agreement), out / "docs" / "README.md"),
        write_text(bundle_licence(ckpt), out / "LICENSE"),
    ]


def bundle_readme(ckpt: dict, agreement: dict | None) -> str:
    return model_card(ckpt) + "\n" + _usage() + "\n" + _agreement(agreement)


def _usage() -> str:
    return """## Using this bundle

It needs MONAI, PyTorch, nibabel and the MiMSlicer engine importable (`network_def` is
`engine.models.segmenter.segmenter_from_config`); `python -m monai.bundle` also needs `fire`. From the bundle's
folder:

```
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/cts
python -m monai.bundle run --config_file configs/inference.json --datalist "['/path/to/ct.nii.gz']" --output_dir out
```

Each `<name>.nii.gz` gives `<output_dir>/<name>_seg.nii.gz`, a label map on the CT's own grid (values as in the
label table above). MONAI reads NIfTI here (nibabel); `engine infer` also reads NRRD, MHA and DICOM series.

To check the metadata offline, give `verify_metadata` a local copy of MONAI's schema
(`meta_schema_20240725.json`; without `--filepath` it is downloaded from GitHub):

```
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath meta_schema_20240725.json
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
```
"""


def _agreement(agreement: dict | None) -> str:
    lines = ["## This bundle against `engine infer`", "",
             "Both orient the CT to RAS, resample it to the model spacing, window it, slide the same network over the "
             "body's bounding box, blend the windows' softmax with the same gaussian weights and resample the "
             "probabilities back onto the input grid. The bundle does it with MONAI's transforms, plus small ones "
             "from `engine.export.bundle_transforms` that give MONAI's grid the engine's size and the engine's "
             "background outside the body box and past the grid; it then computes what `engine infer` computes, up "
             "to the rounding of two resampling libraries. It runs in float32, while `engine infer` uses bf16 "
             "autocast on CPUs with fast bf16 (AVX-512 BF16, AMX): there the label maps differ at voxels where two "
             "labels are nearly tied.",
             ""]
    if not agreement:
        lines.append("No comparison was measured at export (`engine export --check-image CT` measures one).")
        return "\n".join(lines) + "\n"
    lines += [f"Measured at export on `{agreement['image']}` (Dice between the two label maps, per label):", "",
              "| label | Dice, bundle vs engine (float32) | Dice, bundle vs engine (as `engine infer` runs here) |",
              "|---|---|---|"]
    for name, scores in agreement["dice"].items():
        lines.append(f"| {name} | {_fmt(scores.get('float32'))} | {_fmt(scores.get('default'))} |")
    lines += ["", f"Voxels whose label differs: {agreement['differing_voxels']['float32']} (float32) and "
              f"{agreement['differing_voxels']['default']} (`engine infer`'s precision here: "
              f"{agreement['engine_precision']}) of {agreement['voxels']}."]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "absent from both" if value is None else f"{value:.4f}"


def bundle_licence(ckpt: dict) -> str:
    training = (ckpt.get("provenance") or {}).get("training") or []
    licences = sorted({case.get("licence") or "unknown" for case in training}) or ["not recorded"]
    text = ("Licence of this bundle\n======================\n\n"
            "configs/ and docs/: Apache-2.0, as the MiMSlicer engine that wrote them.\n\n"
            f"models/model.pt (the weights): {TO_FILL.strip('*')}, to be chosen by whoever releases the model. The "
            "weights are derived from the training data, whose licences the engine recorded as:\n\n"
            + "".join(f"  - {lic}\n" for lic in licences)
            + "\nData under a non-commercial (NC) licence restrict the use of models trained on them; a licence "
              "recorded as 'unknown' must be found out before release. See docs/README.md for the cases.\n")
    if REPO_LICENSE.is_file():
        text += "\n\nApache License 2.0 (the engine's LICENSE)\n\n" + REPO_LICENSE.read_text()
    else:
        text += "\nApache License 2.0: https://www.apache.org/licenses/LICENSE-2.0\n"
    return text
