"""The phase stream at cluster scale: building it (the driver, once per phase) and its read items (Ray Train's
controller, for every phase at every worker-group start: each restart and each elastic resize), from footers alone.

Why: both run before any worker trains, and both grow with the shards and the passes; a restart at 140k shards
waits for them. Shards are made up (``Shard`` records, no files): ``--shards`` of ``--rows`` rows each in three
row groups, the stream's defaults (16 shards a group, 64-row chunks).

Usage (no Ray)::

    python benchmarks/phase_stream.py --shards 140000 --rows 9200 --passes 1

Prints one JSON line: seconds to build, seconds for ``items`` from the start and from the middle of the stream,
the groups and units, and the pickled size of the items (what the controller ships). ``--ray`` also times what the
dataset factory does with them next, ``ray.data.from_items(items, override_num_blocks=len(items))`` (one block,
one ``ray.put``, per read item), in a local Ray of 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time


def main() -> None:
    from reclip_ray.data.shards import Shard
    from reclip_ray.data.stream import PhaseStream

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=140_000)
    parser.add_argument("--rows", type=int, default=9_200)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--ray", action="store_true", help="also time ray.data.from_items over the items")
    args = parser.parse_args()
    third = args.rows // 3
    shards = [Shard(f"s3://bucket/shards/{i:08d}.parquet", args.rows, (third, third, args.rows - 2 * third))
              for i in range(args.shards)]
    t0 = time.perf_counter()
    stream = PhaseStream(shards, seed=1, passes=args.passes)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    items = stream.items()
    from_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream.items(frontier=stream.total_units // 2)
    from_middle = time.perf_counter() - t0
    out = {"shards": args.shards, "rows": args.rows, "passes": args.passes, "groups": len(stream.groups),
           "units": stream.total_units, "build_s": round(build, 2), "items_s": round(from_start, 2),
           "items_from_middle_s": round(from_middle, 2), "items_pickled_mb": round(len(pickle.dumps(items)) / 1e6, 1)}
    if args.ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        ray.data.from_items(items, override_num_blocks=len(items))
        out["from_items_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
