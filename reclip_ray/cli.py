"""``reclip-ray`` command line. Thin: parse arguments, call the package, print JSON or one-line errors.

Heavy imports (torch, Ray, MLflow) happen inside the handlers so ``reclip-ray --help`` is instant and a typo in
a flag never waits for CUDA to initialise.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

from reclip_ray.errors import ReclipError


def _print_json(obj: Any) -> None:
    try:
        print(json.dumps(obj, indent=2, sort_keys=False, default=str), flush=True)
    except BrokenPipeError:  # `reclip-ray ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---------------------------------------------------------------------------------------------------- data


def _os_error(exc: OSError) -> ReclipError:
    """File-system mistakes (missing path, permission, disk full) in data commands become one-line errors."""
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    return ReclipError(f"{exc.strerror or exc}{where}")


def _data_synth(args: argparse.Namespace) -> int:
    from reclip_ray.data.synth import IMAGE_SIZE, make_synthetic

    try:
        summary = make_synthetic(args.out, train=args.train, eval=args.eval, seed=args.seed, shard_rows=args.shard_rows,
                                 image_size=args.image_size or IMAGE_SIZE, workers=args.workers or None,
                                 textured=args.textured)
        if args.shrink:
            from reclip_ray.storage import join

            summary["copies"] = _shrink(join(args.out, "train"), args.shrink, image_column="image")
    except OSError as exc:
        raise _os_error(exc) from None
    _print_json(summary)
    return 0


def _shrink(data: str, sizes: str, **kwargs: Any) -> dict:
    from reclip_ray.data.copies import shrink_dataset

    return shrink_dataset(data, sizes, log=lambda m: print(m, file=sys.stderr, flush=True), **kwargs)


def _data_shrink(args: argparse.Namespace) -> int:
    try:
        summary = _shrink(args.data, args.sizes, out=args.out, image_column=args.image_column, quality=args.quality,
                          workers=args.workers or None, force=args.force, on_ray=args.ray)
    except OSError as exc:
        raise _os_error(exc) from None
    _print_json(summary)
    return 0


def _data_ingest(args: argparse.Namespace) -> int:
    from reclip_ray.data.ingest import ingest_folder, ingest_webdataset

    if bool(args.webdataset) == bool(args.images):
        raise ReclipError("data ingest needs either --images DIR --captions FILE or --webdataset 'PATTERN'")
    try:
        if args.webdataset:  # any of the paths may be a URI (s3://...): see reclip_ray.storage
            summary = ingest_webdataset(args.webdataset, args.out, shard_rows=args.shard_rows)
        else:
            if not args.captions:
                raise ReclipError("data ingest --images needs --captions FILE.csv|FILE.jsonl")
            summary = ingest_folder(args.images, args.captions, args.out, shard_rows=args.shard_rows)
        if args.shrink:
            summary["copies"] = _shrink(args.out, args.shrink)
    except OSError as exc:
        raise _os_error(exc) from None
    _print_json(summary)
    return 0


def _data_tokenizer(args: argparse.Namespace) -> int:
    from reclip_ray.data.schema import OPTION_FLAG
    from reclip_ray.data.tokenizer import train_tokenizer

    try:  # the flag is passed, not set in a column_flag block: the captions are read on other threads
        tok = train_tokenizer(args.data, vocab_size=args.vocab_size, out=args.out, caption_column=args.caption_column,
                              max_captions=max(0, args.max_captions), flag=OPTION_FLAG)
    except OSError as exc:
        raise _os_error(exc) from None
    _print_json({"out": args.out, "vocab_size": tok.vocab_size})
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from reclip_ray.data.inspect import inspect_dataset
    from reclip_ray.data.schema import OPTION_FLAG, column_flag

    try:
        with column_flag(OPTION_FLAG):  # a missing column's hint names --image-column, not train's --set
            report = inspect_dataset(args.path, image_column=args.image_column, caption_column=args.caption_column,
                                     limit=args.limit)
    except OSError as exc:
        raise _os_error(exc) from None
    _print_json(report)
    return 0


# ---------------------------------------------------------------------------------------------------- train/eval


def _train(args: argparse.Namespace) -> int:
    from reclip_ray.train.command import train_from_cli

    return train_from_cli(args.config, args.set, as_json=args.json, verbose=args.verbose)


def _report(args: argparse.Namespace) -> int:
    from reclip_ray.report import report_run

    print(report_run(args.run_dir, tracking_uri=args.tracking_uri), flush=True)
    return 0


def _check_sizes(args: argparse.Namespace) -> None:
    """``--image-size`` (and ``--batch-size``) as one line here, not as an exception from deep in a decode, a
    position-embedding resample or a ``range``; a size that is not a multiple of the patch size is refused where
    the model is known (``evaluate_checkpoint``, ``openclip.grid_pos_embed``)."""
    if args.image_size < 0:
        raise ReclipError(f"--image-size must be 0 (the model's full resolution) or a size in pixels, "
                          f"got {args.image_size}")
    if getattr(args, "batch_size", 1) < 1:
        raise ReclipError(f"--batch-size must be >= 1, got {args.batch_size}")


def _eval(args: argparse.Namespace) -> int:
    from reclip_ray.data.schema import OPTION_FLAG, column_flag
    from reclip_ray.evaluation.checkpoint import evaluate_checkpoint

    _check_sizes(args)
    with column_flag(OPTION_FLAG):  # a missing column's hint names --image-column, not train's --set
        metrics = evaluate_checkpoint(args.checkpoint, args.data, classes_path=args.classes,
                                      image_size=args.image_size, batch_size=args.batch_size,
                                      caption_column=args.caption_column, image_column=args.image_column,
                                      label_column=args.label_column)
    _print_json(metrics)
    return 0


def _export(args: argparse.Namespace) -> int:
    """An exported model (a run's model/ folder) rewritten for another ecosystem; no Ray. Either may be a URI."""
    from reclip_ray import storage
    from reclip_ray.export import export_model, load_export
    from reclip_ray.openclip import OPEN_CLIP_CONFIG

    _check_sizes(args)
    model, tokenizer, cfg = load_export(args.model_dir)
    out = str(export_model(model, tokenizer, cfg, args.out, format=args.format, image_size=args.image_size or None))
    meta = storage.read_json(storage.join(out, OPEN_CLIP_CONFIG))["reclip_ray"]
    summary = {"out": out, "format": args.format, "image_size": meta["image_size"], "tokenizer": meta["tokenizer"]}
    if not storage.is_uri(out):  # open_clip loads a local folder only: a remote export is downloaded first
        summary["open_clip"] = f"local-dir:{out}"
    _print_json(summary)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from reclip_ray.sweep import sweep_from_cli

    return sweep_from_cli(args.space, args.config, args.set, verbose=args.verbose)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"reclip_ray.bench.{args.what}")
    return module.main(args.rest)


