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

from reclip_ray.data.copies import shrink_dataset
from reclip_ray.data.shards import copy_column, list_parquet_files, read_footers
from reclip_ray.data.tokenizer import train_tokenizer

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
    """``rows`` rows through phase_dataset with one read+decode task (one core), reading ``column`` of every shard.
    In 64-row blocks (``decode_batch_size``), not the trainer's ``data.block_mb`` ones: ``_stream_rate`` times from
    the first block on, which with blocks of hundreds of rows would leave out most of a run's rows (tried: 64 px
    read 4x faster than its bare decode). The block size moves the rate only through per-block overheads."""
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


def run(sizes: Sequence[int], sources: list[bytes], shards: int = 8, rows_per_shard: int = 250,
        rows: int = 4000, repeats: int = 2, device_side: bool = False) -> list[dict[str, Any]]:
    """The rows printed for each phase size, from shards of ``sources`` (``bench.data.make_sources``).

    ``device_side`` adds a third source per size: the copy through the CPU side of ``data.decode_device=cuda``.
    Its cores per GPU leave the decode itself to the GPU (timed by ``bench data --device cuda``)."""
    tmp = Path(tempfile.mkdtemp(prefix="reclip-bench-pipeline-"))
    out: list[dict[str, Any]] = []
    try:
        shard_info, tokenizer_json, table = _prepare(tmp / "data", sources, sizes, shards, rows_per_shard)
        _start_ray()
        for size in sizes:
            copy = copy_column("image", COPY_FOR.get(size, size + size // 4))
            sources_of_size = [("image", False), (copy, False)] + ([(copy, True)] if device_side else [])
            rates = _median_rates(sources_of_size, shard_info, size, rows, repeats, tokenizer_json)
            for (column, on_device), rate in rates.items():
                data = [bytes(b) for b in table.column(column).to_pylist()[:len(sources)]]
                out.append(_source_row(size, column, on_device, rate, data))
                print(json.dumps(out[-1]), flush=True)
            out.append(_summary_row(size, rates[(copy, False)], rates[("image", False)]))
            print(json.dumps(out[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _prepare(root: Path, sources: list[bytes], sizes: Sequence[int], shards: int,
             rows_per_shard: int) -> tuple[list, str, Any]:
    """Shards of ``sources`` with the copies the phase sizes read: (their footers, a tokenizer's JSON, the first
    shard's table, whose images the bare decode uses)."""
    import pyarrow.parquet as pq

    write_shards(root, sources, shards, rows_per_shard)
    shrink_dataset(root, sorted({COPY_FOR.get(s, s + s // 4) for s in sizes}), log=None)
    files = list_parquet_files(str(root))
    tokenizer_json = train_tokenizer(str(root), vocab_size=512).to_json()
    return read_footers(files), tokenizer_json, pq.read_table(files[0])


def _start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ.get("RECLIP_BENCH_RAY_TMP", "/tmp/ray"))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _median_rates(sources: list[tuple[str, bool]], shard_info: list, size: int, rows: int, repeats: int,
                  tokenizer_json: str) -> dict[tuple[str, bool], float]:
    """Median images/s per core of each (column, on_device) source; the sources alternate within each repeat so
    a busy neighbour slows them alike."""
    rates: dict[tuple[str, bool], list[float]] = {source: [] for source in sources}
    for _ in range(repeats):
        for column, on_device in sources:
            n = rows * (10 if on_device else 1)  # the device side is ~10x faster: as many seconds
            rates[(column, on_device)].append(_stream_rate(shard_info, column, size, n, tokenizer_json, on_device))
    return {source: statistics.median(values) for source, values in rates.items()}


def _source_row(size: int, column: str, on_device: bool, rate: float, data: list[bytes]) -> dict[str, Any]:
    """One source's rate against the bare decode of the same bytes (and, device side, its cores per GPU)."""
    bare = _bare_rate(data, size, on_device=on_device)
    row = {"bench": "data_pipeline", "target_px": size, "source": f"{column}@device" if on_device else column,
           "source_kb": round(sum(map(len, data)) / len(data) / 1024, 2),
           "images_per_s_per_core": round(rate, 1), "bare_decode_per_core": round(bare, 1),
           "pipeline_vs_bare": round(rate / bare, 2)}
    if on_device:
        row["cores_per_gpu_h100_40mfu"] = {k: round(v, 1) for k, v in cores_per_gpu(rate, size).items()
                                           if "samples" not in k}
    return row


def _summary_row(size: int, copy_rate: float, full_rate: float) -> dict[str, Any]:
    """The copy against the full image at one size, as decode cores per GPU."""
    cores = cores_per_gpu(copy_rate, size)
    full_cores = cores_per_gpu(full_rate, size)
    return {"bench": "data_pipeline", "target_px": size, "copy_vs_full": round(copy_rate / full_rate, 2),
            "cores_per_gpu_h100_40mfu": {k: round(v, 1) for k, v in cores.items() if "samples" not in k},
            "cores_per_gpu_full_source": {k: round(v, 1) for k, v in full_cores.items() if "samples" not in k},
            "samples_per_s_per_gpu": {k.split("_")[0]: round(v) for k, v in cores.items() if "samples" in k}}
