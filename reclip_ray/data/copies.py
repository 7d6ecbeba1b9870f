"""Shrunk copies: small JPEGs of every image, made once, that the low-resolution phases read instead of the original.

Why: a 64 px sample costs a vit-b-16 about 9x less than a 224 px one, but decoding a 512 px JPEG to 64 px (even in
draft mode) costs about as much as before, so without copies the low-resolution phase is bound by CPU decode, not
by the GPU. Decoding an 80 px JPEG is 5-10x cheaper (``reclip-ray bench data --pipeline`` measures it).

Layout: one extra binary column per size in the same shard, named ``{image_column}_{size}`` (``image_40``,
``image_80``), holding a JPEG whose shorter side is ``size`` (or the original bytes when the image is already that
small). For a Hugging Face ``datasets`` Image column (struct<bytes, path>) the copies are plain binary columns
too, made from its ``bytes``: readers take both kinds, and the struct and the file's ``huggingface`` metadata stay
as they were, so ``datasets`` still loads the shard (the copies appear there as binary values). Same file, same
rows, so:
* a phase reads only the column it needs: Parquet column projection skips the full images entirely (on object
  storage a column read is a byte-range read of that column chunk), and no join by key is needed;
* one footer per shard still describes everything the driver needs (``shards.read_footers`` reads it once).
Disk cost: about 1 KB per sample for a 40 px copy and 2-4 KB for 80 px (quality 90, 4:4:4), against 30-100 KB
for a typical web image; ``data shrink`` prints the measured bytes per sample.

The footer's key-value metadata ``reclip.copies`` records which column the copies were made from, their sizes and
the row count. A copy column that the metadata does not vouch for (made from another column, a different row
count, or a size not listed: a shard rewritten by another tool) is *stale*: the phase falls back to the full image
for that shard and counts it. A shard with no copy large enough falls back too (counted as *missing*). What the
metadata cannot catch is an image replaced in place by a tool that kept our columns and metadata; re-run
``data shrink --force`` after editing images.

Writes are atomic per shard (temp file, then rename; on an object store one upload of the whole rewritten shard,
built in memory) and resumable (a shard whose metadata already lists every requested size is skipped), like
``data ingest``. Rewritten shards get small row groups and pages, which bounds what a read task holds per open
shard (see ``pipeline._ShardChunks``). Cost on S3 per shard: a HEAD, the footer and the image column read in 1 MB
ranged GETs, one upload (a PUT up to 10 MB, else multipart); skipped shards cost the HEAD and the footer only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from reclip_ray import storage
from reclip_ray.data.images import BadImage, make_copy, min_source_side
from reclip_ray.data.schema import image_bytes, read_dataset_json
from reclip_ray.data.shards import (COPIES_KEY, WRITE_BATCH_ROWS, copy_column, footer_copies, is_hidden,
                                    list_parquet_files, row_group_rows, split_pattern, write_file_atomic)
from reclip_ray.errors import DataError

DEFAULT_QUALITY = 90
# A shard is read front to back once: 8 MB reads make a 47 MB shard 6 ranged GETs on S3 instead of 47 (measured on
# the moto server), for 8 MB of buffer per column in each worker.
SHRINK_READ_BUFFER = 8 << 20


def parse_sizes(text: str | Iterable[int]) -> list[int]:
    """``"40,80"`` -> [40, 80]; one-line error for anything else."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        sizes = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise DataError(f"--sizes must be comma-separated integers (pixels of the shorter side), got {text!r}") from None
    if not sizes or sizes[0] < 8:
        raise DataError(f"--sizes must list sizes >= 8 px, got {text!r}")
    return sizes


# ------------------------------------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class SourceChoice:
    """Which column each shard of a phase is read from, and why."""

    columns: dict[str, str]  # shard path -> column to decode
    counts: dict[str, int]  # column -> shards
    missing: int  # shards read at full size because no copy covers the phase
    stale: int  # shards read at full size because a covering copy is stale

    def summary(self) -> str:
        parts = [f"{col} in {n} shard{'s' if n != 1 else ''}" for col, n in sorted(self.counts.items())]
        notes = []
        if self.missing:
            notes.append(f"{self.missing} without a copy that covers it")
        if self.stale:
            notes.append(f"{self.stale} with stale copies")
        return ", ".join(parts) + (f" (full image: {'; '.join(notes)})" if notes else "")

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "missing": self.missing, "stale": self.stale, "summary": self.summary()}