def _plan(args: argparse.Namespace) -> int:
    """Config only: no Ray, no torch, no data, so a plan is free even for a config meant for a cluster."""
    from reclip_ray.plan import format_plan, plan_run

    plan = plan_run(args.config, args.set, gpus=args.gpus, gpu=args.gpu, mfu=args.mfu, decode_rates=args.decode_rates)
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(format_plan(plan), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """One small function per subcommand below, each adding its arguments and its handler (``func``)."""
    parser = argparse.ArgumentParser(prog="reclip-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="make, ingest, tokenize and inspect datasets").add_subparsers(
        dest="data_command", required=True
    )
    for add in (_add_data_synth, _add_data_ingest, _add_data_shrink, _add_data_tokenizer, _add_data_inspect):
        add(data)
    for add in (_add_train, _add_report, _add_eval, _add_export, _add_sweep, _add_bench, _add_plan):
        add(sub)
    return parser


def _add_data_synth(data: argparse._SubParsersAction) -> None:
    p = data.add_parser("synth", help="write the captioned-shapes dataset (train + eval splits)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--eval", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=0, metavar="PX",
                   help="side of every image, 32-256 (default 128); 256 to train a 224 px phase without upscaling")
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing the images (default: one per core from 4,000 rows, else one)")
    p.add_argument("--shrink", default="", metavar="SIZES", help="also store shrunk copies of the train split, e.g. 40,80")
    p.add_argument("--textured", action="store_true",
                   help="textured backgrounds and their label set 'background': detail that 32 px cannot show")
    p.set_defaults(func=_data_synth)


def _add_data_ingest(data: argparse._SubParsersAction) -> None:
    p = data.add_parser("ingest", help="convert a folder of images + captions, or webdataset tars, to Parquet shards")
    p.add_argument("--images")
    p.add_argument("--captions")
    p.add_argument("--webdataset")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--shrink", default="", metavar="SIZES", help="then store shrunk copies (as `data shrink`), e.g. 40,80")
    p.set_defaults(func=_data_ingest)


def _add_data_shrink(data: argparse._SubParsersAction) -> None:
    p = data.add_parser("shrink", help="store small JPEG copies (e.g. 40,80 px shorter side) next to every image, "
                                       "for the low-resolution phases")
    p.add_argument("data", metavar="DATA", help="dataset folder (its shards are rewritten in place, atomically)")
    p.add_argument("--sizes", required=True, help="shorter sides in px, e.g. 40,80 (a 64 px phase reads the 80 px copy)")
    p.add_argument("--out", default=None, help="write the shards with copies to this folder instead of in place")
    p.add_argument("--image-column", default="image")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    p.add_argument("--ray", action="store_true",
                   help="one Ray task per shard over the cluster $RAY_ADDRESS names (ray job submit sets it), "
                        "instead of processes on this machine")
    p.add_argument("--force", action="store_true", help="remake copies that already exist")
    p.set_defaults(func=_data_shrink)


def _add_data_tokenizer(data: argparse._SubParsersAction) -> None:
    p = data.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a dataset's captions")
    p.add_argument("--data", required=True)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--out", required=True)
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--max-captions", type=int, default=1_000_000,
                   help="train on the first N captions (0: all; the default matches data.tokenizer_sample_captions)")
    p.set_defaults(func=_data_tokenizer)


