"""A real ``reclip-ray train`` job writing to a real ``mlflow server`` that hangs mid-run (SIGSTOP, then SIGCONT):
how much the job trains while the server does not answer.

Why: the workers' MLflow writes are made by a thread of their own (``tracking_relay._Writer``); this checks, on the
real job and a real server, that nothing else in the step loop waits for MLflow (a read, a tag, a hidden call):
only a checkpoint waits, at most ``FLUSH_BEFORE_REPORT_S``. Run it with ``--code`` pointing at another checkout
to compare (the job imports reclip_ray from there).

The job is the default one (tiny preset, 2 CPU workers) on an existing default dataset, shortened to ``--samples``,
its run folder and the server's store in a temporary folder. The server is stopped (its whole process group:
the ``mlflow server`` command and the web server's worker processes, which answer on their own) once the job has
printed ``--hang-after`` log windows, for ``--hang-s`` seconds: it accepts connections and answers nothing. Off a terminal the job prints one line per log window
(10 steps); each line is timestamped as it arrives.

Usage (alone on the machine: it starts Ray)::

    python benchmarks/mlflow_hang.py --data reclip_data --code .

Prints one JSON line: windows and samples trained while the server was stopped, against an equal time before it,
the job's exit code and wall time, and the ``loss`` points the server holds against the windows the job printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

WINDOW = re.compile(r"^(lowres|finetune) .*step (\d+)/(\d+)\s+samples ([\d,]+)/")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination",
         str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a default dataset folder (with train/ and eval/)")
    parser.add_argument("--code", default=".", help="the checkout the job imports reclip_ray from")
    parser.add_argument("--samples", type=int, default=32000)
    parser.add_argument("--hang-after", type=int, default=4, help="log windows printed before the server stops")
    parser.add_argument("--hang-s", type=float, default=40.0)
    parser.add_argument("--set", action="append", default=[], help="more config overrides for the job")
    args = parser.parse_args()

    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory(prefix="mlflow-hang-") as name:
        tmp = Path(name)
        server, url = start_server(tmp)
        env = {**os.environ, "PYTHONPATH": str(Path(args.code).resolve()), "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        command = [sys.executable, "-m", "reclip_ray", "train", "--set", f"tracking.uri={url}",
                   "--set", f"train.samples={args.samples}", "--set", f"data.train={data / 'train'}",
                   "--set", f"data.eval={data / 'eval'}", "--set", f"run.storage_path={tmp / 'runs'}"]
        command += [a for o in args.set for a in ("--set", o)]
        t0 = time.monotonic()
        job = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        windows: list[tuple[float, int]] = []  # (arrival, samples)
        lines: list[str] = []
        stopped_at = None
        for line in job.stdout:
            now = time.monotonic()
            lines.append(line.rstrip())
            m = WINDOW.match(line.strip())
            if m:
                windows.append((now, int(m.group(4).replace(",", ""))))
                if len(windows) == args.hang_after and stopped_at is None:
                    os.killpg(server.pid, signal.SIGSTOP)
                    stopped_at = now
                    resume = threading.Timer(args.hang_s, os.killpg, (server.pid, signal.SIGCONT))
                    resume.start()
        rc = job.wait()
        wall = time.monotonic() - t0
        if stopped_at is not None:  # the job may have ended inside the hang
            resume.cancel()
            os.killpg(server.pid, signal.SIGCONT)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=url)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            losses = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] if runs else []
            status = runs[0].info.status if runs else None
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        def rate(lo: float, hi: float) -> tuple[int, float]:
            """Windows printed in (lo, hi] and samples/s over them, from the last window at or before lo."""
            start = [(t, n) for t, n in windows if t <= lo][-1]
            inside = [(t, n) for t, n in windows if lo < t <= hi]
            return len(inside), round((inside[-1][1] - start[1]) / (hi - lo), 1) if inside else 0.0

        first = windows[0][0]
        hang_end = min(stopped_at + args.hang_s, windows[-1][0])
        before, during = rate(first, stopped_at), rate(stopped_at, hang_end)
        print(json.dumps({
            "code": str(Path(args.code).resolve()), "rc": rc, "wall_s": round(wall, 1), "hang_s": args.hang_s,
            "windows_before_hang": before[0] + 1, "samples_per_s_before_hang": before[1],
            "windows_during_hang": during[0], "samples_per_s_during_hang": during[1],
            "windows_printed": len(windows), "loss_points_on_server": len(losses),
            "loss_steps_unique": len(set(losses)) == len(losses), "run_status": status,
            "warnings": [line[:200] for line in lines if "WARNING" in line][:5]}))


if __name__ == "__main__":
    main()
