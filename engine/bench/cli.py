"""`engine bench`: its command-line options (a thin shell over run_bench)."""
from __future__ import annotations

import argparse


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time whole-CT segmentation (vs SwinUNETR, UNet), pre-training and fine-tuning")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: cropped CT, one step per measurement")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's size
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON here")
    p.add_argument("--preset", help="segmentation preset for inference and fine-tuning (default: small)")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 (CUDA) | off: autocast of every measurement")

    def run(args) -> None:
        from engine.bench.report import format_report
        from engine.bench.run import run_bench
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        print(format_report(run_bench(mode, json_out=args.json, amp=args.amp, seg_preset=args.preset)))
    p.set_defaults(func=run)
