"""The two JSON files of an exported MONAI bundle, as plain dicts: `configs/metadata.json` (MONAI's bundle
metadata: versions, `network_data_format`, labels, intended use, data sources, evaluation metrics) and
`configs/inference.json` (a config that MONAI's own runner, `python -m monai.bundle run`, executes).

The inference config mirrors `engine infer` step by step with MONAI transforms: nearest-RAS orientation
(Orientationd), the model spacing (BorderPadd, Spacingd, trilinear; EngineGridd: the engine's grid), the HU window
(ScaleIntensityRanged, clipped), the body's bounding box (CropForegroundd: voxels denser than -500 HU, margin 2),
MONAI's SlidingWindowInferer (gaussian blending of each window's softmax, as the engine blends, with its overlap
and batch), every step undone on the probabilities (Invertd) with the engine's background outside the box,
argmax, the largest connected component of the labels model.pt lists (KeepLargestComponentsd), label values. What remains
different is precision (the bundle runs float32; `engine infer` bf16 on CPUs that have it) and the rounding of two
resampling libraries: `--check-image` measures it into the bundle's README (see bundle_transforms)."""
from __future__ import annotations

from engine.export.bundle_transforms import FAR_PADDING
from engine.finetuning.model_card import REFERENCES, foreground_names
from engine.imageio.geometry import body_level
from engine.runtime.versions import software_versions

# MONAI's bundle metadata schema (its URL, as MONAI's own bundles give it; `monai.bundle verify_metadata` downloads
# it unless given a local copy with --filepath) and the keys that schema requires.
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
REQUIRED_KEYS = ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright", "network_data_format")
TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
ENGINE_DISTRIBUTION = "mimslicer-engine"
TRANSFORMS = "engine.export.bundle_transforms"  # what makes MONAI's transforms compute what `engine infer` does
BODY_MARGIN = 2  # voxels around the body's bounding box, as engine.imageio.geometry.body_box
SW_BATCH_SIZE = 2  # windows per forward, as `engine infer` by default
OVERLAP = 0.5


def bundle_metadata(ckpt: dict, version: str) -> dict:
    """configs/metadata.json for a segmentation model.pt."""
    versions = software_versions()
    labels = _channels(ckpt)
    provenance = ckpt.get("provenance") or {}
    names = ", ".join(foreground_names(ckpt))
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported from a model.pt of step {ckpt.get('step')} by the MiMSlicer engine "
                               f"{versions['engine']}"},
        "monai_version": versions["monai"],
        "pytorch_version": versions["torch"],
        "numpy_version": versions["numpy"],
        "required_packages_version": {ENGINE_DISTRIBUTION: versions["engine"], "nibabel": _nibabel_version()},
        "supported_apps": {},
        "name": f"MiMSlicer CT segmentation ({names})",
        "task": f"Segmentation of {names} in CT",
        "description": _description(ckpt),
        "authors": "TO FILL (exported by the MiMSlicer engine; see docs/README.md)",
        "copyright": "TO FILL",
        "data_source": _data_source(provenance),
        "data_type": "nibabel",
        "image_classes": "single-channel CT in Hounsfield units",
        "label_classes": _label_classes(ckpt),
        "pred_classes": _label_classes(ckpt),
        "eval_metrics": _eval_metrics(ckpt),
        "intended_use": "Research only: segmentation of the listed structures in CT resembling the training "
                        "cases. Not a medical device; not for diagnosis, treatment or any clinical decision.",
        "references": list(REFERENCES.values()),
        "network_data_format": _network_data_format(ckpt, labels),
        "mimslicer": _engine_record(ckpt),
    }


def _channels(ckpt: dict) -> dict[str, str]:
    """{"0": "background", "1": ...}: channel index -> label name (channels follow the label values' order)."""
    ordered = sorted(ckpt["labels"].items(), key=lambda kv: kv[1])
    return {str(k): name for k, (name, _) in enumerate(ordered)}


