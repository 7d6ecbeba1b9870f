"""Ray Data input for the trainer: Parquet shards -> decoded, cropped, tokenized batches for one RECLIP phase.

Each phase gets its own ``phase_dataset`` over the same ``read_shards`` dataset, so switching from 64 px to 224 px
changes only the decode size, never the files. Reading a file and decoding its rows are plain functions that Ray
Data fuses into one task; the tasks ask for a fraction of a CPU (so on a 2-core box they fit next to the training
workers), at most ``MAX_TASKS`` at a time, and the tokenizer is built once per Ray worker process (Ray reuses task
processes; actor pools started new processes for every phase of every run, about 7 s a run here). Images stay
uint8 NHWC here; normalisation happens on the training device, where it is free compared to a 4x bigger transfer.

Unusable rows (bad image, empty caption) are dropped and reported to a named ``BadRowCounter`` actor; the trainer
reads its totals, logs them and applies ``data.max_bad_fraction`` via ``check_bad_fraction``.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from reclip_ray.data.images import BadImage, decode_image
from reclip_ray.data.local import MAX_EXAMPLES, BadRowCount, check_bad_fraction, row_rng
from reclip_ray.data.schema import ColumnMap, check_schema, list_parquet_files, parquet_schema
from reclip_ray.data.tokenizer import CaptionTokenizer, load_tokenizer

if TYPE_CHECKING:
    import pyarrow as pa

DECODE_NUM_CPUS = 0.25
MAX_TASKS = 4  # default cap per stage: fractional-CPU tasks are otherwise started by the dozen on a small box
LABEL_COLUMNS = ("label", "label_pattern")


class _BadRowCounter:
    """Totals of rows seen / dropped across all decode tasks of a run (a few examples kept for the message)."""

    def __init__(self) -> None:
        self._count = BadRowCount()
        self._missing: list[str] = []

    def add(self, seen: int, bad: int, examples: list | None = None) -> None:
        self._count.add(seen, bad, examples or [])

    def add_missing(self, file: str) -> None:
        if file not in self._missing:
            self._missing.append(file)

    def totals(self) -> dict:
        return {"seen": self._count.seen, "bad": self._count.bad, "fraction": self._count.fraction,
                "examples": list(self._count.examples), "missing": list(self._missing)}

    def reset(self) -> None:
        self._count = BadRowCount()
        self._missing = []


BadRowCounter = ray.remote(num_cpus=0, max_restarts=-1)(_BadRowCounter)


def get_or_create_bad_counter(name: str = "reclip_bad_rows", namespace: str | None = None):
    """The named counter actor of a run (created on first use), shared by the decode tasks and the trainer."""
    opts: dict[str, Any] = {"name": name, "get_if_exists": True}
    if namespace is not None:
        opts["namespace"] = namespace
    return BadRowCounter.options(**opts).remote()


def check_counter(counter, threshold: float) -> dict:
    """Totals of a BadRowCounter; raises DataError (with an example row) past ``threshold`` (data.max_bad_fraction)."""
    totals = ray.get(counter.totals.remote())
    examples = totals.get("examples") or []
    check_bad_fraction(totals["seen"], totals["bad"], threshold, examples[0] if examples else None)
    return totals


def read_shards(path: str, columns: ColumnMap, *, shuffle_files: bool = True, seed: int = 0,
                extra_columns: tuple[str, ...] = (), missing: str = "fail", bad_counter=None,
                passes: int = 1, concurrency: int | None = None) -> "ray.data.Dataset":
    """The shards as one Ray Dataset, columns renamed to key/image/caption/label (+ ``path``).

    The schema of every file is checked first (footers only), so a missing column fails here with the file and
    column named rather than inside a Ray task minutes later. Files are read whole, one per task, in a seeded order
    per pass; ``passes`` > 1 chains that many passes into one dataset (``read_parquet`` drops repeated paths, and a
    union of N reads starts N times the tasks, which on a small machine costs more than the training). A shard that
    disappears after this call fails the read naming the file, or with ``missing="skip"`` is skipped and reported to
    ``bad_counter`` (for buckets that lose objects during a long run).
    """
    import pyarrow as pa

    files = list_parquet_files(path)
    check_schema(files, columns)
    schema = parquet_schema(files[0])
    wanted = [columns.image, columns.caption]
    for optional in (columns.key, columns.label, "label_pattern", *extra_columns):
        if optional in schema.names and optional not in wanted:
            wanted.append(optional)
    order: list[str] = []
    for p in range(passes):
        perm = np.random.default_rng(seed + p).permutation(len(files)) if shuffle_files else range(len(files))
        order += [files[i] for i in perm]
    out_schema = pa.schema([schema.field(c) for c in wanted] + [pa.field("path", pa.string())])
    ds = ray.data.from_items([{"file": f} for f in order], override_num_blocks=len(order)).map_batches(
        _read_files,
        fn_kwargs={"schema": out_schema, "missing": missing, "counter": bad_counter},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=DECODE_NUM_CPUS,
        concurrency=concurrency or MAX_TASKS,  # the same as phase_dataset's, so Ray Data fuses the two
    )
    renames = {src: dst for src, dst in columns.renames().items() if src in wanted}
    if renames:
        ds = ds.rename_columns(renames)
    return ds


def _read_files(batch: "pa.Table", *, schema: "pa.Schema", missing: str = "fail", counter=None) -> "pa.Table":
    """map_batches function: Parquet file names in, their rows out (the wanted columns plus ``path``)."""
    import pyarrow as pa

    from reclip_ray.data.local import _read_shard
    from reclip_ray.errors import DataError

    columns = [f.name for f in schema if f.name != "path"]
    tables = []
    for file in batch.column("file").to_pylist():
        try:
            table = _read_shard(file, columns)
        except DataError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            if missing != "skip":
                raise DataError(f"shard {file} disappeared during the run (data.missing_shards=fail; "
                                "set data.missing_shards=skip to train on without it)") from None
            print(f"[reclip] WARNING: shard {file} is gone; skipped (data.missing_shards=skip)", flush=True)
            if counter is not None:
                ray.get(counter.add_missing.remote(file))
            continue
        table = table.append_column("path", pa.array([file] * table.num_rows, pa.string()))
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, text_length: int, tokenizer_json: str,
                 train: bool, seed: int, bad_counter=None) -> dict[str, np.ndarray]:
    """map_batches function: bytes + captions -> uint8 images + int64 tokens; unusable rows dropped and counted."""
    tokenizer = _tokenizer_from(tokenizer_json)
    images = batch["image"]
    captions = batch["caption"]
    n = len(images)
    keys = batch.get("key")
    paths = batch.get("path")
    keep: list[int] = []
    decoded: list[np.ndarray] = []
    examples: list[dict] = []
    bad = 0
    for i in range(n):
        caption = captions[i]
        key = keys[i] if keys is not None else None
        try:
            if caption is None or not str(caption).strip():
                raise BadImage("empty caption")
            data = images[i]
            if data is None:
                raise BadImage("missing image bytes")
            rng = None
            if train:
                rng = row_rng(seed, key) if key is not None else _fallback_rng(seed)
            decoded.append(decode_image(bytes(data), image_size, train=train, rng=rng))
            keep.append(i)
        except BadImage as exc:
            bad += 1
            if len(examples) < MAX_EXAMPLES:
                file = os.path.basename(str(paths[i])) if paths is not None else "?"
                examples.append({"file": file, "row": None, "key": None if key is None else str(key),
                                 "reason": str(exc)})
    if bad_counter is not None:
        # Wait for the ack (about a millisecond per batch): totals read right after the epoch are then complete.
        ray.get(bad_counter.add.remote(n, bad, examples))
    s = image_size
    out = {
        "image": np.stack(decoded) if decoded else np.zeros((0, s, s, 3), np.uint8),
        "tokens": tokenizer.encode([str(captions[i]) for i in keep], text_length),
    }
    for name in LABEL_COLUMNS:
        if name in batch:
            out[name] = np.asarray(batch[name])[keep].astype(np.int64)
    return out


@functools.lru_cache(maxsize=8)
def _fallback_rng(seed: int) -> np.random.Generator:
    """Crop randomness for rows without a key: one stream per worker process and seed."""
    return np.random.default_rng([seed, os.getpid()])


@functools.lru_cache(maxsize=4)
def _tokenizer_from(tokenizer_json: str) -> CaptionTokenizer:
    """The JSON text itself (travels to remote tasks without a shared filesystem) or a path to it; built once per
    worker process (Ray reuses task processes, so this is once per run, not once per batch)."""
    if tokenizer_json.lstrip().startswith("{"):
        return CaptionTokenizer.from_json(tokenizer_json)
    return load_tokenizer(tokenizer_json)


def phase_dataset(
    ds: "ray.data.Dataset",
    *,
    image_size: int,
    text_length: int,
    tokenizer_json: str,
    train: bool,
    seed: int,
    batch_size: int = 64,
    bad_counter=None,
    num_cpus: float = DECODE_NUM_CPUS,
    concurrency: int | None = None,
) -> "ray.data.Dataset":
    """Decode + crop to ``image_size`` and tokenize to ``text_length``; columns image, tokens (+label[s])."""
    _tokenizer_from(tokenizer_json)  # fail here (driver), not inside a task, on a bad tokenizer
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "image_size": image_size,
            "text_length": text_length,
            "tokenizer_json": tokenizer_json,
            "train": train,
            "seed": seed,
            "bad_counter": bad_counter,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        concurrency=concurrency or MAX_TASKS,
    )
