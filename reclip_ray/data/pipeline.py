"""Ray Data input for the trainer: Parquet shards -> decoded, cropped, tokenized batches for one RECLIP phase.

Each phase gets its own ``phase_dataset`` over the same ``read_shards`` dataset, so switching from 64 px to 224 px
changes only the decode size, never the files. Decoding runs in a pool of actors (the tokenizer is built once per
actor) that ask for a fraction of a CPU, so on a 2-core box they fit next to the training workers. Images stay
uint8 NHWC here; normalisation happens on the training device, where it is free compared to a 4x bigger transfer.

Unusable rows (bad image, empty caption) are dropped and reported to a named ``BadRowCounter`` actor; the trainer
reads its totals, logs them and applies ``data.max_bad_fraction`` via ``check_bad_fraction``.
"""

from __future__ import annotations

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
LABEL_COLUMNS = ("label", "label_pattern")


class _BadRowCounter:
    """Totals of rows seen / dropped across all decode actors of a run (a few examples kept for the message)."""

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
    """The named counter actor of a run (created on first use), shared by the decode actors and the trainer."""
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
                passes: int = 1) -> "ray.data.Dataset":
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
        _ReadShard,
        fn_constructor_kwargs={"schema": out_schema, "missing": missing, "counter": bad_counter},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=DECODE_NUM_CPUS,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
    )
    renames = {src: dst for src, dst in columns.renames().items() if src in wanted}
    if renames:
        ds = ds.rename_columns(renames)
    return ds


class _ReadShard:
    """map_batches callable: one Parquet file name in, its rows out (the wanted columns plus ``path``)."""

    def __init__(self, schema: "pa.Schema", missing: str = "fail", counter=None) -> None:
        self.schema = schema
        self.missing = missing
        self.counter = counter

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        from reclip_ray.data.local import _read_shard
        from reclip_ray.errors import DataError

        columns = [f.name for f in self.schema if f.name != "path"]
        tables = []
        for file in batch.column("file").to_pylist():
            try:
                table = _read_shard(file, columns)
            except DataError as exc:
                if not isinstance(exc.__cause__, FileNotFoundError):
                    raise
                if self.missing != "skip":
                    raise DataError(f"shard {file} disappeared during the run (data.missing_shards=fail; "
                                    "set data.missing_shards=skip to train on without it)") from None
                print(f"[reclip] WARNING: shard {file} is gone; skipped (data.missing_shards=skip)", flush=True)
                if self.counter is not None:
                    ray.get(self.counter.add_missing.remote(file))
                continue
            table = table.append_column("path", pa.array([file] * table.num_rows, pa.string()))
            tables.append(table.select(self.schema.names).cast(self.schema))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


class DecodeBatch:
    """map_batches callable: bytes + captions -> uint8 images + int64 tokens. One tokenizer per actor."""

    def __init__(self, *, image_size: int, text_length: int, tokenizer_json: str, train: bool, seed: int,
                 bad_counter=None) -> None:
        self.image_size = image_size
        self.text_length = text_length
        self.train = train
        self.seed = seed
        self.tokenizer = _tokenizer_from(tokenizer_json)
        self.counter = bad_counter  # actor handles pickle: every decode actor reports to the same counter
        self._fallback_rng = np.random.default_rng([seed, os.getpid()])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
                if self.train:
                    rng = row_rng(self.seed, key) if key is not None else self._fallback_rng
                decoded.append(decode_image(bytes(data), self.image_size, train=self.train, rng=rng))
                keep.append(i)
            except BadImage as exc:
                bad += 1
                if len(examples) < MAX_EXAMPLES:
                    file = os.path.basename(str(paths[i])) if paths is not None else "?"
                    examples.append({"file": file, "row": None, "key": None if key is None else str(key),
                                     "reason": str(exc)})
        if self.counter is not None:
            # Wait for the ack (about a millisecond per batch): totals read right after the epoch are then complete.
            ray.get(self.counter.add.remote(n, bad, examples))
        s = self.image_size
        out = {
            "image": np.stack(decoded) if decoded else np.zeros((0, s, s, 3), np.uint8),
            "tokens": self.tokenizer.encode([str(captions[i]) for i in keep], self.text_length),
        }
        for name in LABEL_COLUMNS:
            if name in batch:
                out[name] = np.asarray(batch[name])[keep].astype(np.int64)
        return out


def _tokenizer_from(tokenizer_json: str) -> CaptionTokenizer:
    """The JSON text itself (travels to remote actors without a shared filesystem) or a path to it."""
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
    max_actors: int = 4,
) -> "ray.data.Dataset":
    """Decode + crop to ``image_size`` and tokenize to ``text_length``; columns image, tokens (+label[s])."""
    _tokenizer_from(tokenizer_json)  # fail here (driver), not inside an actor, on a bad tokenizer
    return ds.map_batches(
        DecodeBatch,
        fn_constructor_kwargs={
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
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
    )
