"""A worker's shuffle buffer (``data.feed.PhaseFeed``) at a GPU's local batch: the memory a refill holds and the
time ``take`` spends on the training thread.

Why: ``take`` runs in the step loop (its time is the step's data wait), and a refill builds the next window of
``data.shuffle_buffer`` rows (default 10 local batches: 5,120 rows at 512 a GPU, 770 MB at 224 px) on the host of
every GPU of a node at once.

Blocks are made up (64 rows each, as the pipeline's decode batches; one image array reused), ``--takes`` batches
of ``--batch`` rows after the first fill, for each ``--sizes`` px.

Usage (no Ray)::

    python benchmarks/feed_refill.py --sizes 64,224

Prints one JSON line per size: the window's bytes, Python's traced peak during the takes (and as a multiple of the
window), the median take, the slowest (a refill) and the sum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc

import numpy as np


def blocks(size: int, rows: int = 64):
    from reclip_ray.data.stream import OK

    image = np.zeros((rows, size, size, 3), np.uint8)
    unit = 0
    while True:
        pos = np.arange(unit * rows, (unit + 1) * rows)
        yield {"image": image.copy(), "tokens": np.zeros((rows, 16), np.int64), "_pos": pos,
               "_unit": np.full(rows, unit), "_unit_rows": np.full(rows, rows, np.int32),
               "_unit_absent": np.zeros(rows, np.int32), "_ok": np.full(rows, OK, np.int8),
               "_bad": np.full(rows, "", object)}
        unit += 1


def measure(size: int, batch: int, takes: int) -> dict:
    from reclip_ray.data.feed import PhaseFeed

    buffer = 10 * batch  # data.shuffle_buffer=-1
    feed = PhaseFeed(blocks(size), buffer_rows=buffer, seed=1)
    feed.take(batch)  # the first fill
    tracemalloc.start()
    times = []
    for _ in range(takes):
        t0 = time.perf_counter()
        feed.take(batch)
        times.append(time.perf_counter() - t0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    window = buffer * size * size * 3
    return {"px": size, "batch": batch, "window_mb": round(window / 1e6), "peak_mb": round(peak / 1e6),
            "peak_x_window": round(peak / window, 2), "take_median_ms": round(statistics.median(times) * 1e3, 2),
            "take_max_ms": round(max(times) * 1e3, 1), f"sum_{takes}_takes_s": round(sum(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--takes", type=int, default=40)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(measure(size, args.batch, args.takes)), flush=True)


if __name__ == "__main__":
    main()
