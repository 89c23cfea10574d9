"""Command line: thin argparse subcommands over the Python API. User mistakes print one line, exit 2."""
from __future__ import annotations

import argparse
import logging
import sys

from engine.bench.cli import add_bench
from engine.errors import UserError
from engine.export.cli import add_export

log = logging.getLogger("engine")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    progress_mode = getattr(args, "progress", "bar")
    try:
        return args.func(args) or 0  # a command may return its own exit status
    except UserError as err:
        _report(err, progress_mode)
        return 2
    except OSError as err:  # the file system said no: a path that is a file, no permission, a full disk...
        where = f"{err.filename}: " if err.filename else ""
        _report(f"{where}{err.strerror or err}", progress_mode)
        return 2
    except MemoryError:
        _report("out of memory: use a smaller preset, roi or batch", progress_mode)
        return 3
    except Exception as err:  # MONAI wraps errors of its transforms: find ours inside
        cause = user_error_in(err)
        if cause is None:
            raise
        _report(cause, progress_mode)
        return 2
    except KeyboardInterrupt:
        _report("interrupted", progress_mode)
        return 130


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError that caused `err`, however deep in its chain of causes (None if there is none)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _report(err, progress_mode: str) -> None:
    message = str(err)
    if progress_mode == "json":
        from engine.runtime.progress import Progress
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
    _add_info(sub)
    _add_data(sub)
    _add_finetune(sub)
    _add_infer(sub)
    _add_evaluate(sub)
    add_export(sub)
    _add_study(sub)
    add_bench(sub)
    return parser


def _memory_check_arg(p) -> None:
    p.add_argument("--skip-memory-check", action="store_true",
                   help="run even when the predicted peak memory exceeds 90%% of what is available")


def _progress_arg(p) -> None:
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="a tqdm bar on stderr, or one JSON object per line on stdout (for programs)")


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training (MiM, MAE or HybridMIM)")
    p.add_argument("--data", required=True, help="folder of CT volumes (and DICOM series folders), or a decathlon "
                   "dataset JSON")
    p.add_argument("--method", help="mim | mae | hybridmim (default: mim)")
    p.add_argument("--preset", help="tiny | small | base (default: tiny)")
    _config_arg(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    length.add_argument("--time-limit", type=_positive_float, metavar="MINUTES",
                        help="finish within this many minutes, reading the data included (the steps that fit are "
                        "fixed after timing the first ones, and written to config.yaml)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, config.yaml, log.jsonl, progress.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, help="default: the --config file's, else 0")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set mask.k2=2 --set train.lr=5e-4 (YAML values, checked "
                   "against the setting's type)")
    _memory_check_arg(p)
    _progress_arg(p)
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> None:
    from engine.pretraining.run import PretrainRequest, run_pretrain
    _check_config_alone(args, ("method", "preset"))
    request = PretrainRequest(args.data, args.out, method=args.method or "mim", preset=args.preset or "tiny",
                              steps=args.steps, time_limit=args.time_limit, resume=args.resume, seed=args.seed,
                              progress=args.progress, device=args.device, overrides=parse_sets(args.set),
                              config=args.config,
                              check_memory=not args.skip_memory_check)
    run_pretrain(request)


def _config_arg(p) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="start a new run with the settings of this file, e.g. "
                   "another run's config.yaml (instead of a preset; --set and --steps still apply)")


def _check_config_alone(args, given_by_config: tuple[str, ...]) -> None:
    """--config gives the preset (and pre-training's method) and cannot continue a run."""
    if not args.config:
        return
    clashing = [f"--{name}" for name in given_by_config if getattr(args, name, None)]
    if clashing:
        raise UserError(f"--config {args.config} gives every setting; drop {' and '.join(clashing)} "
                        "(change single settings with --set)")
    if args.resume:
        raise UserError("--resume keeps the run's own settings; --config starts a new run")


