"""`engine export`: its command-line options (a thin shell over run_export)."""
from __future__ import annotations


def add_export(sub) -> None:
    p = sub.add_parser("export", help="a fine-tuned segmentation model.pt as a MONAI bundle or ONNX")
    p.add_argument("--checkpoint", required=True, help="model.pt of a segmentation fine-tuning run")
    p.add_argument("--format", required=True, help="monai-bundle | onnx")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--check-image", metavar="CT", help="compare the export with the engine on this CT: the bundle's "
                   "label map (Dice per label), or the ONNX logits of one window (default: a synthetic window)")
    p.add_argument("--version", default="0.1.0", help="the bundle's version (metadata.json)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(func=_export)


def _export(args) -> None:
    from engine.export.run import ExportRequest, run_export
    request = ExportRequest(args.checkpoint, args.format, args.out, check_image=args.check_image,
                            version=args.version, overwrite=args.overwrite)
    result = run_export(request)
    print("\n".join(str(p) for p in result.files))