def _add_data_inspect(data: argparse._SubParsersAction) -> None:
    p = data.add_parser("inspect", help="rows, shards, columns, bad rows, image sizes (JSON)")
    p.add_argument("path")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--limit", type=int, default=0, help="decode at most this many rows (0: all)")
    p.set_defaults(func=_data_inspect)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a RECLIP training job (no arguments: the embedded default)")
    p.add_argument("--config", default=None, help="preset name (tiny, small, vit-b-16, vit-l-16) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. phases.0.image_size=48")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON instead of the summary table")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output here instead of in RUN_DIR/ray.log")
    p.set_defaults(func=_train)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="draw RUN_DIR/report.png from the run's MLflow history (prints its path)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (run.storage_path/run.name)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: the one in RUN_DIR/reclip_run.json, else $MLFLOW_TRACKING_URI, "
                        "else ./mlflow.db)")
    p.set_defaults(func=_report)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot classification and retrieval of an exported model (JSON)")
    p.add_argument("--checkpoint", required=True,
                   help="exported model directory (the run's model/ folder, an MLflow model artifact, or an open_clip "
                        "folder: `reclip-ray export --format open_clip`)")
    p.add_argument("--data", required=True)
    p.add_argument("--classes", default=None, help="JSON list of class names (or {classes, templates})")
    p.add_argument("--image-size", type=int, default=0, help="0: the model's full resolution")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-column", default=None,
                   help="the eval set's image column (default: the run's data.image_column, else 'image')")
    p.add_argument("--caption-column", default=None,
                   help="the eval set's caption column (default: the run's data.caption_column, else 'caption')")
    p.add_argument("--label-column", default=None,
                   help="the column dataset.json's classes are for (default: the run's data.label_column, else "
                        "'label'; CLIP_benchmark's sets: cls)")
    p.set_defaults(func=_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="rewrite an exported model for open_clip (a `local-dir:` folder)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory (the run's model/ folder)")
    p.add_argument("--format", choices=["open_clip"], default="open_clip")
    p.add_argument("--out", required=True, help="folder to write (an earlier export there is replaced; any other "
                                                "content is refused)")
    p.add_argument("--image-size", type=int, default=0, help="0: the model's full resolution")
    p.set_defaults(func=_export)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune search over resolution / phase-length schedules")
    p.add_argument("--space", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output and the trials' training logs here instead of in SWEEP_DIR/ray.log")
    p.set_defaults(func=_sweep)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON lines)")
    p.add_argument("what", choices=["data", "model", "e2e", "step"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="FLOPs, RECLIP saving, wall time and decode cores of a run, from its config alone")
    p.add_argument("--config", default=None, help="preset name (tiny, small, vit-b-16, vit-l-16) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, default=None, help="price the run on N GPUs (wall time, decode cores)")
    p.add_argument("--gpu", default=None, help="h100 (default), h100-pcie, a100 or h200: dense bf16 peak")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--decode-rates", default=None, metavar="FILE.jsonl", help="`reclip-ray bench data` output")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=_plan)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except ReclipError as exc:
        print(f"reclip-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reclip-ray: interrupted", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """End the process as the interpreter's own exit would, minus freeing its objects one by one.

    Once a command has loaded torch, Ray, MLflow, pandas and matplotlib (some 770,000 objects), Python's teardown
    kept the process alive seconds after its last line: a short `reclip-ray train` ended 2.5 s after its summary,
    0.8 s with this; `reclip-ray report` 0.65 s after its last line, 0.01 s with this (BENCHMARKS.md, "CLI exit").
    The parts of that exit which matter are done here, in the interpreter's order: non-daemon threads joined
    (``threading._shutdown``, which first stops idle thread pools), then the ``atexit`` handlers (Ray's shutdown,
    MLflow's and logging's flushes, weakref finalizers such as TemporaryDirectory's cleanup), then stdio flushed.
    What is skipped is returning memory the OS takes back anyway, and the flush of a buffered file nobody closed:
    this package writes through with-blocks and atomic renames, as its "loses nothing" rule requires regardless.
    """
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # an interpreter without the hook: its own exit, slow but complete
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    os._exit(code)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):  # a closed or broken pipe: nothing left to deliver
        pass


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The process entry point: ``reclip-ray``, ``python -m reclip_ray`` and the ``jobs/`` scripts. ``main`` is
    for callers in a Python process that goes on (tests, notebooks): it returns the exit status instead."""
    exit_process(main(argv))


if __name__ == "__main__":
    run()
