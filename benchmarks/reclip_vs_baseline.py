"""RECLIP vs full-resolution baseline vs low-resolution only, at the same batch size and number of samples.

    python benchmarks/reclip_vs_baseline.py                 # tiny preset, 192k samples, 1 seed: ~25 min on 2 cores
    python benchmarks/reclip_vs_baseline.py --seeds 0,1,2   # the spread over seeds
    python benchmarks/reclip_vs_baseline.py --finetune 0.05,0.1 --base-image-size 32,112 --low 32 --full 112 \
        --name evidence_112px --seeds 0,1                   # issue 14: finetune-share and position-grid ablations
    python benchmarks/reclip_vs_baseline.py --config vit-b-16 --low 64 --full 224 --workers 1 --use-gpu true ...
    python benchmarks/reclip_vs_baseline.py --dry-run ...   # the plan: arms, run keys, FLOPs and their ratios
    ray job submit --working-dir . -- python benchmarks/reclip_vs_baseline.py --seeds 0

The paper's comparison: same batch, same samples seen, so the only difference is the resolution schedule.
- baseline:   full resolution (``--full`` px, ``--full-text`` tokens) for every sample;
- reclip-F%:  ``--low`` px / ``--low-text`` tokens for 1 - F of the samples, then F at full resolution with its own
              warmup and peak LR (``--finetune-lr``); one arm per share in ``--finetune 0.05,0.1``, and with
              ``--base-image-size 32,112`` one per position-embedding grid as well (``reclip-10%-pos32``: the table
              is stored on that grid and resampled by timm's dynamic_img_size for the other size);
- lowres:     ``--low`` px for every sample, no finetune (the ablation), evaluated at full resolution too.
Every run is a real reclip-ray training run (Ray Train workers, Ray Data input) logged to one MLflow experiment;
metrics are evaluated at full resolution on the eval split, for every label set its dataset.json lists. The data
(the synthetic captioned-shapes set at ``--synth-image-size`` px, plus the shrunk copies the low phase reads) is made
under ``--data`` first unless it is there; ``--synth-textured`` adds the background-texture label set, the one a
32 px image cannot show.

Results: ``benchmarks/results/NAME.json``, ``.csv`` and ``.png`` (accuracy vs training GFLOPs), NAME from ``--name``
(default ``reclip_vs_baseline``), written after every run. Each run has a key (a hash of its arm, seed, resolved
config minus run/tracking/checkpoint settings, and the dataset's description), and a rerun with the same NAME skips
every run whose key is already in the file: an interrupted experiment resumes where it stopped (a run interrupted
part way restarts from its own last checkpoint, if it wrote one: its run name carries the key). Rows of other settings are kept in the file
under ``other_rows``, not summarised. Prints a Markdown table (mean +- half-range over seeds; GFLOPs of the whole
run and of the image tower, and their ratios to the baseline; chance levels) and the issue-14 targets per arm.

Why 192k samples and a peak LR of 1e-3: at 64k samples (and the tiny preset's 5e-4) every arm was still at chance on
the shape set, so the comparison said nothing about anything but colour; at 192k a 32 px run reaches ~0.5 shape top-1.

Real images (issue 23): ``--data`` a folder made by ``benchmarks/emoji_data.py`` and ``--eval-splits
eval_style,eval_emoji`` (the held-out art style first: the targets are read on the first split). Every arm is
evaluated at full resolution on each split: the first is the trainer's ``data.eval`` (evaluated at phase ends,
logged as ``eval/128px/...``); each other split is evaluated after training, in this process, from the model the
run exported (``evaluation.checkpoint.evaluate_checkpoint``, what ``reclip-ray eval`` runs) and logged to the same MLflow run as
``SPLIT/128px/...``. Rows then have ``SPLIT/METRIC`` columns (plus ``SPLIT/rows`` and mean per-class recall), the
run key covers every split's dataset.json, and such data is never made here. ``--long-finetune 20000`` adds
``reclip-ft20k``: the same samples, the last 20,000 at full resolution.

The issue-23 experiment, and how its budget was sized (2026-12-04, the 2-core VM shared with other helpers' Ray
tests, load average 1.5-4 during the measurements, so later runs may be slower or faster):

    python benchmarks/emoji_data.py --out /tmp/emoji --workers 2 --shrink 40     # ~30 s from the cached tarballs
    OMP_NUM_THREADS=1 python benchmarks/reclip_vs_baseline.py --name emoji_128px --data /tmp/emoji \
        --eval-splits eval_style,eval_emoji --config tiny --low 32 --low-text 16 --full 128 --full-text 32 \
        --arms baseline,reclip,lowres --finetune 0.05,0.1 --long-finetune 20000 \
        --set model.vision.base_image_size=128 --samples 80000 --batch 128 --seeds 0,1 --workers 2 \
        --out /tmp/emoji_bench

- Rates through this script (2 workers, tiny preset, patch 8, batch 128; the run log's per-window samples/s):
  128 px 73-79 samples/s (an 8,192-sample baseline; the first window, warming up, 38); 32 px from the 40 px copies
  690-740 samples/s on a quiet machine and 384-510 while other helpers' tests ran (an 80,000-sample lowres run: 184 s
  wall; rows in results/emoji_rates_probe.json). Each run costs ~45 s besides its samples (Ray and the worker group
  starting, the export, the first split's evaluation) and 9-18 s for the second split; a RECLIP arm adds the
  evaluation after its 32 px phase.
- Learnability. An 8,192-sample 128 px baseline: eval_style category / subcategory top-1 0.212 / 0.019, R@5
  i2t / t2i 0.010 / 0.006; eval_emoji 0.229 / 0.036, 0.018 / 0.016. The 80,000-sample 32 px run (loss 4.85 -> 2.86)
  at 128 px: eval_style 0.201 / 0.026, R@5 0.009 / 0.009; eval_emoji 0.281 / 0.065, 0.032 / 0.036. Chance: category
  0.111, but the largest category (people and body) is 19-21 % of each split, which a classifier stuck on it scores;
  subcategory 0.010; R@5 0.0031 (eval_style, 1,597 rows) and 0.0045 (eval_emoji, 1,116). So at 80k samples the
  unseen-emoji split is well above chance on subcategory and retrieval (6-8x), the unseen style only 2.6-3x, and
  category top-1 near the majority share. A single-process check at 128 px (``emoji_learning.py --size 128
  --samples 24000``, results/emoji_learning_s128_24k.jsonl) was still at chance on category after 24k samples. The
  128 px baseline's loss tracks the 32 px run's per sample (4.40 vs 4.38 after ~8k): that it reaches at least the
  32 px run's numbers at 80k is an expectation, not a measurement.
- Arithmetic (``--dry-run ... --rates 32=600,128=75 --overhead-s 25``: samples / rate per phase + 25 s per run start
  and per phase end), per seed: baseline 80,000/75 + 50 = 1,117 s; reclip-5% 76,000/600 + 4,000/75 + 75 = 255 s;
  reclip-10% 302 s; reclip-ft20k 60,000/600 + 20,000/75 + 75 = 442 s; lowres 80,000/600 + 50 = 183 s. Total 2,299 s
  per seed, 4,597 s = 77 min for two; at a third slower rates (400 / 50) 110 min. 64,000 samples would be 65 / 92
  min but further from "far above chance"; the runs go seed by seed, so seed 0's five arms finish first (~38 min)
  and an interrupted run resumes with the same command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_NAME = "reclip_vs_baseline"
DEFAULT_SPLIT = "eval"  # the synthetic data's one eval split; its metrics keep their names without a split prefix
KINDS = ("baseline", "reclip", "lowres")
RETRIEVAL = ("image_to_text_r@1", "image_to_text_r@5", "text_to_image_r@1", "text_to_image_r@5")
# issue 14's targets for a RECLIP arm against the baseline
TARGET_FLOPS_SAVING, TARGET_IMAGE_FLOPS_SAVING = 5.0, 8.0
TARGET_TOP1_KEPT, TARGET_R5_KEPT, LEARNED_VS_CHANCE = 0.95, 0.90, 2.0
# issue 25's target for a lever on top of RECLIP (--reference reclip-5%): >= 1.5x fewer training FLOPs, >= 97% kept
TARGET_LEVER_SAVING, TARGET_LEVER_KEPT = 1.5, 0.97


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # baseline | reclip | lowres
    finetune: float = 0.0  # share of the samples at full resolution (reclip)
    base_image_size: int = 0  # model.vision.base_image_size for this arm; 0: the config's
    finetune_samples: int = 0  # reclip: this many samples at full resolution instead of the share (--long-finetune)
    patch_dropout: float = 0.0  # reclip: phases.0.patch_dropout of the low phase (--low-patch-dropout)
    equal_gflops: bool = False  # reclip with patch dropout: more low-phase samples, as many GFLOPs as without it
    loss: str = "clip"  # train.loss (--losses)


def share_label(share: float) -> str:
    """0.1 -> '10%', 0.05 -> '5%', 0.075 -> '7.5%'."""
    return f"{round(share * 100, 6):g}%"


def count_label(samples: int) -> str:
    """20000 -> '20k', 2500 -> '2500'."""
    return f"{samples // 1000}k" if samples % 1000 == 0 else str(samples)


def arm_name(kind: str, finetune: float = 0.0, base_image_size: int = 0, finetune_samples: int = 0,
             patch_dropout: float = 0.0, equal_gflops: bool = False, loss: str = "clip") -> str:
    """``baseline``, ``lowres``, ``reclip-10%``, ``reclip-10%-pos32`` (position grid 32 px), ``reclip-ft20k`` (a
    finetune of 20,000 samples); issue 25's: ``reclip-5%-pd50`` (50% of the low phase's patches dropped, same
    samples), ``reclip-5%-pd50-eq`` (the same at the GFLOPs of ``reclip-5%``: more samples), ``reclip-5%-siglip``."""
    if kind != "reclip":
        return kind
    name = f"reclip-ft{count_label(finetune_samples)}" if finetune_samples else f"reclip-{share_label(finetune)}"
    name = f"{name}-pos{base_image_size}" if base_image_size else name
    if patch_dropout:
        name += f"-pd{share_label(patch_dropout).rstrip('%')}" + ("-eq" if equal_gflops else "")
    return name if loss == "clip" else f"{name}-{loss}"


def run_name(arm: str, seed: int, key: str) -> str:
    """The run's folder and MLflow name: no '%' (it would read as a percent-escape in a storage URI)."""
    return f"{arm.replace('%', 'pct')}-s{seed}-{key[:8]}"


def parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in str(text).split(",") if x.strip()]


def plan_arms(arms: str, finetunes: list[float], base_sizes: list[int], long: list[int] = (),
              samples: int = 0, dropouts: list[float] = (), equal_gflops: bool = False,
              losses: list[str] = ("clip",)) -> list[Arm]:
    """The arms to run, in order: every reclip share x position grid where ``reclip`` is listed, then every
    absolute finetune length in ``long`` (of ``samples`` in all) x position grid; then issue 25's variants of each
    reclip arm so far: its low phase with each patch dropout in ``dropouts`` (and, with ``equal_gflops``, at its
    GFLOPs), and with each loss in ``losses`` other than clip."""
    out: list[Arm] = []
    for kind in parse_list(arms, str):
        kind = kind.strip()
        if kind not in KINDS:
            raise SystemExit(f"unknown arm '{kind}'; valid: {', '.join(KINDS)}")
        if kind != "reclip":
            out.append(Arm(kind, kind))
            continue
        for f in finetunes:
            if not 0.0 < f < 1.0:
                raise SystemExit(f"--finetune shares must be in (0, 1), got {f}")
            for b in base_sizes or [0]:
                out.append(Arm(arm_name("reclip", f, b), "reclip", f, b))
        for n in long:
            if not 0 < n < samples:
                raise SystemExit(f"--long-finetune must be between 0 and --samples ({samples}) samples, got {n}")
            for b in base_sizes or [0]:
                out.append(Arm(arm_name("reclip", 0.0, b, n), "reclip", n / samples, b, n))
    out += variants([a for a in out if a.kind == "reclip"], dropouts, equal_gflops, losses)
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"arms repeat: {names}")
    return out


def variants(plain: list[Arm], dropouts: list[float], equal_gflops: bool, losses: list[str]) -> list[Arm]:
    """Issue 25's levers on top of RECLIP, one at a time against the plain reclip arm they vary."""
    out = []
    for d in dropouts:
        if not 0.0 < d < 1.0:
            raise SystemExit(f"--low-patch-dropout must be in (0, 1), got {d}")
        for eq in (False, True) if equal_gflops else (False,):
            out += [replace(a, name=arm_name("reclip", a.finetune, a.base_image_size, a.finetune_samples, d, eq),
                            patch_dropout=d, equal_gflops=eq) for a in plain]
    for loss in losses:
        if loss not in ("clip", "siglip"):
            raise SystemExit(f"--losses: clip or siglip, got {loss!r}")
        if loss != "clip":
            out += [replace(a, name=arm_name("reclip", a.finetune, a.base_image_size, a.finetune_samples,
                                             loss=loss), loss=loss) for a in plain]
    return out


