"""The Ray Data phase pipeline end to end (read + decode + crop + tokenize), full images vs. shrunk copies.

``reclip-ray bench data --pipeline`` writes Parquet shards of photo-like 512 px JPEGs (``bench.data.make_sources``),
adds 40/80/136/272 px copies with ``data shrink`` (each covers the train crop of 32/64/112/224 px), and then, per
phase size, streams the same rows through ``pipeline.phase_dataset`` twice: once from the full image, once from the
copy the phase would choose. One read+decode task runs at a time (one CPU), so the rates are images/s per core. The
bare decode of the same bytes in this process (no Ray, no Parquet, no tokenizer) is printed next to it: the ratio
pipeline / bare is Ray Data's and our pipeline's overhead.

The last rows turn the rates into decode cores per GPU for vit-b-16 and vit-l-16 on an H100 at 40% MFU: the training
samples/s a GPU consumes at that size (``flops.train_flops_per_sample``, global batch 32,768, text 16 tokens up to
64 px and 32 above) divided by the per-core rate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

COPY_FOR = {32: 40, 64: 80, 112: 136, 224: 272}  # the copy each phase size reads (images.min_source_side)
H100_TFLOPS = 989.0  # dense BF16, as plan.GPU_PEAKS
MFU = 0.4


def write_shards(root: Path, sources: list[bytes], shards: int, rows_per_shard: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in range(shards):
        images = [sources[(n + i) % len(sources)] for i in range(rows_per_shard)]
        captions = [f"a photo number {n + i} of a bench scene with shapes" for i in range(rows_per_shard)]
        keys = [f"{n + i:08d}" for i in range(rows_per_shard)]
        n += rows_per_shard
        pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary()), "caption": captions}),
                       root / f"shard-{s:05d}.parquet", compression="none", row_group_size=rows_per_shard)


def _dataset(shards: list, column: str, image_size: int, rows: int, tokenizer_json: str, on_device: bool):
    """``rows`` rows through phase_dataset with one read+decode task (one core), reading ``column`` of every shard."""
    from reclip_ray.data.pipeline import phase_dataset
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.data.stream import PhaseStream

    per_pass = sum(s.rows for s in shards)
    stream = PhaseStream(shards, seed=0, passes=max(1, -(-rows // per_pass)), group_shards=4, chunk_rows=64,
                         sources={s.path: column for s in shards})
    return phase_dataset(stream, ColumnMap(), image_size=image_size, text_length=16, tokenizer_json=tokenizer_json,
                         train=True, concurrency=1, num_cpus=1, on_device=on_device)


def _stream_seconds(*args) -> float:
    """Seconds from building the dataset to its last row (start-up included)."""
    start = time.perf_counter()
    for _ in _dataset(*args).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        pass
    return time.perf_counter() - start


def _stream_rate(shards: list, column: str, image_size: int, rows: int, tokenizer_json: str,
                 on_device: bool = False) -> float:
    """Images/s per core in the steady state.

    Decoding on the CPU, the task is the bottleneck: time from the first block (task start-up and the first read
    excluded) to the last. ``on_device`` (the CPU side of ``data.decode_device=cuda``: header, crop box, tokens) is
    so fast that the task runs ahead of the consumer and most rows are made before the first block arrives, which
    made that timing read 60,000-230,000 rows/s; there the rate is the difference between streaming 2 x ``rows``
    and ``rows`` rows, start-up included in both. (That difference is noisier: on CPU sources it read a 32 px
    pipeline faster than its bare decode, so they keep the first timing.)"""
    args = (shards, column, image_size, rows, tokenizer_json, on_device)
    if on_device:
        short = _stream_seconds(*args)
        long = _stream_seconds(shards, column, image_size, 2 * rows, tokenizer_json, on_device)
        return rows / (long - short) if long > short else float("nan")
    seen, start = 0, None
    for batch in _dataset(*args).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        if start is None:
            start = time.perf_counter()
            continue
        seen += len(batch["_ok"])
    return seen / (time.perf_counter() - start) if start and seen else 0.0


def _bare_rate(data: list[bytes], image_size: int, repeats: int = 3, on_device: bool = False) -> float:
    """The same work without Ray, Parquet or the tokenizer: decode + crop, or (``on_device``) the header read and
    crop box that the CPU does for ``data.decode_device=cuda``."""
    import random

    from reclip_ray.data.images import decode_image, plan_crop

    rng = random.Random(0)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d in data:
            if on_device:
                plan_crop(d, train=True, rng=rng)
            else:
                decode_image(d, image_size, train=True, rng=rng)
        rates.append(len(data) / (time.perf_counter() - t0))
    return statistics.median(rates)


def cores_per_gpu(rate: float, image_size: int) -> dict[str, float]:
    from reclip_ray.config import load_config
    from reclip_ray.flops import train_flops_per_sample

    out = {}
    for preset in ("vit-b-16", "vit-l-16"):
        cfg = load_config(preset)
        text = 16 if image_size <= 64 else 32
        per_gpu = MFU * H100_TFLOPS * 1e12 / train_flops_per_sample(cfg.model, image_size, text, cfg.train.batch_size)
        out[preset] = per_gpu / rate
        out[f"{preset}_samples_per_s_per_gpu"] = per_gpu
    return out


def run(sizes: Sequence[int], images: int = 200, shards: int = 8, rows_per_shard: int = 250,
        rows: int = 4000, repeats: int = 2, device_side: bool = False) -> list[dict[str, Any]]:
    """``device_side`` adds a third source per size: the copy through the CPU side of ``data.decode_device=cuda``.
    Its cores per GPU leave the decode itself to the GPU (timed by ``bench data --device cuda``)."""
    import pyarrow.parquet as pq
    import ray

    from reclip_ray.bench.data import make_sources
    from reclip_ray.data.copies import copy_column, shrink_dataset
    from reclip_ray.data.schema import list_parquet_files
    from reclip_ray.data.stream import read_footers
    from reclip_ray.data.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="reclip-bench-pipeline-"))
    out: list[dict[str, Any]] = []
    try:
        sources = make_sources(images)
        write_shards(tmp / "data", sources, shards, rows_per_shard)
        copies = sorted({COPY_FOR.get(s, s + s // 4) for s in sizes})
        shrink_dataset(tmp / "data", copies, log=None)
        files = list_parquet_files(str(tmp / "data"))
        shard_info = read_footers(files)
        tokenizer_json = train_tokenizer(str(tmp / "data"), vocab_size=512).to_json()
        table = pq.read_table(files[0])
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _temp_dir=os.environ.get("RECLIP_BENCH_RAY_TMP", "/tmp/ray"))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        for size in sizes:
            copy = copy_column("image", COPY_FOR.get(size, size + size // 4))
            device = f"{copy}@device"
            rates: dict[str, list[float]] = {"image": [], copy: [], **({device: []} if device_side else {})}
            for _ in range(repeats):  # alternate the sources so a busy neighbour slows them alike
                for source in rates:
                    column, on_device = source.split("@")[0], source.endswith("@device")
                    n = rows * (10 if on_device else 1)  # the device side is ~10x faster: as many seconds
                    rates[source].append(_stream_rate(shard_info, column, size, n, tokenizer_json, on_device))
            results = {}
            for column, values in rates.items():
                data = [bytes(b) for b in table.column(column.split("@")[0]).to_pylist()[:images]]
                bare = _bare_rate(data, size, on_device=column.endswith("@device"))
                rate = statistics.median(values)
                results[column] = rate
                row = {"bench": "data_pipeline", "target_px": size, "source": column,
                       "source_kb": round(sum(map(len, data)) / len(data) / 1024, 2),
                       "images_per_s_per_core": round(rate, 1), "bare_decode_per_core": round(bare, 1),
                       "pipeline_vs_bare": round(rate / bare, 2)}
                if column.endswith("@device"):
                    row["cores_per_gpu_h100_40mfu"] = {k: round(v, 1) for k, v in cores_per_gpu(rate, size).items()
                                                       if "samples" not in k}
                out.append(row)
                print(json.dumps(row), flush=True)
            best = results[copy]
            cores = cores_per_gpu(best, size)
            full_cores = cores_per_gpu(results["image"], size)
            row = {"bench": "data_pipeline", "target_px": size, "copy_vs_full": round(best / results["image"], 2),
                   "cores_per_gpu_h100_40mfu": {k: round(v, 1) for k, v in cores.items() if "samples" not in k},
                   "cores_per_gpu_full_source": {k: round(v, 1) for k, v in full_cores.items() if "samples" not in k},
                   "samples_per_s_per_gpu": {k.split("_")[0]: round(v) for k, v in cores.items() if "samples" in k}}
            out.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
