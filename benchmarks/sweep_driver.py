"""The CPU a `reclip-ray sweep` driver process spends on itself: one one-trial sweep of the tiny model.

Why: a sweep's driver runs beside its trials on the head node, and every launch (a rerun to resume, each sweep in
the test suite) pays its start-up again. This runs `python -m reclip_ray sweep` in a child process on a local Ray
it starts, and prints the child's own user+system CPU seconds (``RUSAGE_SELF`` read in an ``atexit`` handler, so
Ray's daemons, the trial and its workers are not counted), its wall time, and whether torch and tensorboardX were
imported in it.

Usage (one Ray at a time on the machine; compare trees by PYTHONPATH, alternating)::

    python benchmarks/sweep_driver.py --work /tmp/sweepdrv                      # this tree
    PYTHONPATH=/tmp/old python benchmarks/sweep_driver.py --work /tmp/sweepdrv  # another checkout

Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SPACE = ("name: drv\nbase: tiny\n"
         "set: [model.vision.depth=1, model.text.depth=1, train.batch_size=64, train.log_every_steps=4,\n"
         "      scaling.min_workers=1, scaling.max_workers=1, scaling.cpus_per_worker=0.5, eval.at_phase_end=false]\n"
         "params: {optim.lr: {grid: [1.0e-3]}}\nmetric: loss\nmode: min\nbudget: {samples: 640}\n"
         "scheduler: {name: fifo}\n")

# Runs in the child: the sweep as `python -m reclip_ray` runs it, with its own CPU and modules reported at exit
CHILD = """
import atexit, json, resource, sys
def report():
    u = resource.getrusage(resource.RUSAGE_SELF)
    print("SWEEP_DRIVER " + json.dumps({"cpu_s": round(u.ru_utime + u.ru_stime, 2),
                                        "torch": "torch" in sys.modules, "tensorboardX": "tensorboardX" in sys.modules,
                                        "max_rss_mb": round(u.ru_maxrss / 1024)}), flush=True)
atexit.register(report)
sys.argv = ["reclip-ray"] + sys.argv[1:]
from reclip_ray.cli import run
run()
"""


def prepare(work: Path) -> None:
    """The synthetic data and tokenizer, made once and reused."""
    from reclip_ray.data.synth import make_synthetic
    from reclip_ray.data.tokenizer import train_tokenizer

    if (work / ".done").is_file():
        return
    make_synthetic(work / "synth", train=600, eval=200, seed=0, shard_rows=200)
    train_tokenizer(work / "synth" / "train", vocab_size=512, out=work / "tokenizer.json")
    (work / "space.yaml").write_text(SPACE)
    (work / ".done").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="data made here once; each run's outputs too")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    (args.work / "mlflow.db").unlink(missing_ok=True)
    sets = [f"data.train={args.work / 'synth' / 'train'}", f"data.eval={args.work / 'synth' / 'eval'}",
            f"data.tokenizer={args.work / 'tokenizer.json'}", "data.synth_if_missing=false",
            f"run.storage_path={runs}", f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}"]
    command = [sys.executable, "-c", CHILD, "sweep", "--space", str(args.work / "space.yaml")]
    command += [a for s in sets for a in ("--set", s)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SWEEP_DRIVER ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"sweep failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    import reclip_ray

    events = sorted(str(p.relative_to(runs)) for p in runs.rglob("events.out.tfevents*"))
    print(json.dumps({**json.loads(line[len("SWEEP_DRIVER "):]), "wall_s": round(wall, 1),
                      "tensorboard_files": len(events), "result_json_files": len(list(runs.rglob("result.json"))),
                      "reclip_ray": str(Path(reclip_ray.__file__).parent)}))


if __name__ == "__main__":
    main()
