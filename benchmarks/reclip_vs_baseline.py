"""RECLIP vs full-resolution baseline vs low-resolution only, at the same batch size and number of samples.

    python benchmarks/reclip_vs_baseline.py                 # tiny preset, 192k samples, 1 seed: ~25 min on 2 cores
    python benchmarks/reclip_vs_baseline.py --seeds 0,1,2   # the spread over seeds
    ray job submit --working-dir . -- python benchmarks/reclip_vs_baseline.py --seeds 0

The paper's comparison: same batch, same samples seen, so the only difference is the resolution schedule.
- baseline: full resolution (``--full`` px, ``--full-text`` tokens) for every sample;
- reclip:   ``--low`` px / ``--low-text`` tokens for 1 - f of the samples, then f at full resolution with its own
            warmup and peak LR (the tiny preset's finetune settings);
- lowres:   ``--low`` px for every sample, no finetune (the ablation), evaluated at full resolution too.
Every run is a real reclip-ray training run (Ray Train workers, Ray Data input) logged to one MLflow experiment;
metrics are evaluated at full resolution on the eval split. Writes ``benchmarks/results/reclip_vs_baseline.json``,
``.csv`` and ``.png`` (accuracy vs training GFLOPs) after every run, so a long sweep stopped part way keeps what it
finished, and prints a Markdown table for BENCHMARKS.md.

Why 192k samples and a peak LR of 1e-3: at 64k samples (and the tiny preset's 5e-4) every arm was still at chance on
the shape set, so the comparison said nothing about anything but colour; at 192k a 32 px run reaches ~0.5 shape top-1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("shape/top1", "pattern/top1", "colour/top1", "image_to_text_r@1", "image_to_text_r@5",
           "text_to_image_r@1", "text_to_image_r@5")


def schedules(args: argparse.Namespace) -> dict[str, list[str]]:
    """--set overrides of each arm (on top of the common ones)."""
    low = f"{{name: lowres, image_size: {args.low}, text_length: {args.low_text}"
    full = f"{{name: full, image_size: {args.full}, text_length: {args.full_text}"
    f = args.finetune
    return {
        "baseline": [f"phases=[{full}, samples: 1.0}}]"],
        "reclip": [f"phases=[{low}, samples: {1 - f}}}, {full}, samples: {f}, lr: {args.finetune_lr}, "
                   f"warmup_samples: 0.1}}]"],
        "lowres": [f"phases=[{low}, samples: 1.0}}]", f"eval.full_image_size={args.full}"],
    }


def run_arm(name: str, seed: int, args: argparse.Namespace) -> dict:
    from reclip_ray.config import load_config
    from reclip_ray.flops import run_flops
    from reclip_ray.train.launch import run_training

    common = [
        f"train.samples={args.samples}", f"train.batch_size={args.batch}", f"train.seed={seed}",
        f"data.train={args.data}/train", f"data.eval={args.data}/eval", "data.synth_if_missing=true",
        f"data.synth_train={args.synth_train}", f"run.storage_path={args.out}/runs", f"run.name={name}-s{seed}",
        f"tracking.uri={args.tracking_uri}", "tracking.experiment=reclip_vs_baseline",
        "checkpoint.every_samples=0", "eval.at_phase_end=true", f"scaling.max_workers={args.workers}",
        f"optim.lr={args.lr}",
    ]
    cfg = load_config(args.config, common + schedules(args)[name] + list(args.set))
    t0 = time.perf_counter()
    metrics = run_training(cfg)
    wall = time.perf_counter() - t0
    full = f"eval/{args.full}px/"
    row = {"arm": name, "seed": seed, "samples": metrics["samples"],
           "train_gflops": round(run_flops(cfg)["total_train_gflops"], 1),
           "gflops_logged": round(float(metrics.get("gflops_total", 0.0)), 1),
           "wall_s": round(wall, 1), "samples_per_s": round(metrics["samples"] / wall, 1),
           "mlflow_run_id": metrics["mlflow_run_id"]}
    for m in METRICS:
        row[m] = metrics.get(full + m, float("nan"))
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    base = [r for r in rows if r["arm"] == "baseline"]
    for arm in ("baseline", "reclip", "lowres"):
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        s = {"arm": arm, "seeds": len(rs), "train_gflops": rs[0]["train_gflops"],
             "wall_s": statistics.median(r["wall_s"] for r in rs)}
        if base:
            s["flops_saving"] = round(base[0]["train_gflops"] / rs[0]["train_gflops"], 2)
        for m in METRICS:
            vals = [float(r[m]) for r in rs]
            s[m] = statistics.mean(vals)
            s[m + "_spread"] = (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0
            if base:
                b = statistics.mean(float(r[m]) for r in base)
                s[m + "_vs_baseline"] = s[m] / b if b else float("nan")
        out.append(s)
    return out


def markdown(summary: list[dict], chance: dict[str, float]) -> str:
    cols = ["shape/top1", "pattern/top1", "colour/top1", "image_to_text_r@1", "image_to_text_r@5", "text_to_image_r@1"]
    head = "| arm | train GFLOPs | FLOPs saving | wall s | " + " | ".join(cols) + " |"
    lines = [head, "|" + " --- |" * (4 + len(cols))]
    for s in summary:
        cells = [f"{s[c]:.3f}" + (f" ± {s[c + '_spread']:.3f}" if s["seeds"] > 1 else "") for c in cols]
        lines.append(f"| {s['arm']} | {s['train_gflops']:.0f} | {s.get('flops_saving', 1.0):.2f}x | {s['wall_s']:.0f} | "
                     + " | ".join(cells) + " |")
    lines.append("| chance | | | | " + " | ".join(f"{chance.get(c, float('nan')):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def per_run_markdown(rows: list[dict]) -> str:
    cols = ["shape/top1", "pattern/top1", "colour/top1", "image_to_text_r@1", "image_to_text_r@5", "text_to_image_r@1",
            "text_to_image_r@5"]
    lines = ["| arm | seed | train GFLOPs | wall s | samples/s | " + " | ".join(cols) + " |",
             "|" + " --- |" * (5 + len(cols))]
    for r in sorted(rows, key=lambda r: (["baseline", "reclip", "lowres"].index(r["arm"]), r["seed"])):
        lines.append(f"| {r['arm']} | {r['seed']} | {r['train_gflops']:.0f} | {r['wall_s']:.0f} | {r['samples_per_s']:.0f} | "
                     + " | ".join(f"{float(r[c]):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], chance: dict[str, float], out: Path) -> None:
    """Accuracy vs training GFLOPs per zero-shot class set, on a 0-1 axis with chance marked (so that a metric
    still at chance looks like it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("colour/top1", "shape/top1", "pattern/top1")
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.8), dpi=110)
    colours = {"baseline": "tab:red", "reclip": "tab:blue", "lowres": "tab:gray"}
    for ax, metric in zip(axes, metrics):
        for arm, c in colours.items():
            xs = [r["train_gflops"] for r in rows if r["arm"] == arm]
            ys = [float(r[metric]) for r in rows if r["arm"] == arm]
            if xs:
                ax.scatter(xs, ys, c=c, label=arm, s=40, zorder=3)
        if metric in chance:
            ax.axhline(chance[metric], ls="--", c="k", lw=0.8, label="chance")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, None)
        ax.set_xlabel("training GFLOPs")
        ax.set_ylabel(f"zero-shot {metric} at full resolution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("RECLIP vs baseline: same batch, same samples")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _chance(meta: dict) -> dict[str, float]:
    chance = {f"{name}/top1": 1.0 / len(classes) for name, classes in
              {k: v.get("classes", []) for k, v in (meta.get("label_sets") or {}).items()}.items() if classes}
    rows_eval = max(1, int(meta.get("rows", 0) or 0))
    chance.update({"image_to_text_r@1": 1 / rows_eval, "image_to_text_r@5": 5 / rows_eval,
                   "text_to_image_r@1": 1 / rows_eval})
    return chance


def _save(args: argparse.Namespace, rows: list[dict], summary: list[dict], chance: dict[str, float]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reclip_vs_baseline.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows, "summary": summary, "chance": chance,
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs"},
        indent=2, default=str))
    with open(RESULTS / "reclip_vs_baseline.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, chance, RESULTS / "reclip_vs_baseline.png")


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
    p.add_argument("--finetune", type=float, default=0.1, help="share of the samples at full resolution")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR of the main phase (and of the baseline)")
    p.add_argument("--finetune-lr", type=float, default=2.5e-4)
    p.add_argument("--arms", default="baseline,reclip,lowres")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=os.path.abspath("reclip_data"))
    p.add_argument("--synth-train", type=int, default=20000)
    p.add_argument("--out", default=os.path.abspath("reclip_bench"))
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every arm")
    p.add_argument("--replot", action="store_true", help="redraw the PNG and table from the saved JSON")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads((RESULTS / "reclip_vs_baseline.json").read_text())
        plot(saved["rows"], saved["chance"], RESULTS / "reclip_vs_baseline.png")
        print(markdown(saved["summary"], saved["chance"]))
        print()
        print(per_run_markdown(saved["rows"]))
        return 0
    args.tracking_uri = args.tracking_uri or f"sqlite:///{os.path.abspath(args.out)}/mlflow.db"
    Path(args.out).mkdir(parents=True, exist_ok=True)

    from reclip_ray.data.schema import read_dataset_json

    rows: list[dict] = []
    summary: list[dict] = []
    chance: dict[str, float] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            rows.append(run_arm(arm, seed, args))
            if not chance:  # the eval split exists once the first run has synthesised the data
                chance = _chance(read_dataset_json(f"{args.data}/eval"))
            summary = summarise(rows)
            _save(args, rows, summary, chance)
    print(markdown(summary, chance))
    print()
    print(per_run_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