def _label_classes(ckpt: dict) -> str:
    ordered = sorted(ckpt["labels"].items(), key=lambda kv: kv[1])
    return "label map values: " + ", ".join(f"{value} = {name}" for name, value in ordered)


def _description(ckpt: dict) -> str:
    cfg = ckpt.get("config") or {}
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    return (f"A {model.get('backbone')} segmentation network ({cfg.get('preset')} preset) fine-tuned by the MiMSlicer "
            f"engine. CTs are turned to the nearest RAS orientation, resampled to {data.get('spacing')} mm, windowed "
            f"to {data.get('hu_window')} HU and scaled to [0, 1]; {model.get('roi')}^3 windows slide over the body; "
            "the network returns logits, softmax probabilities are resampled back onto the input grid and the "
            "label map is written there. See docs/README.md (the model card).")


def _data_source(provenance: dict) -> str:
    training, validation = provenance.get("training"), provenance.get("validation")
    if training is None:
        return "not recorded in the model.pt this bundle was exported from"
    parts = [f"{len(training)} training case(s): " + "; ".join(_case(c) for c in training)]
    if validation:
        held = "held out" if provenance.get("validation_held_out") else "the training cases (not held out)"
        parts.append(f"{len(validation)} validation case(s), {held}: " + "; ".join(_case(c) for c in validation))
    return ". ".join(parts)


def _case(case: dict) -> str:
    details = [case.get("licence") or "licence unknown"]
    if case.get("source"):
        details.append(case["source"])
    if case.get("label_kind"):
        details.append(f"labels: {case['label_kind']}")
    return f"{case.get('name')} ({', '.join(details)})"


def _eval_metrics(ckpt: dict) -> dict:
    metrics = {k: v for k, v in (ckpt.get("metrics") or {}).items() if isinstance(v, (int, float)) and v == v}
    provenance = ckpt.get("provenance") or {}
    if metrics:
        metrics["evaluated_on"] = [c.get("name") for c in provenance.get("validation") or []]
        metrics["held_out"] = provenance.get("validation_held_out")
        metrics["note"] = (f"sliding-window Dice on the model grid at step {ckpt.get('step')}, during fine-tuning; "
                           "the best of the run's validations")
    return metrics


def _network_data_format(ckpt: dict, channels: dict[str, str]) -> dict:
    roi = int(ckpt["roi"])
    window = [float(v) for v in ckpt["hu_window"]]
    return {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                             "spatial_shape": [roi] * 3, "dtype": "float32", "value_range": [0.0, 1.0],
                             "is_patch_data": True, "channel_def": {"0": f"CT windowed to {window} HU, in [0, 1]"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channels),
                             "spatial_shape": [roi] * 3, "dtype": "float32", "value_range": [0.0, 1.0],
                             "is_patch_data": True, "channel_def": channels}},
    }


def _engine_record(ckpt: dict) -> dict:
    """What the engine knows beyond MONAI's schema: grid, window, label values, provenance and versions."""
    return {"labels": dict(ckpt["labels"]), "spacing": list(ckpt["spacing"]), "hu_window": list(ckpt["hu_window"]),
            "roi": int(ckpt["roi"]), "step": ckpt.get("step"), "versions": ckpt.get("versions"),
            "provenance": ckpt.get("provenance")}


def _nibabel_version() -> str:
    from engine.runtime.versions import package_version
    return package_version("nibabel")


def missing_metadata(metadata: dict) -> list[str]:
    """What MONAI's metadata schema (meta_schema_20240725) requires and `metadata` lacks or has of the wrong type:
    the top-level keys and every tensor of `network_data_format`. Empty when it conforms; no download needed."""
    problems = [f"missing '{key}'" for key in REQUIRED_KEYS if key not in metadata]
    for key in ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                "authors", "copyright"):
        if key in metadata and not isinstance(metadata[key], str):
            problems.append(f"'{key}' must be a string")
    if not isinstance(metadata.get("required_packages_version", {}), dict):
        problems.append("'required_packages_version' must be an object")
    fmt = metadata.get("network_data_format")
    if fmt is not None:
        for part in ("inputs", "outputs"):
            tensors = fmt.get(part) if isinstance(fmt, dict) else None
            if not isinstance(tensors, dict):
                problems.append(f"network_data_format needs '{part}'")
                continue
            for name, tensor in tensors.items():
                problems += [f"network_data_format.{part}.{name} lacks '{key}'" for key in TENSOR_KEYS
                             if isinstance(tensor, dict) and key not in tensor]
    return problems