def choose_sources(shards: Sequence[Any], image_size: int, *, train: bool, image_column: str,
                   use_copies: bool = True) -> SourceChoice:
    """Per shard, the smallest valid copy whose shorter side covers ``image_size`` with the crop's margin
    (``images.min_source_side``: an 80 px copy for a 64 px train phase, 40 px for 32 px), else the full image."""
    need = min_source_side(image_size, train)
    columns: dict[str, str] = {}
    counts: dict[str, int] = {}
    missing = stale = 0
    for shard in shards:
        column = image_column
        covering = [s for s in getattr(shard, "copies", ()) if s >= need]
        if use_copies and covering:
            column = copy_column(image_column, min(covering))
        elif use_copies and any(s >= need for s in getattr(shard, "stale_copies", ())):
            stale += 1
        elif use_copies:
            missing += 1
        columns[shard.path] = column
        counts[column] = counts.get(column, 0) + 1
    if not use_copies:
        missing = 0
    return SourceChoice(columns, counts, missing, stale)


def sizes_for_phases(image_sizes: Iterable[int], source_side: int | None = None) -> list[int]:
    """The copy sizes that serve train phases of these image sizes: the covering side rounded up to 8 px (32 -> 40,
    64 -> 72), minus any that would not be smaller than the ``source_side`` of the images."""
    out = {int(-(-min_source_side(s, train=True) // 8) * 8) for s in image_sizes}
    return sorted(s for s in out if source_side is None or s < source_side)


# ------------------------------------------------------------------------------------------------ making


def _compression(names: Sequence[str], binary: set[str]) -> dict[str, str]:
    # JPEG bytes do not compress: no codec on image columns saves CPU on every read; snappy on the rest.
    return {n: ("none" if n in binary else "snappy") for n in names}


def shrink_shard(path: str, sizes: Sequence[int], *, image_column: str = "image", out_path: str | None = None,
                 quality: int = DEFAULT_QUALITY, force: bool = False) -> dict[str, Any]:
    """Add (or refresh) the copies of one shard; returns counts and the stored bytes per column. Atomic: the shard
    is replaced only when complete (``shards.write_file_atomic``: a temp file renamed locally, one object on a
    store). Local path or URI alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    with fs.open_input_file(inner) as fh:
        try:
            pf = pq.ParquetFile(fh, buffer_size=SHRINK_READ_BUFFER, pre_buffer=False)
        except pa.ArrowInvalid as exc:  # not Parquet (an I/O error is an OSError and stays one)
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        meta = pf.metadata
        names = pf.schema_arrow.names
        if image_column not in names:
            raise DataError(f"{path}: no column {image_column!r} to shrink (columns: {', '.join(names)}); pass "
                            f"--image-column")
        valid, stale = ((), ()) if force else footer_copies(meta, image_column)
        if set(sizes) <= set(valid) and (out_path or path) == path:
            return {"file": path, "rows": meta.num_rows, "made": 0, "bad": 0, "skipped": True,
                    "column_bytes": _column_bytes(meta)}
        return _rewrite_with_copies(pf, path, out_path or path, sizes, valid, stale, image_column, quality, force)


def _rewrite_with_copies(pf: Any, path: str, dst: str, sizes: Sequence[int], valid: Sequence[int],
                         stale: Sequence[int], image_column: str, quality: int, force: bool) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pf.metadata
    names = pf.schema_arrow.names
    all_sizes = sorted(set(sizes) | set(valid))
    todo = [s for s in all_sizes if s not in valid]
    drop = {copy_column(image_column, s) for s in (*stale, *todo)} | (
        {copy_column(image_column, s) for s in footer_copies(meta, image_column)[0]} if force else set())
    kept = [n for n in names if n not in drop]
    base = pf.schema_arrow
    fields = [base.field(n) for n in kept] + [pa.field(copy_column(image_column, s), pa.binary()) for s in todo]
    schema_meta = dict(base.metadata or {})
    schema_meta[COPIES_KEY] = json.dumps({"column": image_column, "sizes": all_sizes, "rows": meta.num_rows,
                                          "quality": quality, "version": 1}).encode()
    schema = pa.schema(fields, metadata=schema_meta)
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    rows_per_group = row_group_rows(total, meta.num_rows)
    binary = {image_column} | {copy_column(image_column, s) for s in all_sizes}
    counts = {"made": 0, "bad": 0, "row": 0}
    footer: list[Any] = []

    def write(sink: Any) -> None:
        with pq.ParquetWriter(sink, schema, compression=_compression(schema.names, binary),
                              write_batch_size=WRITE_BATCH_ROWS,
                              use_dictionary=[n for n in schema.names if n not in binary]) as writer:
            for batch in pf.iter_batches(batch_size=rows_per_group, use_threads=False):
                images = image_bytes(batch.column(image_column)).to_pylist()
                columns = {n: batch.column(n) for n in kept}
                for s in todo:
                    out: list[bytes | None] = []
                    for data in images:
                        if data is None:
                            out.append(None)
                            continue
                        try:
                            out.append(make_copy(bytes(data), s, quality))
                            counts["made"] += 1
                        except BadImage:
                            out.append(bytes(data))  # decoding the copy then fails exactly as the original does
                            counts["bad"] += 1
                    columns[copy_column(image_column, s)] = pa.array(out, pa.binary())
                writer.write_table(pa.table(columns, schema=schema), row_group_size=rows_per_group)
                counts["row"] += batch.num_rows
        footer.append(writer.writer.metadata)  # the new file's footer (what pyarrow's metadata_collector keeps)

    try:
        write_file_atomic(dst, write)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: shrinking failed near row {counts['row']}: {exc}") from exc
    return {"file": path, "rows": meta.num_rows, "made": counts["made"], "bad": counts["bad"] // max(1, len(todo)),
            "skipped": False, "column_bytes": _column_bytes(footer[0])}


def _column_bytes(meta: Any) -> dict[str, int]:
    """Stored bytes per column of a file, from its footer: the summary's bytes per sample need no second read."""
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            column = rg.column(c)
            out[column.path_in_schema] = out.get(column.path_in_schema, 0) + column.total_compressed_size
    return out


def _shrink_one(args: tuple) -> dict[str, Any]:
    path, sizes, image_column, out_path, quality, force = args
    return shrink_shard(path, sizes, image_column=image_column, out_path=out_path, quality=quality, force=force)


def shrink_dataset(data: str | os.PathLike, sizes: Sequence[int], *, out: str | os.PathLike | None = None,
                   image_column: str = "image", quality: int = DEFAULT_QUALITY, workers: int | None = None,
                   force: bool = False, log: Callable[[str], None] | None = print,
                   on_ray: bool = False) -> dict[str, Any]:
    """``reclip-ray data shrink``: copies for every shard of a dataset folder, one shard per task: in a process pool
    on this machine, or (``on_ray``) as Ray tasks over a whole cluster (``_run_on_ray``).

    With ``out`` the shards are written to a new folder (the source stays untouched: use this for a read-only
    bucket or while a job trains on the source); otherwise they are replaced in place, one at a time and atomically,
    so an interrupted run leaves whole shards and the next run continues with the rest.
    """
    src = storage.normalize(str(data))
    files = list_parquet_files(src)
    src = split_pattern(src)[0]  # a pattern (DIR/train-*.parquet) shrinks the files it names; DIR is the dataset's
    sizes = parse_sizes(sizes)
    dst_root = storage.normalize(str(out)) if out else src
    if out:
        _copy_small_files(src, dst_root)
    jobs = [(f, sizes, image_column, _destination(f, src, dst_root) if out else None, quality, force) for f in files]
    t0 = time.perf_counter()
    remote = storage.is_uri(src) or storage.is_uri(dst_root)
    if on_ray:
        results = _run_on_ray(jobs, log)
    else:
        results = _run_shrink_jobs(jobs, max(1, min(workers or os.cpu_count() or 1, len(jobs))), remote, log)
    summary = {
        "out": dst_root, "shards": len(files), "rows": sum(r["rows"] for r in results),
        "shards_skipped": sum(r["skipped"] for r in results), "copies_made": sum(r["made"] for r in results),
        "bad_images": sum(r["bad"] for r in results), "sizes": sizes, "quality": quality,
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes_per_sample": {str(s): _bytes_per_sample(results, copy_column(image_column, s)) for s in sizes},
        # a Hugging Face Image struct stores its bytes in the leaf column ``image.bytes``
        "full_bytes_per_sample": (_bytes_per_sample(results, image_column)
                                  or _bytes_per_sample(results, f"{image_column}.bytes")),
    }
    _record_copies(dst_root, {"column": image_column, "sizes": sizes, "quality": quality,
                              "bytes_per_sample": summary["bytes_per_sample"]})
    return summary


def _destination(file: str, src: str, dst_root: str) -> str:
    """Where ``--out`` writes a shard: at its path under the source folder, or for a source that is one file,
    ``dst_root/<its name>`` (its path relative to itself is empty, which named the folder ``dst_root`` itself)."""
    return storage.join(dst_root, storage.relative(file, src) or storage.name(file))


def _copy_small_files(src: str, dst_root: str) -> None:
    """dataset.json, classes.json, ...: the small files beside the shards travel with them to a new folder."""
    if storage.local_path(dst_root):  # an object store has no folders to make
        os.makedirs(dst_root, exist_ok=True)
    for extra in storage.list_files(src):
        relative = storage.relative(extra, src)
        if not relative.endswith(".parquet") and not is_hidden(relative) and ".tmp" not in relative:
            storage.write_bytes(storage.join(dst_root, relative), storage.read_bytes(extra))


def _run_shrink_jobs(jobs: list[tuple], workers: int, remote: bool,
                     log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """``shrink_shard`` of each job, in order: in this process, or in a pool of ``workers`` processes."""
    if workers == 1:
        return [_shrink_one(j) for j in jobs]
    # Forked children would inherit the parent's S3 clients (storage caches one per bucket) and the AWS SDK's
    # threads, which nothing promises to survive a fork (s3fs documents hangs): with a remote source or target
    # the workers start fresh (spawn, ~1 s each). Forking worked on the moto server here; this is caution.
    context = multiprocessing.get_context("spawn") if remote else None
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for r in pool.map(_shrink_one, jobs, chunksize=1):
            results.append(r)
            if log and len(results) % max(1, len(jobs) // 10) == 0:
                log(f"[reclip] shrink: {len(results)}/{len(jobs)} shards")
    return results


def _run_on_ray(jobs: list[tuple], log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """``shrink_shard`` of each job as a Ray task of one CPU, on the cluster ``$RAY_ADDRESS`` names (``ray job
    submit`` sets it), the Ray this process already joined, or a new local one.

    Why: BENCHMARKS measured ~900 copies/s per core from 128 px sources; 140k shards of 1,000 images with 40 and
    80 px copies are then at least 86 core-hours (more from web-size originals): days on one 16-core machine, an
    hour or two on a 64-node cluster's CPUs. At most two tasks per cluster CPU are in flight (Ray's pattern for a
    bounded queue), so the driver holds a window of task handles, not 140k. A task that dies with its node is
    retried by Ray; a shard that cannot be shrunk (a ``DataError``: not Parquet, no image column) ends the command
    with its one-line error, as the process pool does, and the shards finished so far stay done (each is written
    atomically) for the rerun to skip."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    task = ray.remote(num_cpus=1, max_retries=3)(_shrink_one)
    window = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    results: list[dict[str, Any]] = []
    queue = iter(jobs)
    try:
        while True:
            for job in queue:
                pending.append(task.remote(job))
                if len(pending) >= window:
                    break
            if not pending:
                return results
            (ref,), pending = ray.wait(pending, num_returns=1)
            results.append(_ray_result(ray, ref))
            if log and len(results) % max(1, len(jobs) // 10) == 0:
                log(f"[reclip] shrink: {len(results)}/{len(jobs)} shards (Ray)")
    finally:  # after an error the other shards' tasks stop too, and the command returns once none is writing: a
        # cancelled task removes its temp file (shards.write_file_atomic), a finished shard stays done
        for ref in pending:
            ray.cancel(ref)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=60)


def _ray_result(ray: Any, ref: Any) -> dict[str, Any]:
    """A task's result; its error as the one the process pool would raise (the ``DataError`` itself, not Ray's
    wrapper with the remote traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause if isinstance(exc.cause, Exception) else exc from None


def _bytes_per_sample(results: list[dict[str, Any]], column: str) -> float:
    """Mean stored bytes of ``column`` per row, over the shards that have it (0 when none does)."""
    having = [r for r in results if column in r["column_bytes"]]
    rows = sum(r["rows"] for r in having)
    return round(sum(r["column_bytes"][column] for r in having) / rows, 1) if rows else 0.0


def _record_copies(dst_root: str, copies: dict[str, Any]) -> None:
    """Note the copies in the dataset's ``dataset.json``, when it has one (``data inspect`` shows them)."""
    meta = read_dataset_json(dst_root)
    if meta and isinstance(meta, dict):
        meta["copies"] = copies
        storage.write_json(storage.join(dst_root, "dataset.json"), meta, sort_keys=False)