def kind_of(row: dict) -> str:
    """A row's arm kind (rows written before arms had kinds: the name's first word)."""
    return row.get("kind") or str(row["arm"]).split("-")[0]


def arm_sort_key(row: dict) -> tuple:
    kind = kind_of(row)
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), float(row.get("finetune") or 0.0),
            int(row.get("base_image_size") or 0) if kind == "reclip" else 0, str(row["arm"]))


def arm_overrides(arm: Arm, args: argparse.Namespace) -> list[str]:
    """--set overrides of one arm's schedule (on top of the common ones)."""
    low = f"{{name: lowres, image_size: {args.low}, text_length: {args.low_text}"
    full = f"{{name: full, image_size: {args.full}, text_length: {args.full_text}"
    if arm.kind == "baseline":
        return [f"phases=[{full}, samples: 1.0}}]"]
    if arm.kind == "reclip":
        if arm.finetune_samples:  # counts, not shares: the finetune is exactly that many samples
            main, tail = args.samples - arm.finetune_samples, arm.finetune_samples
        else:
            main, tail = round(1 - arm.finetune, 9), arm.finetune
        extra = [] if arm.loss == "clip" else [f"train.loss={arm.loss}"]
        if arm.patch_dropout:
            low += f", patch_dropout: {arm.patch_dropout}"
            if arm.equal_gflops:
                main, tail = equal_gflops_counts(arm, args)
                extra.append(f"train.samples={main + tail}")
        return [f"phases=[{low}, samples: {main}}}, {full}, samples: {tail}, lr: {args.finetune_lr}, "
                f"warmup_samples: 0.1}}]"] + extra
    # scored as the other arms are: at the full image size and text length (captions cut at --low-text otherwise)
    return [f"phases=[{low}, samples: 1.0}}]", f"eval.full_image_size={args.full}",
            f"eval.full_text_length={args.full_text}"]


def equal_gflops_counts(arm: Arm, args: argparse.Namespace) -> tuple[int, int]:
    """(low-phase samples, finetune samples) of a patch-dropout arm at its plain arm's training GFLOPs: the finetune
    keeps its count, the low phase gets the samples the dropped patches paid for (rounded to whole global batches,
    so the match is within one batch of low-phase FLOPs)."""
    from reclip_ray.flops import phase_train_flops_per_sample

    plain = arm_config(replace(arm, patch_dropout=0.0, equal_gflops=False), 0, args)
    dropped = arm_config(replace(arm, equal_gflops=False), 0, args)
    main, tail = plain.phase_samples()
    per_plain, per_dropped = (phase_train_flops_per_sample(c, 0) for c in (plain, dropped))
    batch = args.batch
    return round(main * per_plain / per_dropped / batch) * batch, tail


def common_overrides(seed: int, args: argparse.Namespace) -> list[str]:
    """Every arm's overrides: the shared budget, the data's columns and a tokenizer trained on it, the first eval
    split (the trainer evaluates it at phase ends), a fixed worker count (so wall times compare), MLflow and the run
    folders under --out."""
    out = [
        f"train.samples={args.samples}", f"train.batch_size={args.batch}", f"train.seed={seed}",
        f"data.train={args.data}/train", f"data.eval={args.data}/{args.eval_splits[0]}", "data.synth_if_missing=false",
        "data.image_column=image", "data.caption_column=caption", "data.tokenizer=",
        f"data.vocab_size={args.vocab_size}",
        f"run.storage_path={args.out}/runs", f"tracking.uri={args.tracking_uri}",
        "tracking.experiment=reclip_vs_baseline", "checkpoint.every_samples=0", "eval.at_phase_end=true",
        f"scaling.min_workers={args.workers}", f"scaling.max_workers={args.workers}",
        f"optim.lr={args.lr}", f"optim.warmup_samples={args.warmup}",
    ]
    if args.use_gpu:
        out.append(f"scaling.use_gpu={args.use_gpu}")
    return out


def arm_config(arm: Arm, seed: int, args: argparse.Namespace) -> Any:
    """The arm's validated Config: common, then the schedule, then --set, then the arm's position grid."""
    from reclip_ray.config import ConfigError, load_config

    pos = [f"model.vision.base_image_size={arm.base_image_size}"] if arm.base_image_size else []
    try:
        return load_config(args.config, common_overrides(seed, args) + arm_overrides(arm, args) + list(args.set) + pos)
    except ConfigError as exc:
        raise SystemExit(f"arm {arm.name}: {exc}") from None


def data_fingerprint(data: str, splits: list[str] | tuple[str, ...] = (DEFAULT_SPLIT,)) -> dict:
    """What of the dataset decides a run's result (not the copies or timings dataset.json also records): train and
    every eval split, so a run evaluated on other splits is another run."""
    from reclip_ray.data.schema import read_dataset_json

    keep = ("rows", "source", "seed", "image_size", "label_sets", "full_size", "heldout_share", "styles",
            "duplicates_dropped")  # the last four: emoji_data.py's
    out = {}
    for split in ("train", *splits):
        meta = read_dataset_json(f"{data}/{split}") if Path(f"{data}/{split}").exists() else {}
        out[split] = {k: meta[k] for k in keep if k in meta}
    return out


