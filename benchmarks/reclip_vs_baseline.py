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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_NAME = "reclip_vs_baseline"
KINDS = ("baseline", "reclip", "lowres")
RETRIEVAL = ("image_to_text_r@1", "image_to_text_r@5", "text_to_image_r@1", "text_to_image_r@5")
# issue 14's targets for a RECLIP arm against the baseline
TARGET_FLOPS_SAVING, TARGET_IMAGE_FLOPS_SAVING = 5.0, 8.0
TARGET_TOP1_KEPT, TARGET_R5_KEPT, LEARNED_VS_CHANCE = 0.95, 0.90, 2.0


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # baseline | reclip | lowres
    finetune: float = 0.0  # share of the samples at full resolution (reclip)
    base_image_size: int = 0  # model.vision.base_image_size for this arm; 0: the config's


def share_label(share: float) -> str:
    """0.1 -> '10%', 0.05 -> '5%', 0.075 -> '7.5%'."""
    return f"{round(share * 100, 6):g}%"


def arm_name(kind: str, finetune: float = 0.0, base_image_size: int = 0) -> str:
    """``baseline``, ``lowres``, ``reclip-10%``, ``reclip-10%-pos32`` (position grid 32 px)."""
    if kind != "reclip":
        return kind
    name = f"reclip-{share_label(finetune)}"
    return f"{name}-pos{base_image_size}" if base_image_size else name


def run_name(arm: str, seed: int, key: str) -> str:
    """The run's folder and MLflow name: no '%' (it would read as a percent-escape in a storage URI)."""
    return f"{arm.replace('%', 'pct')}-s{seed}-{key[:8]}"


def parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in str(text).split(",") if x.strip()]


def plan_arms(arms: str, finetunes: list[float], base_sizes: list[int]) -> list[Arm]:
    """The arms to run, in order: every reclip share x position grid where ``reclip`` is listed."""
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
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"arms repeat: {names}")
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
        f = arm.finetune
        return [f"phases=[{low}, samples: {round(1 - f, 9)}}}, {full}, samples: {f}, lr: {args.finetune_lr}, "
                f"warmup_samples: 0.1}}]"]
    return [f"phases=[{low}, samples: 1.0}}]", f"eval.full_image_size={args.full}"]


