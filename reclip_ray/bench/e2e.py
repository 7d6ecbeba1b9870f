"""End-to-end throughput: the tiny two-phase job through Ray Train + Ray Data vs a plain PyTorch loop.

Both paths train the same model on the same shards with the same schedule and the same number of torch threads
for compute; the Ray path decodes in Ray Data actors beside the worker, the plain path decodes inline. Reported:
steady-state samples/s per phase (median over logging windows, the first window of each phase dropped as warmup),
and the Ray / plain ratio. JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _overrides(args: argparse.Namespace, data: Path, tokenizer: Path, out: Path, workers: int) -> list[str]:
    return [
        f"data.train={data / 'train'}",
        f"data.eval={data / 'eval'}",
        f"data.tokenizer={tokenizer}",
        "data.synth_if_missing=false",
        f"train.samples={args.samples}",
        f"train.batch_size={args.batch_size}",
        "train.log_every_steps=5",
        "eval.at_phase_end=false",
        "checkpoint.every_samples=0",
        f"scaling.min_workers={workers}",
        f"scaling.max_workers={workers}",
        f"scaling.cpus_per_worker={args.threads}",
        "scaling.use_gpu=false",
        f"run.storage_path={out / 'runs'}",
        f"run.name=e2e-{workers}w-{int(time.time())}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "tracking.experiment=bench-e2e",
    ]


def _steady(rates_by_phase: dict[int, list[float]]) -> dict[int, float]:
    return {p: statistics.median(r[1:] if len(r) > 2 else r) for p, r in rates_by_phase.items() if r}


def run_ray(args: argparse.Namespace, data: Path, tokenizer: Path, out: Path, workers: int) -> dict[str, Any]:
    from reclip_ray import tracking
    from reclip_ray.config import load_config
    from reclip_ray.train.launch import run_training

    cfg = load_config("tiny", _overrides(args, data, tokenizer, out, workers))
    t0 = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - t0
    hist = tracking.metric_history(cfg.tracking.uri, result["mlflow_run_id"],
                                   ["samples_per_s", "phase", "data_wait_fraction", "worker_peak_rss_mib"])
    phase_at = dict(hist["phase"])
    rates: dict[int, list[float]] = {}
    for step, value in hist["samples_per_s"]:
        rates.setdefault(int(phase_at[step]), []).append(value)
    waits = [v for _, v in hist["data_wait_fraction"]]
    rss = [v for _, v in hist["worker_peak_rss_mib"]]
    return {"steady_samples_per_s": _steady(rates), "wall_s": wall, "median_data_wait": statistics.median(waits),
            "rank0_peak_rss_mib": max(rss) if rss else None}


def run_plain(args: argparse.Namespace, data: Path, tokenizer: Path, out: Path) -> dict[str, Any]:
    import torch

    from reclip_ray.config import load_config
    from reclip_ray.train.local import train_local

    torch.set_num_threads(int(args.threads))
    cfg = load_config("tiny", _overrides(args, data, tokenizer, out, 1))
    t0 = time.perf_counter()
    _, history = train_local(cfg, log=None)
    wall = time.perf_counter() - t0
    rates: dict[int, list[float]] = {}
    window = 5
    for i in range(window, len(history), window):
        a, b = history[i - window], history[i]
        if a["phase"] == b["phase"]:
            rates.setdefault(int(b["phase"]), []).append((b["samples"] - a["samples"]) / (b["time"] - a["time"]))
    import resource

    return {"steady_samples_per_s": _steady(rates), "wall_s": wall,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reclip-ray bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=float, default=1.0, help="torch threads (and CPUs per Ray worker)")
    parser.add_argument("--workers", default="1", help="comma-separated Ray worker counts to measure, e.g. 1,2")
    parser.add_argument("--data", default="", help="synthetic dataset folder (made if missing)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(int(args.threads)))

    from reclip_ray.data.synth import make_synthetic
    from reclip_ray.data.tokenizer import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="reclip-bench-e2e-"))
    data = Path(args.data) if args.data else out / "data"
    if not (data / "train").exists():
        make_synthetic(data, train=4000, eval=200, seed=0)
    tokenizer = out / "tokenizer.json"
    train_tokenizer(data / "train", vocab_size=1024, out=tokenizer)

    plain = run_plain(args, data, tokenizer, out)
    print(json.dumps({"path": "plain", **plain}), flush=True)
    for workers in [int(w) for w in args.workers.split(",")]:
        ray_res = run_ray(args, data, tokenizer, out, workers)
        ratio = {
            p: ray_res["steady_samples_per_s"][p] / plain["steady_samples_per_s"][p]
            for p in ray_res["steady_samples_per_s"]
            if p in plain["steady_samples_per_s"]
        }
        print(json.dumps({"path": f"ray_train_{workers}w", **ray_res, "ratio_vs_plain": ratio}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