def inference_config(ckpt: dict) -> dict:
    """configs/inference.json: segment every NIfTI of `dataset_dir` (or the paths of `datalist`) into `output_dir`."""
    values = [value for _, value in sorted(ckpt["labels"].items(), key=lambda kv: kv[1])]
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch",
                    f"$import {TRANSFORMS} as bundle_transforms"],
        "bundle_root": ".",
        "model_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "engine.models.segmenter.segmenter_from_config", "config": ckpt["config"],
                        "out_channels": len(values)},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(ckpt)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(ckpt["roi"])] * 3,
                    "sw_batch_size": SW_BATCH_SIZE, "overlap": OVERLAP, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": _postprocessing(values, list(ckpt["spacing"]),
                                                                                 _largest_component_channels(ckpt))},
        "probabilities": "$lambda window: torch.softmax(@network(window).float(), dim=1)",
        "segment": "$torch.no_grad()(lambda item: @postprocessing("
                   "{**item, 'pred': @inferer(item['image'][None].to(@device), @probabilities)[0]}))",
        "initialize": ["$@network.load_state_dict(torch.load(@model_path, map_location=@device, weights_only=True))",
                       "$@network.eval()"],
        "run": ["$[@segment(item)['pred'].shape for item in @dataset]"],
    }


def _preprocessing(ckpt: dict) -> list[dict]:
    lo, hi = (float(v) for v in ckpt["hu_window"])
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "BorderPadd", "keys": "image", "spatial_border": [0, FAR_PADDING] * 3, "mode": "edge"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [float(s) for s in ckpt["spacing"]], "mode": "bilinear"},
        {"_target_": f"{TRANSFORMS}.EngineGridd", "keys": "image", "far_padding": FAR_PADDING},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "margin": BODY_MARGIN,
         "allow_smaller": True, "select_fn": f"$lambda x: x > {body_level((lo, hi))!r}"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]


def _largest_component_channels(ckpt: dict) -> list[int]:
    """The channels (1..K) of the labels whose largest connected component alone the model keeps (chosen on
    validation in fine-tuning; `engine infer` does the same unless --no-postprocess)."""
    order = [name for name, _ in sorted(ckpt["labels"].items(), key=lambda kv: kv[1])]
    return [order.index(name) for name in ckpt.get("largest_component", ())]


def _postprocessing(values: list[int], spacing: list[float], largest: list[int]) -> list[dict]:
    transforms = [
        {"_target_": "Lambdad", "keys": "pred", "func": "$bundle_transforms.append_box_channel"},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "Lambdad", "keys": "pred", "func": "$bundle_transforms.background_outside_box"},
        {"_target_": f"{TRANSFORMS}.PastEngineGridd", "keys": "pred", "spacing": [float(v) for v in spacing]},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if largest:  # engine infer's own post-processing (MONAI's KeepLargestConnectedComponentd needs scikit-image)
        transforms.append({"_target_": f"{TRANSFORMS}.KeepLargestComponentsd", "keys": "pred", "channels": largest})
    if values != list(range(len(values))):  # channel k -> the k-th label value
        transforms.append({"_target_": "MapLabelValued", "keys": "pred", "orig_labels": list(range(len(values))),
                           "target_labels": values})
    dtype = "$numpy.uint8" if max(values) < 256 else "$numpy.uint16"
    transforms.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                       "output_dtype": dtype, "resample": False, "separate_folder": False, "print_log": True})
    return transforms
