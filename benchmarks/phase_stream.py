"""The phase stream at cluster scale: building it (the driver, once per phase) and its read items (Ray Train's
controller, for every phase at every worker-group start: each restart and each elastic resize), from footers alone.

Why: both run before any worker trains, and both grow with the shards and the passes; a restart at 140k shards
waits for them. Shards are made up (``Shard`` records, no files): ``--shards`` of ``--rows`` rows each in three
row groups, the stream's defaults (16 shards a group, 64-row chunks).

Usage (no Ray)::

    python benchmarks/phase_stream.py --shards 140000 --rows 9200 --passes 1

Prints one JSON line: seconds to build, seconds for ``items`` from the start and from the middle of the stream,
the groups and units, and the pickled size of the items (what the controller ships). ``--ray`` also times, in a
local Ray of 2 CPUs, what the dataset factory did with them before, ``ray.data.from_items(items,
override_num_blocks=len(items))`` (``from_items_s``: one block, one ``ray.put``, per read item), and what it does
now, ``pipeline.phase_dataset`` (``dataset_s``: the items again, then an ``ItemsDatasource``, one read task per
item, nothing put); the pickled dataset (what the controller ships to Ray Train's dataset manager), the largest
pickled read task, and the dataset's first block (``first_block_s``, once a warm-up has started a worker:
execution starts, Ray Data puts each read task, the first task reads its group; the made-up shards are missing,
``data.missing_shards=skip``, so it sends its units' marker rows).
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
    parser.add_argument("--ray", action="store_true", help="also time the dataset, and from_items")
    args = parser.parse_args()
    third = args.rows // 3
    # Local paths that do not exist (as long as "s3://bucket/shards/"), so that --ray's first read task finds its
    # shards missing at once
    shards = [Shard(f"/nonexistent/shard/{i:08d}.parquet", args.rows, (third, third, args.rows - 2 * third))
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
        out.update(time_datasets(stream, items))
    print(json.dumps(out))


def time_datasets(stream, items: list[dict]) -> dict:
    """``from_items`` over the items, then the phase's dataset: built, pickled, its first block."""
    import ray
    from tokenizers import Tokenizer, models

    from reclip_ray.data.pipeline import ItemsDatasource, phase_dataset
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.data.tokenizer import EOT, PAD, SOT, CaptionTokenizer

    tokenizer = CaptionTokenizer(Tokenizer(models.WordLevel({PAD: 0, SOT: 1, EOT: 2, "a": 3}, unk_token="a")))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    args = dict(columns=ColumnMap(), image_size=64, text_length=16, tokenizer_json=tokenizer.to_json(), missing="skip",
                concurrency=2)
    # A worker started and its imports done (seconds here) before the timed first block: the stream's last unit
    next(iter(phase_dataset(stream, frontier=stream.total_units - 1, **args).iter_batches(batch_size=None)))
    out = {}
    t0 = time.perf_counter()
    ray.data.from_items(items, override_num_blocks=len(items))  # its blocks are freed when it goes
    out["from_items_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    ds = phase_dataset(stream, **args)
    out["dataset_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out["dataset_pickled_mb"] = round(len(ray.cloudpickle.dumps(ds)) / 1e6, 1)
    out["pickle_s"] = round(time.perf_counter() - t0, 2)
    out["read_task_max_bytes"] = max(len(ray.cloudpickle.dumps(t)) for t in ItemsDatasource(items).get_read_tasks(1))
    t0 = time.perf_counter()
    batches = iter(ds.iter_batches(batch_size=None))
    out["first_block_rows"] = len(next(batches)["_pos"])
    out["first_block_s"] = round(time.perf_counter() - t0, 2)
    batches.close()
    return out


if __name__ == "__main__":
    main()
