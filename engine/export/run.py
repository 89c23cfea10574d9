"""`engine export`: a fine-tuned segmentation model.pt as a MONAI bundle or as ONNX, in a folder of its own."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.config.schema import check_choice
from engine.errors import UserError
from engine.export.agreement import bundle_agreement
from engine.export.bundle import write_bundle
from engine.export.onnx import export_onnx
from engine.export.result import ExportResult
from engine.runtime.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
FORMATS = ("monai-bundle", "onnx")


@dataclass(frozen=True)
class ExportRequest:
    """What `engine export` is asked to do (the CLI's options, as a Python API)."""

    checkpoint: str  # model.pt of a segmentation fine-tuning run
    format: str  # monai-bundle | onnx
    out: str  # the folder to write
    check_image: str | None = None  # a CT to compare the export with the engine on (bundle: Dice; ONNX: logits)
    version: str = "0.1.0"  # the bundle's version
    overwrite: bool = False


def run_export(request: ExportRequest) -> ExportResult:
    check_choice("format", request.format, FORMATS)
    ckpt = _segmentation_checkpoint(request.checkpoint)
    out = _output_folder(Path(request.out), request.overwrite)
    check_image = Path(request.check_image) if request.check_image else None
    if check_image is not None and not check_image.exists():
        raise UserError(f"--check-image {check_image}: no such file or folder")
    if request.format == "monai-bundle":
        return _export_bundle(ckpt, out, request.version, check_image)
    return ExportResult(*export_onnx(ckpt, out, check_image))


def _segmentation_checkpoint(path: str) -> dict:
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == "finetune-segmentation":
        raise UserError(f"{path}: the training state of a run; export the run's model.pt")
    if ckpt.get("kind") != "segmentation":
        raise UserError(f"{path}: a '{ckpt.get('kind')}' checkpoint; export takes a segmentation model.pt")
    return ckpt


def _output_folder(out: Path, overwrite: bool) -> Path:
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; choose another folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _export_bundle(ckpt: dict, out: Path, version: str, check_image: Path | None) -> ExportResult:
    files = write_bundle(ckpt, out, version)
    if check_image is None:
        return ExportResult(files)
    agreement = bundle_agreement(out, ckpt, check_image)
    log.info("bundle vs engine infer on %s: %s", check_image, agreement["dice"])
    return ExportResult(write_bundle(ckpt, out, version, agreement), agreement)