def common_overrides(seed: int, args: argparse.Namespace) -> list[str]:
    """Every arm's overrides: the shared budget, the synthetic data's columns and a tokenizer trained on it, a fixed
    worker count (so wall times compare), MLflow and the run folders under --out."""
    out = [
        f"train.samples={args.samples}", f"train.batch_size={args.batch}", f"train.seed={seed}",
        f"data.train={args.data}/train", f"data.eval={args.data}/eval", "data.synth_if_missing=false",
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


def data_fingerprint(data: str) -> dict:
    """What of the dataset decides a run's result (not the copies or timings dataset.json also records)."""
    from reclip_ray.data.schema import read_dataset_json

    keep = ("rows", "source", "seed", "image_size", "label_sets")
    out = {}
    for split in ("train", "eval"):
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
    """Make the synthetic dataset and the copies the low phase reads under --data, unless it exists; seconds spent."""
    train = Path(args.data) / "train"
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
    row = make_row(arm, seed, key, cfg.model.vision.base_image_size, flops, metrics, wall, args.full, label_sets)
    print(json.dumps(row), flush=True)
    return row


def make_row(arm: Arm, seed: int, key: str, base_image_size: int, flops: dict[str, float], metrics: dict,
             wall: float, full: int, label_sets: list[str]) -> dict:
    """One result row: the run's identity, FLOPs and time, and its full-resolution eval metrics (NaN if absent)."""
    samples = int(metrics.get("samples", 0))
    row: dict[str, Any] = {
        "arm": arm.name, "kind": arm.kind, "finetune": arm.finetune, "base_image_size": base_image_size,
        "seed": seed, "key": key, "samples": samples, **flops,
        "gflops_logged": float(metrics.get("gflops_total", 0.0)),
        "wall_s": round(wall, 1), "samples_per_s": round(samples / wall, 1) if wall > 0 else float("nan"),
        "mlflow_run_id": metrics.get("mlflow_run_id"),
    }
    prefix = f"eval/{full}px/"
    for m in metric_names(label_sets):
        row[m] = float(metrics.get(prefix + m, float("nan")))
    return row


def metric_names(label_sets: list[str]) -> list[str]:
    """Zero-shot top-1 of every label set, then retrieval R@1/R@5 both ways."""
    return [f"{s}/top1" for s in label_sets] + list(RETRIEVAL)


def mean_half_range(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds; (nan, nan) for none."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (max(vals) - min(vals)) / 2


def saving(baseline: float, arm: float) -> float:
    """How many times fewer (GFLOPs) the arm costs than the baseline."""
    return baseline / arm if arm and not math.isnan(arm) else float("nan")


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Per arm: mean and half-range over seeds of every metric and of the wall time; the run's GFLOPs (all of it and
    the image tower's; the same for every seed) and how many times fewer than the baseline's; each metric's mean
    relative to the baseline's mean."""
    nan = float("nan")
    out = []
    base = [r for r in rows if r["arm"] == "baseline"]
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


def targets(summary: list[dict], chance: dict[str, float], label_sets: list[str]) -> list[dict]:
    """Issue 14's targets for every arm against the baseline: >= 5x fewer training FLOPs, >= 8x fewer image-tower
    FLOPs, >= 95% of the baseline's top-1 on every label set the baseline learned (>= 2x chance), >= 90% of its
    R@5 (both directions)."""
    base = next((s for s in summary if s["arm"] == "baseline"), None)
    if base is None:
        return []
    nan = float("nan")
    learned = [n for n in label_sets
               if base.get(f"{n}/top1", nan) >= LEARNED_VS_CHANCE * chance.get(f"{n}/top1", nan)]
    out = []
    for s in summary:
        if s["arm"] == "baseline":
            continue
        top1 = [s.get(f"{n}/top1_vs_baseline", nan) for n in learned]
        r5 = [s.get(f"{m}_vs_baseline", nan) for m in ("image_to_text_r@5", "text_to_image_r@5")]
        checks = {
            "flops_ok": s.get("flops_saving", nan) >= TARGET_FLOPS_SAVING,
            "image_flops_ok": s.get("image_flops_saving", nan) >= TARGET_IMAGE_FLOPS_SAVING,
            "top1_ok": all(v >= TARGET_TOP1_KEPT for v in top1),
            "r5_ok": all(v >= TARGET_R5_KEPT for v in r5),
        }
        out.append({"arm": s["arm"], "flops_saving": s.get("flops_saving", nan),
                     "image_flops_saving": s.get("image_flops_saving", nan), "learned_sets": learned,
                     "worst_top1_kept": min(top1, default=nan), "worst_r5_kept": min(r5), **checks,
                     "met": all(checks.values())})
    return out


_LABELS = {"image_to_text_r@1": "i2t R@1", "image_to_text_r@5": "i2t R@5", "text_to_image_r@1": "t2i R@1",
           "text_to_image_r@5": "t2i R@5"}


def _label(metric: str) -> str:
    return _LABELS.get(metric, metric.replace("/top1", " top-1"))


def _pm(value: float, spread: float, seeds: int, fmt: str = ".3f") -> str:
    return f"{value:{fmt}}" + (f" ± {spread:{fmt}}" if seeds > 1 else "")


def markdown(summary: list[dict], chance: dict[str, float], label_sets: list[str]) -> str:
    """The per-arm table: mean ± half-range over seeds, chance levels in the last row."""
    nan = float("nan")
    cols = metric_names(label_sets)
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


def per_run_markdown(rows: list[dict], label_sets: list[str]) -> str:
    nan = float("nan")
    cols = metric_names(label_sets)
    lines = ["| arm | seed | pos grid | train GFLOPs | image GFLOPs | wall s | samples/s | "
             + " | ".join(_label(c) for c in cols) + " |", "|" + " --- |" * (7 + len(cols))]
    for r in sorted(rows, key=lambda r: (arm_sort_key(r), r["seed"])):
        lines.append(f"| {r['arm']} | {r['seed']} | {r.get('base_image_size', '')} | {r['train_gflops']:.0f} | "
                     f"{float(r.get('image_gflops', nan)):.0f} | {r['wall_s']:.0f} | {r['samples_per_s']:.0f} | "
                     + " | ".join(f"{float(r.get(c, nan)):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], chance: dict[str, float], label_sets: list[str], out: Path) -> None:
    """Accuracy vs training GFLOPs per zero-shot label set (and i2t R@5), on a 0-1 axis with chance marked (so
    that a metric still at chance looks like it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"{s}/top1" for s in label_sets] + ["image_to_text_r@5"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.8), dpi=110, squeeze=False)
    arms = list(dict.fromkeys(r["arm"] for r in sorted(rows, key=arm_sort_key)))
    others = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:cyan", "tab:olive", "tab:pink",
                   "tab:brown"] * 4)
    colours = {a: "tab:red" if a == "baseline" else "tab:gray" if a == "lowres" else next(others) for a in arms}
    for ax, metric in zip(axes[0], metrics):
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


def _save(paths: dict[str, Path], doc: dict, rows: list[dict], label_sets: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(doc, indent=2, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    plot(rows, doc["chance"], label_sets, paths["png"])


def print_tables(rows: list[dict], summary: list[dict], chance: dict[str, float], label_sets: list[str]) -> None:
    print(markdown(summary, chance, label_sets))
    print()
    print(targets_markdown(targets(summary, chance, label_sets)))
    print()
    print(per_run_markdown(rows, label_sets))


def replot(paths: dict[str, Path]) -> int:
    """Redraw the PNG and print the tables from the saved JSON (also files written before arms had kinds)."""
    saved = json.loads(paths["json"].read_text())
    chance = saved["chance"]
    if "image_to_text_r@1" in chance:  # files from before t2i R@5 was reported: k / rows like the others
        chance.update({m: min(1.0, int(m.rsplit("@", 1)[1]) * chance["image_to_text_r@1"])
                       for m in RETRIEVAL if m not in chance})
    sets = saved.get("label_sets") or [k[: -len("/top1")] for k in chance if k.endswith("/top1")]
    rows = saved["rows"]
    summary = summarise(rows, metric_names(sets))
    plot(rows, chance, sets, paths["png"])
    print_tables(rows, summary, chance, sets)
    return 0


def dry_run(arms: list[Arm], seeds: list[int], args: argparse.Namespace) -> int:
    """Print each arm's phases, GFLOPs and savings against the baseline, and the run keys (no data, no Ray)."""
    base = flops_of(arm_config(Arm("baseline", "baseline"), seeds[0], args))
    data = data_fingerprint(args.data)
    print("| arm | phases | pos grid | train GFLOPs | fewer | image GFLOPs | fewer | run keys (seeds "
          f"{','.join(map(str, seeds))}) |")
    print("|" + " --- |" * 8)
    for arm in arms:
        cfg = arm_config(arm, seeds[0], args)
        f = flops_of(cfg)
        phases = " -> ".join(f"{p.image_size}px x {n}" for p, n in zip(cfg.phases, cfg.phase_samples()))
        keys = ", ".join(run_key(arm.name, s, arm_config(arm, s, args).to_dict(), data)[:8] for s in seeds)
        print(f"| {arm.name} | {phases} | {cfg.model.vision.base_image_size} | {f['train_gflops']:.0f} | "
              f"{saving(base['train_gflops'], f['train_gflops']):.2f}x | {f['image_gflops']:.0f} | "
              f"{saving(base['image_gflops'], f['image_gflops']):.2f}x | {keys} |")
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
    arms = plan_arms(args.arms, parse_list(args.finetune, float), parse_list(args.base_image_size, int))
    seeds = parse_list(args.seeds, int)
    if not seeds or not arms:
        raise SystemExit("need at least one seed and one arm")
    if args.dry_run:
        return dry_run(arms, seeds, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    synth_s = ensure_data(args)

    from reclip_ray.data.schema import read_dataset_json

    meta = read_dataset_json(f"{args.data}/eval")
    label_sets, chance = label_sets_of(meta), chance_levels(meta)
    data = data_fingerprint(args.data)
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
        doc = {"args": vars(args), "label_sets": label_sets, "chance": chance, "rows": rows,
               "summary": summarise(rows, metric_names(label_sets)), "other_rows": other, "synth_s": synth_s,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine()}
        doc["targets"] = targets(doc["summary"], chance, label_sets)
        _save(paths, doc, rows, label_sets)
    rows = finished()
    print_tables(rows, summarise(rows, metric_names(label_sets)), chance, label_sets)
    print(f"\n[bench] {len(rows)} runs in {paths['json']}; this invocation {time.perf_counter() - started:.0f} s "
          f"(data {synth_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
