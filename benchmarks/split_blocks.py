"""CPU time Ray Data's split coordinator spends per block, the bound on blocks/s that one phase's split can serve.

Why: each phase's stream is split over the workers with ``streaming_split(equal=True)``, which runs one coordinator
actor per phase; every block every worker takes passes through it. The trainer's blocks were 64 rows at every
size: at the plan's 64 px rate on 64 H100s (31,650 samples/s per GPU at MFU 0.4), ~31,000 blocks/s through one
actor. What this measured (~0.9 ms per block, BENCHMARKS.md) is why they are now ``data.block_mb`` MB of decoded
rows (``run_names.block_rows``) and why ``reclip-ray plan`` prices each phase's blocks/s. This measures what a
block costs that actor, as CPU seconds of its process (``/proc/PID/stat``) over the blocks it handed out, so the
bound does not depend on what else the machine runs: one core serves at most 1 / (CPU per block) blocks/s.

The stream is made as the trainer's is: few tasks (``--blocks-per-task`` blocks each, as a unit of a shard gives
~140 blocks of 64 rows), each emitting blocks of ``--rows`` rows of ``--px`` px uint8 images (zeros: no decode),
cut to that size by ``target_max_block_size`` as ``data.pipeline`` sets it. The coordinator actor also runs the
stream's executor (it launches and tracks those tasks), which is in its CPU too. The split is ``equal=True`` over
``--workers`` actors that iterate it as Ray Train workers do (``iter_batches(batch_size=None)``: one batch per
block) and count blocks. Usage (alone on the machine: it starts Ray)::

    python benchmarks/split_blocks.py --blocks 4000 --rows 64 1024 --workers 4

Prints one JSON line per block size: blocks and rows served, wall seconds, blocks/s seen end to end on this
machine, the coordinator's CPU seconds (and their share of the wall time) per block, with the blocks/s one core
of it could serve at that cost. That bound holds only where its CPU goes to blocks: when the stream's producers
are the bottleneck (as on 2 cores), the coordinator's loop polls while it waits, and its CPU per block is an
upper bound, its blocks/s per core a lower one. ``--materialized`` makes every block before the split starts, so
the producers cost nothing while timed and the coordinator's own cost per block is what is left::

    python benchmarks/split_blocks.py --blocks 2000 --rows 64 16 --workers 4 --materialized
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def images(batch: dict, px: int) -> dict:
    import numpy as np

    return {"image": np.zeros((len(batch["id"]), px, px, 3), np.uint8), "id": batch["id"]}


def measure(blocks: int, rows: int, workers: int, px: int, per_task: int, materialized: bool = False) -> dict:
    import ray
    from ray.util.state import list_actors

    @ray.remote(num_cpus=0.25)
    class Consumer:
        def count(self, split: Any) -> tuple[int, int]:
            blocks = rows = 0
            for batch in split.iter_batches(batch_size=None, batch_format="numpy"):
                blocks, rows = blocks + 1, rows + len(batch["id"])
            return blocks, rows

    tasks = max(1, blocks // per_task)
    ds = ray.data.range(blocks * rows, override_num_blocks=tasks)
    ds.context.target_max_block_size = int(1.1 * rows * (3 * px * px + 8))  # as data.pipeline sizes its blocks
    ds = ds.map_batches(images, fn_kwargs={"px": px}, batch_size=rows, batch_format="numpy")
    if materialized:  # every block made before the clock starts: the split's producers cost nothing while timed
        ds = ds.materialize()
    if workers == 0:  # no split: one consumer iterates the dataset itself (a run that can only have one worker)
        consumer = Consumer.remote()
        ray.get(consumer.__ray_ready__.remote())
        t0 = time.perf_counter()
        served, rows_served = ray.get(consumer.count.remote(ds))
        wall = time.perf_counter() - t0
        ray.kill(consumer)
        return {"bench": "split_blocks", "rows_per_block": rows, "px": px, "tasks": tasks, "workers": 0,
                "blocks": served, "rows": rows_served, "wall_s": round(wall, 2),
                "blocks_per_s_here": round(served / wall, 1)}
    splits = ds.streaming_split(workers, equal=True)
    consumers = [Consumer.remote() for _ in range(workers)]
    ray.get([c.__ray_ready__.remote() for c in consumers])
    t0 = time.perf_counter()
    pending = [c.count.remote(s) for c, s in zip(consumers, splits)]
    pid, cpu0 = None, 0.0
    while pid is None:  # the coordinator starts with the first consumer's first request
        found = [a for a in list_actors(filters=[("class_name", "=", "SplitCoordinator"), ("state", "=", "ALIVE")])]
        if found:
            pid = found[0].pid
            cpu0 = cpu_seconds(pid)
        else:
            time.sleep(0.05)
    counts = ray.get(pending)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    served, rows_served = (sum(c[i] for c in counts) for i in (0, 1))
    for c in consumers:
        ray.kill(c)
    return {"bench": "split_blocks", "rows_per_block": rows, "px": px, "tasks": tasks, "workers": workers,
            "materialized": materialized, "blocks": served,
            "rows": rows_served, "wall_s": round(wall, 2), "blocks_per_s_here": round(served / wall, 1),
            "coordinator_cpu_s": round(cpu, 2), "coordinator_cpu_share": round(cpu / wall, 3),
            "coordinator_cpu_ms_per_block": round(1000 * cpu / served, 3),
            "blocks_per_s_per_core": round(served / cpu, 1) if cpu else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4000)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--workers", type=int, default=4, help="0: no split, one consumer iterates the dataset")
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--blocks-per-task", type=int, default=100)
    parser.add_argument("--materialized", action="store_true",
                        help="make every block before the split starts: what the coordinator costs when it, not "
                             "the producers, is the bottleneck")
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for rows in args.rows:
            print(json.dumps(measure(args.blocks, rows, args.workers, args.px, args.blocks_per_task,
                                     args.materialized)), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