def parse_sets(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs as {KEY: value}, each value read as YAML 1.2 (`off` is a word, 5e-4 a number); the
    config builder then checks each against its setting's type."""
    import yaml

    from engine.config.schema import load_yaml
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got '{pair}'")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as err:
            raise UserError(f"--set {pair}: not a YAML value ({' '.join(str(err).split())})") from None
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
    from engine.pretraining.reconstruct import run_reconstruct
    index = run_reconstruct(args.checkpoint, args.image, args.out, seed=args.seed, center=args.center,
                            device=args.device, progress=args.progress)
    if args.progress != "json":
        print(f"wrote {index['montage']} and {sum(len(lv['views']) for lv in index['levels'])} views to {args.out}")


def _add_sample_data(sub) -> None:
    p = sub.add_parser("sample-data", help="fetch the default sample CTs (TotalSegmentator's test volumes)")
    p.add_argument("--out", required=True)
    p.add_argument("--sdist", help="use this already downloaded totalsegmentator-2.18.0.tar.gz")
    _progress_arg(p)
    p.set_defaults(func=_sample_data)


def _sample_data(args) -> None:
    import json

    from engine.data.samples import fetch_sample_data
    cases = fetch_sample_data(args.out, sdist=args.sdist)
    if args.progress == "json":  # one event, as the other commands end (the 3D Slicer module reads it)
        print(json.dumps({"event": "done", "path": str(args.out), "cases": cases}), flush=True)
        return
    for case in cases:
        print(f"{case['image']}")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print what a checkpoint is (kind, method or task, preset, labels) as JSON")
    p.add_argument("--checkpoint", required=True)
    p.set_defaults(func=_info)


def _info(args) -> None:
    import json

    from engine.runtime.checkpoint import describe_checkpoint
    print(json.dumps(describe_checkpoint(args.checkpoint), indent=1))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: sample CTs -> MiM pre-training -> reconstruction montage -> "
                       "fine-tuning within minutes -> segmentation of an unseen case")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, help="pre-training steps (default: the preset's)")
    p.add_argument("--finetune-minutes", type=float, help="the fine-tuning's time budget (default: 5)")
    p.add_argument("--data", help="pre-train on this folder of CTs (or dataset JSON) instead of the sample CTs")
    _progress_arg(p)
    p.set_defaults(func=_demo)


def _demo(args) -> None:
    from engine.demo import DEMO_FINETUNE_MINUTES, run_demo
    run_demo(args.out, preset=args.preset, steps=args.steps,
             finetune_minutes=args.finetune_minutes or DEMO_FINETUNE_MINUTES, data=args.data, progress=args.progress)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="dataset descriptors for fine-tuning")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("index", help="build dataset.json from imagesTr/labelsTr or *_ct/*_label pairs")
    q.add_argument("folder")
    q.add_argument("-o", "--out", required=True, help="the dataset.json to write (paths in it are relative to it)")
    q.add_argument("--labels", nargs="+", metavar="NAME=VALUE", help="label names, e.g. heart=1 aorta=2 "
                   "(default: label_<value> for every value found)")
    q.add_argument("--folds", type=int, default=5, help="cross-validation folds assigned to the cases")
    q.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    q.set_defaults(func=_data_index)
    c = data_sub.add_parser("check", help="verify every volume (and label) before a long run; exit 1 on problems")
    c.add_argument("path", help="a folder of volumes (and DICOM series folders) or a dataset JSON")
    c.add_argument("--workers", type=int, default=2, help="volumes read in parallel")
    c.add_argument("--json", help="also write the full report here")
    c.set_defaults(func=_data_check)
    k = data_sub.add_parser("cache", help="pre-build the persistent preprocessing cache (data.cache_dir)")
    k.add_argument("path", help="a folder of volumes or a dataset JSON")
    k.add_argument("--cache-dir", required=True)
    k.add_argument("--preset", default="base", help="the preset whose spacing and window the cache is for")
    k.add_argument("--method", default="mim")
    k.add_argument("--workers", type=int, default=2)
    k.set_defaults(func=_data_cache)


