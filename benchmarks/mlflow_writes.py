"""How long rank 0's loop waits for one log window's MLflow write: made in the loop (a driver's way, and a worker's
before its write thread) against queued for the worker's write thread (``tracking_relay``).

Why: every rank waits for rank 0 at the next collective, so each millisecond rank 0 spends in MLflow is spent by
the whole cluster, and on a hung store it was minutes per window.

The set-up is the default one: a local SQLite store, written through the run's relay actor (``start_store_relay``)
by an actor standing in for rank 0 (another process, as a Ray Train worker is). Each window logs the metrics a
real window logs (``Window.metrics`` plus the data counters: ~25 keys). Per arm, ``--windows`` windows, then the
wait until the queue is empty (what a checkpoint's report waits for). Then ``--down-windows`` windows written to an
MLflow server that is down (a port nothing listens on; MLflow's HTTP retries as a worker bounds them), both ways:
each failed write is a warning either way, the question is who waits for it.

Usage (alone on the machine: it starts Ray)::

    python benchmarks/mlflow_writes.py --windows 200

Prints one JSON line per arm (median and p90 ms per window in the loop, the flush wait afterwards, the points the
store holds) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

KEYS = ["loss", "lr", "logit_scale", "samples", "gflops_total", "samples_per_s", "step_time_s", "data_wait_s",
        "data_wait_frac", "image_size", "text_length", "phase", "workers", "worker_samples", "grad_norm",
        "mfu", "data_rows_seen", "data_rows_bad", "data_rows_absent", "gflops_per_s", "tokens_per_s",
        "worker_peak_rss_mib", "batch_size", "micro_batches", "eta_s"]


class Rank0:
    """Stands in for rank 0: the worker's MLflow calls, timed."""

    def windows(self, relay, uri: str, run_id: str, n: int, queued: bool, start_step: int) -> dict:
        from reclip_ray import tracking, tracking_relay

        tracking_relay.use_relay(relay, worker=queued)
        if not queued:  # the old way: a worker's write waited in the loop (its failures warnings, its retries bounded)
            tracking_relay._WORKER = True
            tracking_relay.bound_mlflow_requests()
        waits = []
        for i in range(n):
            t0 = time.perf_counter()
            tracking.log_metrics(uri, run_id, {k: float(i) for k in KEYS}, step=start_step + i)
            waits.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert tracking_relay.flush_writes(600)
        return {"waits": waits, "flush_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--down-windows", type=int, default=3)
    args = parser.parse_args()

    import ray

    from reclip_ray import tracking
    from reclip_ray.config import load_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="mlflow-writes-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        run_id = tracking.start_or_resume_run(uri, "bench", "writes", None, load_config("tiny"))
        relay = tracking.start_store_relay("bench-writes", uri)
        rows = {}
        for arm, queued in (("in_loop", False), ("queued", True)):
            rank0 = ray.remote(Rank0).options(num_cpus=0).remote()
            start = 0 if arm == "in_loop" else args.windows
            out = ray.get(rank0.windows.remote(relay, uri, run_id, args.windows, queued, start))
            ms = sorted(w * 1e3 for w in out["waits"])
            rows[arm] = {"arm": arm, "windows": args.windows, "keys": len(KEYS),
                         "median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * len(ms))], 3),
                         "flush_after_s": round(out["flush_s"], 3)}
            ray.kill(rank0)
        points = len(tracking.client(uri).get_metric_history(run_id, "loss"))
        import socket

        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()
        for arm, queued in (("server_down_in_loop", False), ("server_down_queued", True)):
            rank0 = ray.remote(Rank0).options(num_cpus=0).remote()
            out = ray.get(rank0.windows.remote(None, down, "0" * 32, args.down_windows, queued, 0))
            ms = sorted(w * 1e3 for w in out["waits"])
            rows[arm] = {"arm": arm, "windows": args.down_windows, "median_ms": round(statistics.median(ms), 3),
                         "max_ms": round(ms[-1], 3), "flush_after_s": round(out["flush_s"], 3)}
            ray.kill(rank0)
        for row in rows.values():
            print(json.dumps(row))
        ratio = rows["in_loop"]["median_ms"] / max(rows["queued"]["median_ms"], 1e-6)
        print(json.dumps({"loss_points": points, "expected": 2 * args.windows,
                          "in_loop_over_queued_median": round(ratio, 1)}))


if __name__ == "__main__":
    main()
