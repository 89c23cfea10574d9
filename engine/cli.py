"""Command line: thin argparse subcommands over the Python API. User mistakes print one line, exit 2."""
from __future__ import annotations

import argparse
import logging
import sys

from engine.errors import UserError

log = logging.getLogger("engine")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    progress_mode = getattr(args, "progress", "bar")
    try:
        args.func(args)
        return 0
    except UserError as err:
        _report(err, progress_mode)
        return 2
    except KeyboardInterrupt:
        _report("interrupted", progress_mode)
        return 130
    except MemoryError:
        _report("out of memory: use a smaller preset, roi or batch", progress_mode)
        return 3


def _report(err, progress_mode: str) -> None:
    message = str(err)
    if progress_mode == "json":
        from engine.progress import Progress
        Progress("json").error(message)
    print(f"error: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine is doing")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_reconstruct(sub)
    _add_sample_data(sub)
    _add_demo(sub)
    return parser


def _progress_arg(p) -> None:
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="a tqdm bar on stderr, or one JSON object per line on stdout (for programs)")


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training (MiM, MAE or HybridMIM)")
    p.add_argument("--data", required=True, help="folder of CT volumes, or a decathlon dataset JSON")
    p.add_argument("--method", default="mim", help="mim | mae | hybridmim")
    p.add_argument("--preset", default="tiny", help="tiny | small | base")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, config.yaml, log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set mask.k2=2 --set train.lr=5e-4 (YAML values)")
    _progress_arg(p)
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> None:
    from engine.pretrain import run_pretrain
    run_pretrain(args.data, args.out, method=args.method, preset=args.preset, steps=args.steps, resume=args.resume,
                 seed=args.seed, progress=args.progress, device=args.device, overrides=parse_sets(args.set))


def parse_sets(pairs: list[str]) -> dict:
    import yaml
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="masked inputs, reconstructions and errors of every level, in place")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, help="a CT volume (NIfTI, NRRD, MHA)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="which masks to draw")
    p.add_argument("--center", type=float, nargs=3, metavar=("R", "A", "S"),
                   help="centre of the crop in RAS mm (default: the body's centre)")
    p.add_argument("--device", default="auto")
    _progress_arg(p)
    p.set_defaults(func=_reconstruct)


def _reconstruct(args) -> None:
    from engine.reconstruct import run_reconstruct
    index = run_reconstruct(args.checkpoint, args.image, args.out, seed=args.seed, center=args.center,
                            device=args.device, progress=args.progress)
    if args.progress != "json":
        print(f"wrote {index['montage']} and {sum(len(lv['views']) for lv in index['levels'])} views to {args.out}")


def _add_sample_data(sub) -> None:
    p = sub.add_parser("sample-data", help="fetch the default sample CTs (TotalSegmentator's test volumes)")
    p.add_argument("--out", required=True)
    p.add_argument("--sdist", help="use this already downloaded totalsegmentator-2.18.0.tar.gz")
    p.set_defaults(func=_sample_data)


def _sample_data(args) -> None:
    from engine.sample_data import fetch_sample_data
    cases = fetch_sample_data(args.out, sdist=args.sdist)
    for case in cases:
        print(f"{case['image']}")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: sample CTs -> MiM pre-training -> reconstruction montage")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, help="pre-training steps (default: the preset's)")
    p.add_argument("--data", help="use this folder of CTs instead of the sample CTs")
    _progress_arg(p)
    p.set_defaults(func=_demo)


def _demo(args) -> None:
    from engine.demo import run_demo
    run_demo(args.out, preset=args.preset, steps=args.steps, data=args.data, progress=args.progress)
