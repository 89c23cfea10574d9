"""`engine bench`: its command-line options (a thin shell over run_bench)."""
from __future__ import annotations

import argparse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time whole-CT segmentation (vs SwinUNETR, UNet), pre-training and fine-tuning; "
                       "`bench loop`: the radiologist's loop (fine-tune within 10 minutes, score unseen CTs)")
    p.add_argument("section", nargs="?", choices=("all", "speed", "loop"), default="all",
                   help="all (default); speed: all but the radiologist's loop; loop: only the loop")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: cropped CT, one step per measurement")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's size
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON here")
    p.add_argument("--preset", help="segmentation preset for inference and fine-tuning (default: the default "
                   "recipe, fast); with `loop`, the loop's fine-tuning preset (same default)")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 (CUDA) | off: autocast of every measurement")
    p.add_argument("--pretrained", help="loop: the MiM pre-training checkpoint to start from (default: pre-train "
                   "one here, briefly)")
    p.add_argument("--minutes", type=_positive_float, help="loop: budget of each fine-tuning (default: 10)")
    p.add_argument("--task", action="append", choices=("lungs", "tumour"),
                   help="loop: only this task (repeatable; default: the profile's, lungs and tumour in full)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="loop: a fine-tuning setting, e.g. --set data.spacing=[3,3,3]")

    def run(args) -> None:
        from engine.bench.report import format_report
        from engine.bench.run import run_bench
        from engine.cli import parse_sets
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        report = run_bench(mode, json_out=args.json, amp=args.amp, seg_preset=args.preset, section=args.section,
                           pretrained=args.pretrained, loop_minutes=args.minutes, loop_overrides=parse_sets(args.set),
                           loop_tasks=tuple(args.task or ()))
        print(format_report(report))
    p.set_defaults(func=run)
