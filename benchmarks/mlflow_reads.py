"""What a restart's MLflow reads cost as a run's history grows: the last ``loss`` step logged (``last_logged_step``)
read from the key's whole history (before) against the run's latest points (``tracking._latest_point``, now).

Why: rank 0 makes these reads at every restart while every other rank waits, and through the relay a read that
takes over ``RELAY_TIMEOUT_S`` (60 s) fails. A run logs one ``loss`` point per log window: a multi-day run at scale
has hundreds of thousands.

Per store (a SQLite file, and a real ``mlflow server`` on SQLite), one run with ``--points`` points of ``loss`` (and
of a second key, as a real run has ~20), logged in batches of 1,000; then each read ``--repeat`` times.

Usage (no Ray)::

    python benchmarks/mlflow_reads.py --points 200000

Prints one JSON line per store: the median seconds of each read, and that both gave the same step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_hang import start_server  # noqa: E402  (a real server on a free port, its process group)


def measure(uri: str, points: int, repeat: int) -> dict:
    from mlflow.entities import Metric

    from reclip_ray import tracking
    from reclip_ray.config import load_config

    run_id = tracking.start_or_resume_run(uri, "reads", "reads", None, load_config("tiny"))
    c, now = tracking.client(uri), int(time.time() * 1000)
    for start in range(0, points, 500):
        batch = range(start, min(start + 500, points))
        c.log_batch(run_id, metrics=[Metric(k, float(s), now + s, s) for s in batch for k in ("loss", "lr")])

    def whole_history() -> int:
        return max((m.step for m in c.get_metric_history(run_id, "loss")), default=-1)

    def latest_point() -> int:
        return tracking.last_logged_step(uri, run_id)

    result: dict = {"points": points}
    steps = set()
    for name, read in (("history_s", whole_history), ("latest_point_s", latest_point)):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            steps.add(read())
            times.append(time.perf_counter() - t0)
        result[name] = round(statistics.median(times), 4)
    result["same_step"] = steps == {points - 1}
    result["ratio"] = round(result["history_s"] / max(result["latest_point_s"], 1e-9), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlflow-reads-") as tmp:
        tmp = Path(tmp)
        print(json.dumps({"store": "sqlite", **measure(f"sqlite:///{tmp / 'local.db'}", args.points, args.repeat)}),
              flush=True)
        server, url = start_server(tmp)
        try:
            print(json.dumps({"store": "mlflow server", **measure(url, args.points, args.repeat)}), flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