def run_key(arm: str, seed: int, cfg_dict: dict, data: dict) -> str:
    """Same key = same run: the arm, the seed, the resolved config minus where it is stored/logged and how often it
    checkpoints (a resumed run continues exactly: ``--set checkpoint.every_samples=N`` may be added on a rerun), and
    the data."""
    settings = {k: v for k, v in cfg_dict.items() if k not in ("run", "tracking", "checkpoint")}
    blob = json.dumps({"arm": arm, "seed": seed, "config": settings, "data": data}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def flops_of(cfg: Any) -> dict[str, float]:
    """The run's training GFLOPs: all of it, the image tower's and the text tower's (flops.run_flops)."""
    from reclip_ray.flops import run_flops

    f = run_flops(cfg)
    return {"train_gflops": f["total_train_gflops"], "image_gflops": f["total_image_train_gflops"],
            "text_gflops": f["total_text_train_gflops"]}


def ensure_data(args: argparse.Namespace) -> float:
    """Make the synthetic dataset and the copies the low phase reads under --data, unless it exists; seconds spent.
    Data with other eval splits (--eval-splits) is never made here: it must be there, every split of it."""
    train = Path(args.data) / "train"
    if args.eval_splits != [DEFAULT_SPLIT]:
        for split in ["train", *args.eval_splits]:
            if not (Path(args.data) / split / "dataset.json").is_file():
                raise SystemExit(f"{args.data}/{split}: no dataset (dataset.json) there; --eval-splits names "
                                 "splits of a dataset made beforehand, e.g. `python benchmarks/emoji_data.py --out "
                                 f"{args.data} --shrink 40`")
        return 0.0
    if train.exists():
        size = data_fingerprint(args.data)["train"].get("image_size")
        if args.synth_image_size and size and size != args.synth_image_size:
            print(f"[bench] note: {args.data} holds {size} px images (made earlier), not --synth-image-size "
                  f"{args.synth_image_size}; using them", flush=True)
        return 0.0
    from reclip_ray.data.copies import shrink_dataset, sizes_for_phases
    from reclip_ray.data.synth import IMAGE_SIZE, make_synthetic

    side = args.synth_image_size or IMAGE_SIZE
    t0 = time.perf_counter()
    print(f"[bench] making the synthetic dataset: {args.synth_train} train + {args.synth_eval} eval rows at {side} px "
          f"under {args.data} ...", flush=True)
    make_synthetic(args.data, train=args.synth_train, eval=args.synth_eval, seed=args.synth_seed, image_size=side,
                   textured=args.synth_textured)
    sizes = sizes_for_phases([args.low, args.full], source_side=side)
    if sizes:
        shrink_dataset(train, sizes, image_column="image", log=None)
    seconds = time.perf_counter() - t0
    print(f"[bench] data made in {seconds:.1f} s (copies: {sizes or 'none'})", flush=True)
    return seconds


def run_arm(arm: Arm, seed: int, cfg: Any, key: str, args: argparse.Namespace, label_sets: list[str]) -> dict:
    """Train one arm for one seed (cfg from ``arm_config``) and return its row."""
    from reclip_ray.train.launch import run_training

    cfg.run.name = run_name(arm.name, seed, key)
    flops = flops_of(cfg)  # before run_training, which resolves paths in cfg
    t0 = time.perf_counter()
    metrics = run_training(cfg)
    wall = time.perf_counter() - t0
    by_split, eval_s = None, 0.0
    if args.eval_splits != [DEFAULT_SPLIT]:
        t0 = time.perf_counter()
        by_split = evaluate_splits(metrics, args)
        eval_s = time.perf_counter() - t0
    row = make_row(arm, seed, key, cfg.model.vision.base_image_size, flops, metrics, wall, args.full, label_sets,
                   by_split=by_split, eval_s=eval_s)
    print(json.dumps(row), flush=True)
    return row


def evaluate_splits(metrics: dict, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{split: metrics at full resolution}. The first split's are the trainer's last evaluation (it is data.eval);
    every other split (and the first, if that evaluation failed) is evaluated here, in the driver, from the model
    the run exported (``evaluation.checkpoint.evaluate_checkpoint``, as ``reclip-ray eval`` does) and logged to the same MLflow
    run as ``SPLIT/FULLpx/METRIC``. That costs one forward pass over the split per run and no trainer change;
    the trainer's ``data.eval`` stays one path."""
    import torch

    from reclip_ray import tracking
    from reclip_ray.evaluation.checkpoint import evaluate_checkpoint

    prefix = f"eval/{args.full}px/"
    out: dict[str, dict[str, float]] = {}
    first = {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the workers are gone: the driver may use every core
    try:
        for i, split in enumerate(args.eval_splits):
            if i == 0 and first:
                out[split] = first
                continue
            got = evaluate_checkpoint(f"{metrics['run_dir']}/model", f"{args.data}/{split}", image_size=args.full)
            out[split] = {k: float(v) for k, v in got["metrics"].items() if isinstance(v, (int, float))}
            run_id = metrics.get("mlflow_run_id")
            if run_id:
                tracking.log_metrics(args.tracking_uri, run_id,
                                     {f"{split}/{args.full}px/{k}": v for k, v in out[split].items()},
                                     step=max(0, tracking.last_logged_step(args.tracking_uri, run_id)))
            print(f"[bench] {split} at {args.full} px: " + ", ".join(
                f"{k} {v:.3f}" for k, v in out[split].items() if k.endswith(("/top1", "r@5"))), flush=True)
    finally:
        torch.set_num_threads(threads)
    return out


def make_row(arm: Arm, seed: int, key: str, base_image_size: int, flops: dict[str, float], metrics: dict,
             wall: float, full: int, label_sets: list[str], by_split: dict[str, dict[str, float]] | None = None,
             eval_s: float = 0.0) -> dict:
    """One result row: the run's identity, FLOPs and time, and its full-resolution eval metrics (NaN if absent):
    the trainer's (``metrics``), or with ``by_split`` (``evaluate_splits``) every split's as ``SPLIT/METRIC``."""
    samples = int(metrics.get("samples", 0))
    row: dict[str, Any] = {
        "arm": arm.name, "kind": arm.kind, "finetune": arm.finetune, "finetune_samples": arm.finetune_samples,
        "patch_dropout": arm.patch_dropout, "equal_gflops": arm.equal_gflops, "loss": arm.loss,
        "base_image_size": base_image_size,
        "seed": seed, "key": key, "samples": samples, **flops,
        "gflops_logged": float(metrics.get("gflops_total", 0.0)),
        "wall_s": round(wall, 1), "samples_per_s": round(samples / wall, 1) if wall > 0 else float("nan"),
        "mlflow_run_id": metrics.get("mlflow_run_id"), "run_dir": metrics.get("run_dir"),
    }
    if by_split is None:
        prefix = f"eval/{full}px/"
        for m in metric_names(label_sets):
            row[m] = float(metrics.get(prefix + m, float("nan")))
        return row
    row["split_eval_s"] = round(eval_s, 1)
    # Raw columns beyond the tables': how many rows were scored, and mean per-class recall (its chance is 1/classes
    # however unbalanced the classes are; top-1 of a classifier stuck on the largest class is that class's share).
    extra = ["rows"] + [f"{s}/mean_per_class_recall" for s in label_sets]
    for split, values in by_split.items():
        for m in metric_names(label_sets) + extra:
            row[f"{split}/{m}"] = float(values.get(m, float("nan")))
    return row


def is_split_mode(splits: list[str] | None) -> bool:
    return bool(splits) and list(splits) != [DEFAULT_SPLIT]


def metric_names(label_sets: list[str], splits: list[str] | None = None) -> list[str]:
    """Zero-shot top-1 of every label set, then retrieval R@1/R@5 both ways; with eval splits other than the one
    default split, those of every split, as ``SPLIT/METRIC``."""
    names = [f"{s}/top1" for s in label_sets] + list(RETRIEVAL)
    return [f"{split}/{m}" for split in splits for m in names] if is_split_mode(splits) else names


def mean_half_range(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds; (nan, nan) for none."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (max(vals) - min(vals)) / 2


def saving(baseline: float, arm: float) -> float:
    """How many times fewer (GFLOPs) the arm costs than the baseline."""
    return baseline / arm if arm and not math.isnan(arm) else float("nan")


def summarise(rows: list[dict], metrics: list[str], reference: str = "baseline") -> list[dict]:
    """Per arm: mean and half-range over seeds of every metric and of the wall time; the run's GFLOPs (all of it and
    the image tower's; the same for every seed) and how many times fewer than the baseline's; each metric's mean
    relative to the baseline's mean. ``reference``: the arm the ratios are against (``--reference``; still named
    ``*_vs_baseline`` and ``flops_saving``)."""
    nan = float("nan")
    out = []
    base = [r for r in rows if r["arm"] == reference]
    base_flops = {k: statistics.mean(float(r.get(k, nan)) for r in base) if base else nan
                  for k in ("train_gflops", "image_gflops")}  # no baseline arm (--arms reclip): no ratios
    for arm in dict.fromkeys(r["arm"] for r in sorted(rows, key=arm_sort_key)):
        rs = [r for r in rows if r["arm"] == arm]
        s: dict[str, Any] = {"arm": arm, "kind": kind_of(rs[0]), "seeds": len(rs),
                             "base_image_size": rs[0].get("base_image_size")}
        for k in ("train_gflops", "image_gflops"):
            s[k] = statistics.mean(float(r.get(k, nan)) for r in rs)
        s["wall_s"], s["wall_s_spread"] = mean_half_range([r["wall_s"] for r in rs])
        if base:
            s["flops_saving"] = saving(base_flops["train_gflops"], s["train_gflops"])
            s["image_flops_saving"] = saving(base_flops["image_gflops"], s["image_gflops"])
        for m in metrics:
            s[m], s[m + "_spread"] = mean_half_range([float(r.get(m, nan)) for r in rs])
            if base:
                b = statistics.mean(float(r.get(m, nan)) for r in base)
                s[m + "_vs_baseline"] = s[m] / b if b else nan
        out.append(s)
    return out


def lever_targets(summary: list[dict], chance: dict[str, float], label_sets: list[str], splits: list[str] | None,
                  reference: str) -> list[dict]:
    """Issue 25's target for every arm against ``reference`` (a plain RECLIP arm): >= 1.5x fewer training FLOPs at
    >= 97% of its top-1 on every label set it learned (>= 2x chance) and of its R@5 both ways, on every split."""
    ref = next((s for s in summary if s["arm"] == reference), None)
    if ref is None:
        return []
    nan = float("nan")
    prefixes = [f"{x}/" for x in splits] if is_split_mode(splits) else [""]
    names = [f"{p}{n}/top1" for p in prefixes for n in label_sets
             if ref.get(f"{p}{n}/top1", nan) >= LEARNED_VS_CHANCE * chance.get(f"{p}{n}/top1", nan)]
    names += [f"{p}{m}" for p in prefixes for m in ("image_to_text_r@5", "text_to_image_r@5")]
    out = []
    for s in summary:
        if s["arm"] == reference:
            continue
        kept = {m: s.get(f"{m}_vs_baseline", nan) for m in names}
        worst = min(kept.values(), default=nan)
        out.append({"arm": s["arm"], "reference": reference, "flops_saving": s.get("flops_saving", nan),
                    "kept": kept, "worst_kept": worst,
                    "flops_ok": s.get("flops_saving", nan) >= TARGET_LEVER_SAVING,
                    "kept_ok": worst >= TARGET_LEVER_KEPT,
                    "met": s.get("flops_saving", nan) >= TARGET_LEVER_SAVING and worst >= TARGET_LEVER_KEPT})
    return out


def lever_markdown(rows: list[dict]) -> str:
    lines = [f"| arm | train FLOPs fewer than {rows[0]['reference']} (>= {TARGET_LEVER_SAVING:g}x) | worst kept "
             f"(>= {TARGET_LEVER_KEPT:.0%}) | kept per metric |", "| --- | --- | --- | --- |"] if rows else []
    for t in rows:
        per = ", ".join(f"{_label(m)} {v:.0%}" for m, v in t["kept"].items())
        lines.append(f"| {t['arm']} | {t['flops_saving']:.2f}x {'met' if t['flops_ok'] else 'MISSED'} | "
                     f"{t['worst_kept']:.0%} {'met' if t['kept_ok'] else 'MISSED'} | {per} |")
    return "\n".join(lines)


def targets(summary: list[dict], chance: dict[str, float], label_sets: list[str],
            splits: list[str] | None = None) -> list[dict]:
    """Issue 14's targets for every arm against the baseline: >= 5x fewer training FLOPs, >= 8x fewer image-tower
    FLOPs, >= 95% of the baseline's top-1 on every label set the baseline learned (>= 2x chance), >= 90% of its
    R@5 (both directions). With eval splits, on the first (issue 23: the held-out art style); ``kept`` has every
    one of those ratios, so a target on one set alone (issue 23's category top-1) can be read off."""
    base = next((s for s in summary if s["arm"] == "baseline"), None)
    if base is None:
        return []
    nan = float("nan")
    p = f"{splits[0]}/" if is_split_mode(splits) else ""
    learned = [n for n in label_sets
               if base.get(f"{p}{n}/top1", nan) >= LEARNED_VS_CHANCE * chance.get(f"{p}{n}/top1", nan)]
    out = []
    for s in summary:
        if s["arm"] == "baseline":
            continue
        top1 = [s.get(f"{p}{n}/top1_vs_baseline", nan) for n in learned]
        r5 = [s.get(f"{p}{m}_vs_baseline", nan) for m in ("image_to_text_r@5", "text_to_image_r@5")]
        checks = {
            "flops_ok": s.get("flops_saving", nan) >= TARGET_FLOPS_SAVING,
            "image_flops_ok": s.get("image_flops_saving", nan) >= TARGET_IMAGE_FLOPS_SAVING,
            "top1_ok": all(v >= TARGET_TOP1_KEPT for v in top1),
            "r5_ok": all(v >= TARGET_R5_KEPT for v in r5),
        }
        kept = {f"{p}{n}/top1": v for n, v in zip(learned, top1)}
        kept.update({f"{p}{m}": v for m, v in zip(("image_to_text_r@5", "text_to_image_r@5"), r5)})
        out.append({"arm": s["arm"], "flops_saving": s.get("flops_saving", nan),
                     "image_flops_saving": s.get("image_flops_saving", nan), "learned_sets": learned,
                     "split": p.rstrip("/"), "kept": kept,
                     "worst_top1_kept": min(top1, default=nan), "worst_r5_kept": min(r5), **checks,
                     "met": all(checks.values())})
    return out


_LABELS = {"image_to_text_r@1": "i2t R@1", "image_to_text_r@5": "i2t R@5", "text_to_image_r@1": "t2i R@1",
           "text_to_image_r@5": "t2i R@5"}


def _label(metric: str) -> str:
    """``category/top1`` -> 'category top-1'; ``eval_style/image_to_text_r@5`` -> 'style i2t R@5'."""
    head, _, tail = metric.partition("/")
    if tail in _LABELS or tail.count("/") == 1:  # SPLIT/METRIC
        return f"{head.removeprefix('eval_')} {_label(tail)}"
    return _LABELS.get(metric, metric.replace("/top1", " top-1"))


def _pm(value: float, spread: float, seeds: int, fmt: str = ".3f") -> str:
    return f"{value:{fmt}}" + (f" ± {spread:{fmt}}" if seeds > 1 else "")


def markdown(summary: list[dict], chance: dict[str, float], label_sets: list[str],
             splits: list[str] | None = None) -> str:
    """The per-arm table: mean ± half-range over seeds, chance levels in the last row."""
    nan = float("nan")
    cols = metric_names(label_sets, splits)
    head = ["arm", "seeds", "train GFLOPs", "fewer", "image GFLOPs", "fewer", "wall s"] + [_label(c) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in summary:
        cells = [s["arm"], str(s["seeds"]), f"{s['train_gflops']:.0f}", f"{s.get('flops_saving', nan):.2f}x",
                 f"{s['image_gflops']:.0f}", f"{s.get('image_flops_saving', nan):.2f}x",
                 _pm(s["wall_s"], s["wall_s_spread"], s["seeds"], ".0f")]
        cells += [_pm(s.get(c, nan), s.get(c + "_spread", nan), s["seeds"]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| chance | | | | | | | " + " | ".join(f"{chance.get(c, nan):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def targets_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no baseline: no targets)"
    sets = ", ".join(rows[0]["learned_sets"]) or "none"
    if rows[0].get("split"):
        sets += f" on {rows[0]['split']}"
    lines = [f"| arm | train FLOPs fewer (>= {TARGET_FLOPS_SAVING:g}x) | image FLOPs fewer "
             f"(>= {TARGET_IMAGE_FLOPS_SAVING:g}x) | worst top-1 kept (>= {TARGET_TOP1_KEPT:.0%}; sets the baseline "
             f"learned: {sets}) | worst R@5 kept (>= {TARGET_R5_KEPT:.0%}) | all met |", "|" + " --- |" * 6]
    for t in rows:
        def mark(ok: bool) -> str:
            return "" if ok else " (missed)"

        lines.append(f"| {t['arm']} | {t['flops_saving']:.2f}x{mark(t['flops_ok'])} | "
                     f"{t['image_flops_saving']:.2f}x{mark(t['image_flops_ok'])} | "
                     f"{t['worst_top1_kept']:.1%}{mark(t['top1_ok'])} | {t['worst_r5_kept']:.1%}{mark(t['r5_ok'])} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def per_run_markdown(rows: list[dict], label_sets: list[str], splits: list[str] | None = None) -> str:
    nan = float("nan")
    cols = metric_names(label_sets, splits)
    lines = ["| arm | seed | pos grid | train GFLOPs | image GFLOPs | wall s | samples/s | "
             + " | ".join(_label(c) for c in cols) + " |", "|" + " --- |" * (7 + len(cols))]
    for r in sorted(rows, key=lambda r: (arm_sort_key(r), r["seed"])):
        lines.append(f"| {r['arm']} | {r['seed']} | {r.get('base_image_size', '')} | {r['train_gflops']:.0f} | "
                     f"{float(r.get('image_gflops', nan)):.0f} | {r['wall_s']:.0f} | {r['samples_per_s']:.0f} | "
                     + " | ".join(f"{float(r.get(c, nan)):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], chance: dict[str, float], label_sets: list[str], out: Path,
         splits: list[str] | None = None) -> None:
    """Accuracy vs training GFLOPs per zero-shot label set (and i2t R@5), on a 0-1 axis with chance marked (so
    that a metric still at chance looks like it); with eval splits, one row of panels per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{s}/top1" for s in label_sets] + ["image_to_text_r@5"]
    grid = [[f"{split}/{m}" for m in names] for split in splits] if is_split_mode(splits) else [names]
    fig, axes = plt.subplots(len(grid), len(names), figsize=(4 * len(names), 3.8 * len(grid)), dpi=110,
                             squeeze=False)
    arms = list(dict.fromkeys(r["arm"] for r in sorted(rows, key=arm_sort_key)))
    others = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:cyan", "tab:olive", "tab:pink",
                   "tab:brown"] * 4)
    colours = {a: "tab:red" if a == "baseline" else "tab:gray" if a == "lowres" else next(others) for a in arms}
    for ax, metric in ((ax, m) for line, metrics in zip(axes, grid) for ax, m in zip(line, metrics)):
        for arm, c in colours.items():
            xs = [r["train_gflops"] for r in rows if r["arm"] == arm]
            ys = [float(r.get(metric, float("nan"))) for r in rows if r["arm"] == arm]
            if xs:
                ax.scatter(xs, ys, c=c, label=arm, s=40, zorder=3)
        if metric in chance:
            ax.axhline(chance[metric], ls="--", c="k", lw=0.8, label="chance")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, None)
        ax.set_xlabel("training GFLOPs")
        ax.set_ylabel(f"{_label(metric)} at full resolution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("RECLIP vs baseline: same batch, same samples")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def label_sets_of(meta: dict) -> list[str]:
    """The eval set's zero-shot label sets, as the evaluator names them (``label_sets``, else ``classes``: label)."""
    sets = meta.get("label_sets")
    if isinstance(sets, dict):
        return [name for name, spec in sets.items() if isinstance(spec, dict) and spec.get("classes")]
    return ["label"] if meta.get("classes") else []


def split_chance(data: str, splits: list[str]) -> tuple[list[str], dict[str, float]]:
    """The first split's label sets and every split's chance levels as ``SPLIT/METRIC``; a split without one of
    the first split's label sets is a one-line error (its columns would be NaN in every row)."""
    from reclip_ray.data.schema import read_dataset_json

    sets, chance = [], {}
    for split in splits:
        meta = read_dataset_json(f"{data}/{split}")
        mine = label_sets_of(meta)
        sets = sets or mine
        if missing := [s for s in sets if s not in mine]:
            raise SystemExit(f"{data}/{split}/dataset.json: no label set {missing[0]!r} (the first split, "
                             f"{splits[0]}, has {', '.join(sets)})")
        chance.update({f"{split}/{k}": v for k, v in chance_levels(meta).items()})
    return sets, chance


def chance_levels(meta: dict) -> dict[str, float]:
    """Top-1 chance of every label set (1 / classes) and retrieval R@k chance (k / rows: one caption per image)."""
    sets = meta.get("label_sets") if isinstance(meta.get("label_sets"), dict) else {"label": meta}
    chance = {f"{name}/top1": 1.0 / len(sets[name]["classes"]) for name in label_sets_of(meta)}
    rows = max(1, int(meta.get("rows", 0) or 0))
    chance.update({m: min(1.0, int(m.rsplit("@", 1)[1]) / rows) for m in RETRIEVAL})
    return chance


def result_paths(name: str) -> dict[str, Path]:
    return {ext: RESULTS / f"{name}.{ext}" for ext in ("json", "csv", "png")}


def load_rows(path: Path, keys: set[str]) -> tuple[dict[str, dict], list[dict], dict]:
    """Rows already in the results file: ``{key: row}`` of the planned runs (finished: skip them), the other rows
    (other settings, or written before rows had keys: kept, not summarised), and the saved document."""
    if not path.is_file():
        return {}, [], {}
    saved = json.loads(path.read_text())
    done: dict[str, dict] = {}
    other: list[dict] = []
    for row in list(saved.get("rows", [])) + list(saved.get("other_rows", [])):
        if row.get("key") in keys:
            done[row["key"]] = row
        else:
            other.append(row)
    return done, other, saved


def _machine() -> str:
    text = f"{os.cpu_count()} CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a description only
        pass
    return text


def _save(paths: dict[str, Path], doc: dict, rows: list[dict], label_sets: list[str],
          splits: list[str] | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(doc, indent=2, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    plot(rows, doc["chance"], label_sets, paths["png"], splits)


def print_tables(rows: list[dict], summary: list[dict], chance: dict[str, float], label_sets: list[str],
                 splits: list[str] | None = None, reference: str = "baseline") -> None:
    print(markdown(summary, chance, label_sets, splits))
    print()
    if reference == "baseline":
        print(targets_markdown(targets(summary, chance, label_sets, splits)))
    else:
        print(lever_markdown(lever_targets(summary, chance, label_sets, splits, reference)))
    print()
    print(per_run_markdown(rows, label_sets, splits))


def replot(paths: dict[str, Path]) -> int:
    """Redraw the PNG and print the tables from the saved JSON (also files written before arms had kinds)."""
    saved = json.loads(paths["json"].read_text())
    chance = saved["chance"]
    if "image_to_text_r@1" in chance:  # files from before t2i R@5 was reported: k / rows like the others
        chance.update({m: min(1.0, int(m.rsplit("@", 1)[1]) * chance["image_to_text_r@1"])
                       for m in RETRIEVAL if m not in chance})
    sets = saved.get("label_sets") or [k[: -len("/top1")] for k in chance if k.endswith("/top1")]
    splits = saved.get("eval_splits")
    rows = saved["rows"]
    reference = saved.get("args", {}).get("reference") or "baseline"
    summary = summarise(rows, metric_names(sets, splits), reference)
    plot(rows, chance, sets, paths["png"], splits)
    print_tables(rows, summary, chance, sets, splits, reference)
    return 0


def parse_rates(text: str) -> dict[int, float]:
    """``32=300,128=30`` -> {32: 300.0, 128: 30.0}: measured training samples/s per image size."""
    rates = {}
    for item in parse_list(text, str):
        size, _, rate = item.partition("=")
        try:
            rates[int(size)] = float(rate)
        except ValueError:
            raise SystemExit(f"--rates: expected SIZE=SAMPLES_PER_S items, got {item!r}") from None
    return rates


def estimate_s(cfg: Any, rates: dict[int, float], overhead_s: float) -> float:
    """A run's wall time from measured rates: each phase's samples / its size's rate, plus a fixed overhead per
    run and per phase end (worker start-up, evaluation)."""
    phases = list(zip(cfg.phases, cfg.phase_samples()))
    missing = sorted({p.image_size for p, _ in phases} - set(rates))
    if missing:
        raise SystemExit(f"--rates has no rate for {missing[0]} px")
    return sum(n / rates[p.image_size] for p, n in phases) + overhead_s * (1 + len(phases))


def dry_run(arms: list[Arm], seeds: list[int], args: argparse.Namespace) -> int:
    """Print each arm's phases, GFLOPs and savings against the baseline, and the run keys (no data, no Ray)."""
    base = flops_of(arm_config(Arm("baseline", "baseline"), seeds[0], args))
    data = data_fingerprint(args.data, args.eval_splits)
    rates = parse_rates(args.rates)
    print("| arm | phases | pos grid | train GFLOPs | fewer | image GFLOPs | fewer | "
          + ("est. s per seed | " if rates else "") + f"run keys (seeds {','.join(map(str, seeds))}) |")
    print("|" + " --- |" * (9 if rates else 8))
    total = 0.0
    for arm in arms:
        cfg = arm_config(arm, seeds[0], args)
        f = flops_of(cfg)
        phases = " -> ".join(f"{p.image_size}px x {n}" for p, n in zip(cfg.phases, cfg.phase_samples()))
        keys = ", ".join(run_key(arm.name, s, arm_config(arm, s, args).to_dict(), data)[:8] for s in seeds)
        est = ""
        if rates:
            seconds = estimate_s(cfg, rates, args.overhead_s)
            total += seconds * len(seeds)
            est = f"{seconds:.0f} | "
        print(f"| {arm.name} | {phases} | {cfg.model.vision.base_image_size} | {f['train_gflops']:.0f} | "
              f"{saving(base['train_gflops'], f['train_gflops']):.2f}x | {f['image_gflops']:.0f} | "
              f"{saving(base['image_gflops'], f['image_gflops']):.2f}x | {est}{keys} |")
    if rates:
        print(f"estimated wall time, {len(arms)} arms x {len(seeds)} seeds: {total:.0f} s = {total / 60:.1f} min "
              f"(rates {args.rates} samples/s, {args.overhead_s:g} s per run start and per phase end)")
    if not data["train"]:
        kind = "textured captioned shapes" if args.synth_textured else "captioned shapes"
        print(f"(no data under {args.data} yet: it will be made ({args.synth_train} + {args.synth_eval} rows of "
              f"{kind} at {args.synth_image_size or 'the default'} px), and the keys will differ once it is)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--seeds", default="0")
    p.add_argument("--samples", type=int, default=192000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--low", type=int, default=32)
    p.add_argument("--low-text", type=int, default=16)
    p.add_argument("--full", type=int, default=64)
    p.add_argument("--full-text", type=int, default=32)
    p.add_argument("--finetune", default="0.1", help="share(s) of the samples at full resolution, e.g. 0.05,0.1: "
                                                     "one reclip arm each")
    p.add_argument("--base-image-size", default="", help="model.vision.base_image_size of the reclip arm(s), e.g. "
                                                         "32,112: one arm per value (default: the config's)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of the main phase (and of the baseline)")
    p.add_argument("--finetune-lr", type=float, default=2.5e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="optim.warmup_samples (a fraction <= 1, or a count)")
    p.add_argument("--arms", default="baseline,reclip,lowres")
    p.add_argument("--workers", type=int, default=2, help="training workers (scaling.min_workers = max_workers)")
    p.add_argument("--use-gpu", default="", choices=["", "auto", "true", "false"], help="scaling.use_gpu "
                                                                                     "(default: the config's)")
    p.add_argument("--vocab-size", type=int, default=1024, help="of the tokenizer trained on the data")
    p.add_argument("--data", default="reclip_data")
    p.add_argument("--eval-splits", default=DEFAULT_SPLIT,
                   help="eval splits under --data, e.g. eval_style,eval_emoji (emoji_data.py's), each evaluated at "
                        "full resolution; the first is data.eval, the others are evaluated from the exported model")
    p.add_argument("--long-finetune", default="", help="finetune length(s) in samples, e.g. 20000: one more reclip "
                                                      "arm each (reclip-ft20k), same total samples")
    p.add_argument("--low-patch-dropout", default="", help="issue 25: patch dropout(s) of the low phase, e.g. 0.5: "
                                                          "one more arm per reclip arm (reclip-5%%-pd50)")
    p.add_argument("--equal-gflops", action="store_true", help="with --low-patch-dropout: also each dropout arm at "
                                                               "its plain arm's GFLOPs (more samples: -eq)")
    p.add_argument("--losses", default="clip", help="issue 25: clip,siglip adds a reclip-5%%-siglip arm per reclip arm")
    p.add_argument("--reference", default="baseline", help="the arm the savings and kept ratios are against, e.g. "
                                                            "reclip-5%% (issue 25's target instead of issue 14's)")
    p.add_argument("--rates", default="", help="--dry-run: measured samples/s per image size, e.g. 32=300,128=30, "
                                               "to estimate each arm's wall time")
    p.add_argument("--overhead-s", type=float, default=40.0, help="--dry-run with --rates: seconds per run start "
                                                                   "and per phase end (start-up, evaluation)")
    p.add_argument("--synth-train", type=int, default=20000)
    p.add_argument("--synth-eval", type=int, default=1000)
    p.add_argument("--synth-image-size", type=int, default=0, help="side of the synthetic images (0: synth.IMAGE_SIZE, "
                                                                   "128); at least --full")
    p.add_argument("--synth-seed", type=int, default=0)
    p.add_argument("--synth-textured", action="store_true",
                   help="add the background-texture label set (synth.BACKGROUNDS): detail only full resolution shows")
    p.add_argument("--out", default="reclip_bench", help="run folders and the MLflow store")
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--name", default=DEFAULT_NAME, help="results: benchmarks/results/NAME.{json,csv,png}; a rerun "
                                                        "with the same NAME skips the runs already there")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every arm")
    p.add_argument("--replot", action="store_true", help="redraw the PNG and tables from the saved JSON")
    p.add_argument("--dry-run", action="store_true", help="print the arms, their GFLOPs and run keys; train nothing")
    args = p.parse_args(argv)
    paths = result_paths(args.name)
    if args.replot:
        return replot(paths)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    args.tracking_uri = args.tracking_uri or f"sqlite:///{args.out}/mlflow.db"
    args.eval_splits = [x.strip() for x in parse_list(args.eval_splits, str)]
    if not args.eval_splits or len(set(args.eval_splits)) != len(args.eval_splits) or "train" in args.eval_splits:
        raise SystemExit(f"--eval-splits: distinct split names other than train, got {args.eval_splits}")
    arms = plan_arms(args.arms, parse_list(args.finetune, float), parse_list(args.base_image_size, int),
                     parse_list(args.long_finetune, int), args.samples, parse_list(args.low_patch_dropout, float),
                     args.equal_gflops, [x.strip() for x in parse_list(args.losses, str)])
    seeds = parse_list(args.seeds, int)
    if not seeds or not arms:
        raise SystemExit("need at least one seed and one arm")
    if args.dry_run:
        return dry_run(arms, seeds, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    synth_s = ensure_data(args)

    from reclip_ray.data.schema import read_dataset_json

    splits = args.eval_splits
    if is_split_mode(splits):
        label_sets, chance = split_chance(args.data, splits)
    else:
        meta = read_dataset_json(f"{args.data}/{DEFAULT_SPLIT}")
        label_sets, chance = label_sets_of(meta), chance_levels(meta)
    metrics = metric_names(label_sets, splits)
    data = data_fingerprint(args.data, splits)
    plan = []
    for seed in seeds:
        for arm in arms:
            cfg = arm_config(arm, seed, args)
            plan.append((arm, seed, cfg, run_key(arm.name, seed, cfg.to_dict(), data)))
    done, other, saved = load_rows(paths["json"], {key for *_, key in plan})
    if done:
        print(f"[bench] {len(done)} of {len(plan)} runs already in {paths['json']}: skipping them", flush=True)
    synth_s = synth_s or float(saved.get("synth_s", 0.0))

    def finished() -> list[dict]:
        return [done[key] for *_, key in plan if key in done]

    for arm, seed, cfg, key in plan:
        if key in done:
            continue
        done[key] = run_arm(arm, seed, cfg, key, args, label_sets)
        rows = finished()
        doc = {"args": vars(args), "label_sets": label_sets, "eval_splits": splits, "chance": chance, "rows": rows,
               "summary": summarise(rows, metrics, args.reference), "other_rows": other, "synth_s": synth_s,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine()}
        doc["targets"] = (targets(doc["summary"], chance, label_sets, splits) if args.reference == "baseline" else
                          lever_targets(doc["summary"], chance, label_sets, splits, args.reference))
        _save(paths, doc, rows, label_sets, splits)
    rows = finished()
    print_tables(rows, summarise(rows, metrics, args.reference), chance, label_sets, splits, args.reference)
    print(f"\n[bench] {len(rows)} runs in {paths['json']}; this invocation {time.perf_counter() - started:.0f} s "
          f"(data {synth_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
