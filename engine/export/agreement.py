"""How far an exported bundle's segmentation is from `engine infer`'s on one CT: the bundle is run by MONAI's own
runner (`monai.bundle.run`, as `python -m monai.bundle run` does), the engine's predictor on the same file in
float32 and in the precision `engine infer` uses on this machine; Dice per label between the label maps."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.bundle import run

from engine.errors import UserError
from engine.imageio.volumes import read_input
from engine.inference.run import InferenceSettings, SegmentationPredictor, segmenter_and_spec
from engine.runtime.device import amp_dtype, pick_device


def run_bundle(bundle: Path, images: list[Path], output_dir: Path) -> list[Path]:
    """Segment `images` (NIfTI) with MONAI's runner over the bundle's configs; returns the label maps written."""
    run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False, bundle_root=str(bundle), datalist=[str(p) for p in images], output_dir=str(output_dir))
    return [output_dir / f"{_stem(p)}_seg.nii.gz" for p in images]


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def bundle_agreement(bundle: Path, ckpt: dict, image_path: Path) -> dict:
    """Dice per label between the bundle's label map and the engine's, in float32 and in `engine infer`'s default
    precision, with the number of voxels whose label differs."""
    with tempfile.TemporaryDirectory() as tmp:
        nifti = _as_nifti(image_path, Path(tmp))
        bundle_map = sitk.GetArrayFromImage(sitk.ReadImage(str(run_bundle(bundle, [nifti], Path(tmp))[0])))
        image = sitk.ReadImage(str(nifti))
    model, spec = segmenter_and_spec(ckpt)
    engine_maps = {"float32": _engine_labelmap(model, spec, image, "off"),
                   "default": _engine_labelmap(model, spec, image, "auto")}
    if bundle_map.shape != engine_maps["float32"].shape:
        raise UserError(f"the bundle's label map has shape {bundle_map.shape}, the engine's "
                        f"{engine_maps['float32'].shape}: not on the same grid")
    names = {name: value for name, value in spec.labels.items() if value != 0}
    device = pick_device("auto")
    return {
        "image": str(image_path),
        "voxels": int(bundle_map.size),
        "engine_precision": str(amp_dtype("auto", device) or "float32").replace("torch.", ""),
        "dice": {name: {kind: _dice(bundle_map == value, labels == value) for kind, labels in engine_maps.items()}
                 for name, value in names.items()},
        "differing_voxels": {kind: int((bundle_map != labels).sum()) for kind, labels in engine_maps.items()},
    }


def _as_nifti(image_path: Path, folder: Path) -> Path:
    """MONAI's reader here is nibabel's: other formats go through a NIfTI copy, which both sides then read."""
    if image_path.name.endswith((".nii", ".nii.gz")):
        return image_path
    image, _ = read_input(image_path)
    target = folder / f"{_stem(image_path).replace('.', '_')}.nii.gz"
    sitk.WriteImage(image, str(target))
    return target


def _engine_labelmap(model, spec, image: sitk.Image, amp: str) -> np.ndarray:
    predictor = SegmentationPredictor(model, spec, InferenceSettings(amp=amp))
    return sitk.GetArrayFromImage(predictor.predict(image).labelmap)


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