def _data_check(args) -> int:
    from engine.data.check import check_dataset, format_report
    report = check_dataset(args.path, workers=args.workers)
    print(format_report(report))
    if args.json:
        from engine.runtime.atomic import write_json
        write_json(report, args.json)
    if report["ok"] < report["cases"]:
        return 1
    return 0


def _data_cache(args) -> None:
    from engine.data.check import build_cache
    n = build_cache(args.path, args.cache_dir, preset=args.preset, method=args.method, workers=args.workers)
    print(f"cached the preprocessing of {n} volume(s) in {args.cache_dir}")


def _data_index(args) -> None:
    from engine.data.labelled import index_folder, parse_label_names
    from engine.runtime.atomic import write_json
    labels = parse_label_names(args.labels) if args.labels else None
    tree = index_folder(args.folder, args.out, labels=labels, folds=args.folds, seed=args.seed)
    write_json(tree, args.out)
    print(f"wrote {args.out}: {len(tree['training'])} labelled case(s), {len(tree['test'])} unlabelled, "
          f"labels {tree['labels']}")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a segmentation or classification model from pre-trained weights")
    p.add_argument("--task", default="segmentation", help="segmentation | classification")
    p.add_argument("--data", required=True, help="dataset.json (segmentation); labels.json or .csv (classification)")
    p.add_argument("--pretrained", default="none", help="a pre-training checkpoint, the MiM authors' checkpoint, "
                   "MONAI's SwinUNETR-SSL model_swinvit.pt, or none")
    p.add_argument("--preset", help="fast (the default: the recipe measured to learn fastest on a CPU) | tiny (tests) "
                   "| small | base (the authors', GPU-sized)")
    _config_arg(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    length.add_argument("--epochs", type=int, help="passes over the training cases")
    length.add_argument("--time-limit", type=_positive_float, metavar="MINUTES",
                        help="finish within this many minutes, reading the data included: the first steps are timed "
                        "and the number of steps that fits is fixed (and written to config.yaml)")
    p.add_argument("--out", required=True, help="run folder: model.pt, MODEL_CARD.md, checkpoint.pt, config.yaml, "
                   "cases.json, log.jsonl, progress.png")
    p.add_argument("--freeze-encoder", action="store_true", help="train the new head only")
    p.add_argument("--fold", type=int, help="validate on this fold of dataset.json, train on the others")
    p.add_argument("--train-cases", type=int, help="train on this many cases of the training pool (label efficiency)")
    p.add_argument("--seed", type=int, help="seed of the case draw, the crops and the initial weights (default: the "
                   "--config file's, else 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set model.roi=64 --set data.hu_window=[-175,250]")
    _memory_check_arg(p)
    _progress_arg(p)
    p.set_defaults(func=_finetune)


def _finetune(args) -> None:
    from engine.config.finetune import DEFAULT_PRESET
    from engine.finetuning.run import FinetuneRequest, run_finetune
    _check_config_alone(args, ("preset",))
    request = FinetuneRequest(args.data, args.out, task=args.task, pretrained=args.pretrained,
                              preset=args.preset or DEFAULT_PRESET, steps=args.steps, epochs=args.epochs,
                              time_limit=args.time_limit, freeze_encoder=args.freeze_encoder, fold=args.fold,
                              train_cases=args.train_cases, seed=args.seed, resume=args.resume,
                              progress=args.progress, device=args.device, overrides=parse_sets(args.set),
                              config=args.config,
                              check_memory=not args.skip_memory_check)
    result = run_finetune(request)
    if args.progress != "json":
        print(f"wrote {result.model_path} (best at step {result.best.get('step')}: {result.best.get('metrics')})")


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="segment volumes with a fine-tuned model.pt, on the input's own grid")
    p.add_argument("--checkpoint", required=True, help="model.pt of a fine-tuning run")
    p.add_argument("--input", required=True, help="a volume (NIfTI, NRRD, MHA), a DICOM series folder, "
                   "or a folder of volumes")
    p.add_argument("--output", required=True, help="labelmap file (.nii.gz, .nrrd, .seg.nrrd, .mha) or folder")
    p.add_argument("--probabilities", action="store_true", help="also write one probability map per label")
    p.add_argument("--uncertainty", action="store_true", help="also write <stem>_uncertainty.nii.gz: per voxel, the "
                   "normalised entropy (0..1) of the class probabilities (their mean over flips with --tta)")
    p.add_argument("--dicom-seg", action="store_true", help="with a DICOM series folder as --input: also write "
                   "<stem>.dcm, a DICOM Segmentation object over the series' slices (needs highdicom)")
    p.add_argument("--tta", action="store_true", help="average over flips of each axis (4x slower)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--sw-batch-size", type=_positive_int, metavar="N",
                   help="windows per forward (default: the largest up to 2 that fits in memory)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="skip the post-processing the model chose on validation (keeping the largest connected "
                   "component of the labels it lists)")
    p.add_argument("--dry-run", action="store_true", help="predict memory and time per volume, segment nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the prediction as JSON")
    _memory_check_arg(p)
    _progress_arg(p)
    p.set_defaults(func=_infer)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _infer(args) -> None:
    from engine.inference.run import InferRequest, dry_run_infer, run_infer
    if args.json and not args.dry_run:
        raise UserError("--json goes with --dry-run (progress as JSON lines: --progress json)")
    if args.dry_run:
        import json

        from engine.inference.preflight import format_dry_run
        request = InferRequest(args.checkpoint, args.input, args.output, probabilities=args.probabilities,
                               tta=args.tta, device=args.device, overlap=args.overlap,
                               sw_batch_size=args.sw_batch_size)
        records = dry_run_infer(request)
        print(json.dumps(records, indent=1) if args.json else "\n".join(format_dry_run(r) for r in records))
        return
    request = InferRequest(args.checkpoint, args.input, args.output, probabilities=args.probabilities,
                           uncertainty=args.uncertainty, dicom_seg=args.dicom_seg, tta=args.tta,
                           device=args.device, overlap=args.overlap, progress=args.progress,
                           sw_batch_size=args.sw_batch_size, postprocess=args.postprocess,
                           check_memory=not args.skip_memory_check)
    written = run_infer(request)
    if args.progress != "json":
        print("\n".join(str(p) for p in written))


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95 and surface Dice per label of predicted vs reference labelmaps")
    p.add_argument("--pred", required=True, help="a labelmap, or a folder of them")
    p.add_argument("--ref", required=True, help="the reference labelmap, or a folder (matched by case name)")
    p.add_argument("--labels", help="dataset.json (or any JSON with 'labels') naming the label values")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--tolerance", type=float, default=2.0, metavar="MM",
                   help="normalised surface Dice: surface voxels within this distance count as agreeing (default 2)")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> None:
    from engine.inference.evaluate import format_table, run_evaluate
    print(format_table(run_evaluate(args.pred, args.ref, labels=args.labels, out=args.out,
                                    tolerance=args.tolerance)))


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="studies of many runs that answer one question (label efficiency)")
    kinds = p.add_subparsers(dest="study", required=True)
    q = kinds.add_parser("label-efficiency", help="pre-train MiM and MAE, fine-tune from each and from scratch on "
                         "1, 2, 4 labelled cases x seeds, Dice on held-out cases; CSV, plot, table")
    q.add_argument("--config", required=True, help="study YAML, or a preset of engine/configs/study (cpu, gpu, tiny)")
    q.add_argument("--out", help="study folder (default: the config's `out`); rerun to continue an interrupted study")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set finetune.steps=100 --set seeds=[0]")
    _progress_arg(q)
    q.set_defaults(func=_study)


def _study(args) -> None:
    from pathlib import Path

    from engine.study.run import run_label_efficiency
    summary = run_label_efficiency(args.config, out=args.out, device=args.device, progress=args.progress,
                                   overrides=parse_sets(args.set))
    if args.progress != "json":
        print(Path(summary["table"]).read_text(encoding="utf-8") + f"\nwrote {summary['csv']}, {summary['plot']}")
