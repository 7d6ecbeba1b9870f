"""How long a ``reclip-ray`` process takes to end once it has printed its last line: ``cli.main`` returned to the
interpreter's own exit, against ``cli.run`` (``cli.exit_process``: threads joined, atexit handlers run, no teardown
of the heap).

Why: a command that has loaded torch, Ray, MLflow, pandas and matplotlib spent seconds after its summary freeing
objects one by one. A user waits on it after every command; the test suite starts some twenty CLI processes.

Two commands, each run ``--reps`` times per entry point, alternating:

* ``train``: the default job shortened (512 samples, 600 synthetic rows, 2 workers at 0.5 CPU), on a Ray this script
  starts (``ray.init``) and the CLI joins (``RAY_ADDRESS``), each time under a new run name;
* ``report``: ``reclip-ray report`` of the first train run (MLflow and matplotlib, no Ray).

Usage (alone on the machine: it starts Ray)::

    python benchmarks/cli_exit.py --reps 3

Prints one JSON line per process (command, entry, seconds from the last output line to the exit, wall seconds) and
a summary line of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ENTRIES = {
    "main": [sys.executable, "-c", "import sys; from reclip_ray.cli import main; sys.exit(main(sys.argv[1:]))"],
    "run": [sys.executable, "-m", "reclip_ray"],
}
SHORTEN = ["train.samples=512", "data.synth_train=600", "data.synth_eval=100", "scaling.cpus_per_worker=0.5"]


def timed(command: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from the last line of output to the exit, wall seconds) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = start
    for _ in proc.stdout:
        last = time.perf_counter()
    code = proc.wait()
    end = time.perf_counter()
    if code != 0:
        raise SystemExit(f"{command} exited {code}")
    return end - last, end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=4, log_to_driver=False, include_dashboard=False)
    cwd = tempfile.mkdtemp(prefix="cli-exit-")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    tails: dict[tuple[str, str], list[float]] = {}
    first_run = None
    for rep in range(args.reps):
        for entry, prefix in ENTRIES.items():
            name = f"{entry}{rep}"
            sets = [a for o in SHORTEN + [f"run.name={name}"] for a in ("--set", o)]
            tail, wall = timed(prefix + ["train", *sets], cwd, env)
            first_run = first_run or os.path.join(cwd, "reclip_runs", name)
            print(json.dumps({"command": "train", "entry": entry, "exit_s": round(tail, 2), "wall_s": round(wall, 2)}),
                  flush=True)
            tails.setdefault(("train", entry), []).append(tail)
    for rep in range(args.reps):
        for entry, prefix in ENTRIES.items():
            tail, wall = timed(prefix + ["report", first_run], cwd, env)
            print(json.dumps({"command": "report", "entry": entry, "exit_s": round(tail, 2), "wall_s": round(wall, 2)}),
                  flush=True)
            tails.setdefault(("report", entry), []).append(tail)
    print(json.dumps({"median_exit_s": {f"{c} {e}": round(statistics.median(v), 2) for (c, e), v in tails.items()}}))
    ray.shutdown()


if __name__ == "__main__":
    main()
