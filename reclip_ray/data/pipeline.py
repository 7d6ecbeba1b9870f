"""Ray Data input for the trainer: the phase stream (``stream.PhaseStream``) -> decoded, cropped, tokenized rows.

One read task streams one group of shards (``stream.Group``): it opens each shard once, takes ``chunk_rows`` rows
from each per round, permutes the round's rows with the unit's seeded RNG and yields them, so memory per task is
one unit of raw bytes (``group_shards * chunk_rows`` rows, e.g. 16 x 64 rows of ~30 KB JPEGs = 30 MB) whatever the
shard size. Reading and decoding are plain functions run by one map (``read_and_decode``) that Ray Data fuses with
the group's read task (``ItemsDatasource``): one task per group. The tasks ask for a fraction of a CPU (so on a
2-core box they fit next to the training workers), and the tokenizer is built once per Ray worker process.

Only the columns a phase needs travel to the workers: the decoded image (uint8 NHWC; normalised on the training
device, where it is free compared to a 4x bigger transfer), the tokens, and the row's stream bookkeeping
(``_pos``, ``_unit``, ``_unit_rows``, ``_unit_absent``, ``_ok``, ``_bad``). Any other column of the shards, of any
name and type, is never read.

Three kinds of rows that are not trained:
* *absent* rows (a null image, or an img2dataset ``status`` of ``failed_to_...``: failed downloads) are not
  samples. They are dropped before decoding and counted per unit (``_unit_absent``), never as bad rows;
* *bad* rows (undecodable image, empty caption) travel on as ``_ok = 0`` with a blank image and the reason in
  ``_bad``, so the worker counts them, applies ``data.max_bad_fraction`` and marks their position as done;
* a unit with nothing left to emit (all absent, or all its rows among a restart's done positions) sends one
  *marker* row (``_ok = 2``) so the worker can still mark the unit done. A unit the restart's position holds as
  whole sends nothing: the workers' position already says it is done.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import ray

from reclip_ray import storage
from reclip_ray.data.images import BadImage, decode_image
from reclip_ray.data.local import row_rng
from reclip_ray.data.schema import STATUS_COLUMN, ColumnMap, absent_mask, image_bytes
from reclip_ray.data.stream import (BAD, MARKER, OK, PhaseStream, rows_in_round, rows_to_skip, unit_permutation,
                                   unit_sizes)
from reclip_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from reclip_ray.errors import DataError
from reclip_ray.run_names import row_bytes

if TYPE_CHECKING:
    import pyarrow as pa

DECODE_NUM_CPUS = 0.25
MAX_TASKS = 4  # default cap per stage: fractional-CPU tasks are otherwise started by the dozen on a small box
READ_BUFFER_BYTES = 1 << 20  # per open shard: 1 MB reads (object storage handles those well); bounds memory


class _MissingShards:
    """Shards that disappeared during a run with ``data.missing_shards=skip`` (rare: one call per lost shard)."""

    def __init__(self) -> None:
        self._missing: list[str] = []

    def add(self, file: str) -> None:
        if file not in self._missing:
            self._missing.append(file)

    def missing(self) -> list[str]:
        return list(self._missing)


MissingShards = ray.remote(num_cpus=0, max_restarts=-1)(_MissingShards)


MISSING_COUNT_TIMEOUT_S = 10.0  # rank 0's wait for the count in a log window (missing_shard_count)


def missing_shard_count(actor: Any, timeout_s: float = MISSING_COUNT_TIMEOUT_S) -> int | None:
    """How many shards the run skipped so far, for rank 0's log window; None when the actor does not answer in
    ``timeout_s`` (restarting after its node died: it forgets its list then) or is gone, so a slow bookkeeping
    actor never holds the training step, which every other rank waits on at the next collective."""
    try:
        return len(ray.get(actor.missing.remote(), timeout=timeout_s))
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None


def get_or_create_missing_shards(name: str, namespace: str | None = None):
    """The named actor of a run that remembers skipped shards (created on first use)."""
    opts: dict[str, Any] = {"name": name, "get_if_exists": True}
    if namespace is not None:
        opts["namespace"] = namespace
    return MissingShards.options(**opts).remote()


# ------------------------------------------------------------------------------------------------ reading


def _read_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([
        ("image", pa.binary()), ("caption", pa.string()), ("key", pa.string()), ("_pass", pa.int32()),
        ("_pos", pa.int64()), ("_unit", pa.int64()), ("_unit_rows", pa.int32()), ("_unit_absent", pa.int32()),
        ("_marker", pa.bool_()), ("_file", pa.string()), ("_row", pa.int64()),
    ])


class _ShardChunks:
    """Consecutive ``chunk`` -row slices of one shard's needed columns, read batch by batch (bounded memory)."""

    def __init__(self, file: str, row_groups: Sequence[int], chunk: int, start_row: int, columns: ColumnMap,
                 missing: str, on_missing) -> None:
        self.file, self.chunk, self.row, self.columns = file, chunk, start_row, columns
        self._buffer: list = []
        self._buffered = 0
        self._batches = self._open(row_groups, start_row, columns, missing, on_missing)

    def _open(self, row_groups, start_row, columns, missing, on_missing) -> Iterator:
        import pyarrow.parquet as pq

        groups, drop = rows_to_skip(row_groups, start_row)
        if not groups:
            return iter(())
        fs, inner = storage.filesystem(self.file)
        try:
            fh = fs.open_input_file(inner)
        except FileNotFoundError:
            if missing != "skip":
                raise DataError(f"shard {self.file} disappeared during the run (data.missing_shards=fail; "
                                "set data.missing_shards=skip to train on without it)") from None
            print(f"[reclip] WARNING: shard {self.file} is gone; skipped (data.missing_shards=skip)", flush=True)
            on_missing(self.file)
            return iter(())
        # Buffered, page-by-page reading: only about one page (~64 images in shards we write) plus one chunk is held
        # per open shard. The default pre-buffered read fetches whole column chunks at once: a shard written as one
        # row group of 10k web images (img2dataset's layout) would put ~300 MB per shard in memory.
        pf = pq.ParquetFile(fh, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        names = pf.schema_arrow.names
        wanted = [c for c in (columns.image, columns.caption, columns.key, STATUS_COLUMN) if c in names]
        batches = pf.iter_batches(batch_size=self.chunk, row_groups=groups, columns=list(dict.fromkeys(wanted)),
                                  use_threads=False)
        if drop:
            batches = _drop_rows(batches, drop)
        return batches

    def next(self):
        """The next slice (a pyarrow Table of up to ``chunk`` rows) and its first row number, or None at the end."""
        import pyarrow as pa

        while self._buffered < self.chunk:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._buffer.append(batch)
            self._buffered += batch.num_rows
        if not self._buffered:
            return None
        table = pa.Table.from_batches(self._buffer)
        head, rest = table.slice(0, self.chunk), table.slice(self.chunk)
        self._buffer = rest.to_batches() if rest.num_rows else []
        self._buffered = rest.num_rows
        first = self.row
        self.row += head.num_rows
        return head, first


def _read_past(reader: _ShardChunks, expected: int) -> None:
    """Move a shard's reader over one round without using its rows (a unit trained before a restart)."""
    got = reader.next() if expected else None
    if got is not None and got[0].num_rows != expected:
        raise DataError(f"{reader.file}: {got[0].num_rows} rows at row {got[1]}, the footer says {expected} (the "
                        "shard changed during the run?)")


def _drop_rows(batches: Iterator, n: int) -> Iterator:
    for batch in batches:
        if n >= batch.num_rows:
            n -= batch.num_rows
            continue
        yield batch.slice(n) if n else batch
        n = 0


def _canonical(table: "pa.Table", columns: ColumnMap, file: str, first_row: int) -> "pa.Table":
    """The slice with canonical column names and types (shards may store int keys, large_binary, Hugging Face's
    Image struct, ...)."""
    import pyarrow as pa

    n = table.num_rows
    names = table.column_names
    image = image_bytes(table.column(columns.image)).cast(pa.binary())
    caption = table.column(columns.caption).cast(pa.string()) if columns.caption in names else pa.nulls(n, pa.string())
    if columns.key in names:
        key = table.column(columns.key).cast(pa.string())
    else:
        base = os.path.basename(file)
        key = pa.array([f"{base}#{first_row + i}" for i in range(n)], pa.string())
    return pa.table({"image": image, "caption": caption, "key": key,
                     "_file": pa.array([file] * n, pa.string()),
                     "_row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64))})


def _placeholder(n: int, file: str, first_row: int) -> "pa.Table":
    import pyarrow as pa

    return pa.table({"image": pa.nulls(n, pa.binary()), "caption": pa.nulls(n, pa.string()),
                     "key": pa.array([""] * n), "_file": pa.array([file] * n),
                     "_row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
                     "_absent": pa.array(np.ones(n, dtype=bool))})


def read_groups(items: "pa.Table", *, columns: ColumnMap, chunk_rows: int, seed: int, missing: str = "fail",
                missing_actor=None) -> Iterator["pa.Table"]:
    """map_batches generator: one stream group in, one table per unit out (its rows in stream order)."""
    schema = _read_schema()

    def on_missing(file: str) -> None:
        if missing_actor is not None:
            ray.get(missing_actor.add.remote(file))

    for item in items.to_pylist():
        rows, start = item["rows"], item["start_round"]
        done = np.asarray(item["done"], dtype=np.int64)
        skip = set(item.get("skip_rounds") or ())  # whole units trained before a restart: read past, not emitted
        readers = _group_readers(item, columns, chunk_rows, missing, on_missing)
        sizes = unit_sizes(rows, chunk_rows)
        unit_pos = item["first_pos"] + sum(sizes[:start])
        for k in range(start, len(sizes)):
            if k in skip:
                for reader, n in zip(readers, rows):
                    _read_past(reader, rows_in_round(n, k, chunk_rows))
            else:
                parts = _read_round(readers, rows, k, chunk_rows)
                yield _unit_table(parts, item, k, unit_pos, sizes[k], seed, done).select(schema.names).cast(schema)
            unit_pos += sizes[k]


def _group_readers(item: dict, columns: ColumnMap, chunk_rows: int, missing: str, on_missing) -> list[_ShardChunks]:
    """One reader per shard of the group, at the group's first round to read, each on the column the phase chose
    for that shard (a shrunk copy, or the full image)."""
    files = item["files"]
    shard_columns = [dataclasses.replace(columns, image=src) if src else columns
                     for src in item.get("sources") or [""] * len(files)]
    start_row = item["start_round"] * chunk_rows
    return [_ShardChunks(f, rg, chunk_rows, start_row, cols, missing, on_missing)
            for f, rg, cols in zip(files, item["row_groups"], shard_columns)]


def _read_round(readers: list[_ShardChunks], rows: Sequence[int], k: int, chunk_rows: int) -> list["pa.Table"]:
    """Round ``k``'s rows of every shard in canonical columns, with ``_absent``; a skipped missing shard keeps its
    positions as absent rows, so the other shards' stay put."""
    import pyarrow as pa

    parts = []
    for reader, n in zip(readers, rows):
        expected = rows_in_round(n, k, chunk_rows)
        got = reader.next() if expected else None
        if got is not None:
            parts.append(_canonical(got[0], reader.columns, reader.file, got[1]).append_column(
                "_absent", pa.array(absent_mask(got[0], reader.columns.image, STATUS_COLUMN))))
            if got[0].num_rows != expected:
                raise DataError(f"{reader.file}: {got[0].num_rows} rows at row {got[1]}, the footer says "
                                f"{expected} (the shard changed during the run?)")
        elif expected:
            parts.append(_placeholder(expected, reader.file, k * chunk_rows))
    return parts


def _unit_table(parts: list["pa.Table"], item: dict, k: int, unit_pos: int, size: int, seed: int,
                done: np.ndarray) -> "pa.Table":
    """The unit's rows in stream order (the unit's seeded permutation), less the absent ones and the positions a
    restart holds as done, with the stream bookkeeping; one marker row when nothing is left to train."""
    import pyarrow as pa

    perm = unit_permutation(seed, item["pass_index"], item["group"], k, size)
    positions = unit_pos + np.arange(size, dtype=np.int64)
    table = pa.concat_tables(parts)  # no copy: the unit's rows are gathered once, by the take below
    is_absent = np.asarray(table.column("_absent").to_numpy(zero_copy_only=False), dtype=bool)[perm]
    absent = int(is_absent.sum())
    keep = ~is_absent
    table = table.drop_columns(["_absent"])
    if done.size:
        keep &= ~np.isin(positions, done)
    emitted = int(keep.sum())
    if emitted:
        out = table.take(pa.array(perm[keep]))
        n, pos = emitted, positions[keep]
        marker = np.zeros(n, dtype=bool)
    else:  # nothing to train here: one marker row lets the workers mark the unit done
        out = pa.table({"image": pa.nulls(1, pa.binary()), "caption": pa.nulls(1, pa.string()),
                        "key": pa.array([""]), "_file": pa.array([item["files"][0]]), "_row": pa.array([-1])})
        n, pos, marker = 1, np.asarray([-1], dtype=np.int64), np.ones(1, dtype=bool)
    out = out.append_column("_pass", pa.array(np.full(n, item["pass_index"], np.int32)))
    out = out.append_column("_pos", pa.array(pos))
    out = out.append_column("_unit", pa.array(np.full(n, item["first_unit"] + k, np.int64)))
    out = out.append_column("_unit_rows", pa.array(np.full(n, n, np.int32)))
    out = out.append_column("_unit_absent", pa.array(np.full(n, absent, np.int32)))
    return out.append_column("_marker", pa.array(marker))


# ------------------------------------------------------------------------------------------------ decoding


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, text_length: int, tokenizer_json: str,
                 train: bool, seed: int, keep_keys: bool = False, on_device: bool = False) -> dict[str, np.ndarray]:
    """map_batches function: bytes + captions -> uint8 images + int64 tokens; bad rows flagged, not dropped.

    ``on_device`` (``data.decode_device=cuda``): JPEG bytes + crop boxes (``jpeg``, ``box``) instead of ``image``,
    for ``device_decode.decode_on_device`` on the training device; see that module for what stays on the CPU."""
    tokenizer = _tokenizer_from(tokenizer_json)
    images, captions, keys = batch["image"], batch["caption"], batch["key"]
    markers, passes = batch["_marker"], batch["_pass"]
    n = len(images)
    s = image_size
    pixels = np.zeros((0 if on_device else n, s, s, 3), np.uint8)
    jpegs = np.full(n, b"", dtype=object) if on_device else None
    boxes = np.zeros((n, 4), np.float32) if on_device else None
    ok = np.full(n, OK, np.int8)
    bad = np.full(n, "", dtype=object)
    texts = [""] * n
    for i in range(n):
        if markers[i]:
            ok[i] = MARKER
            continue
        caption = captions[i]
        try:
            if caption is None or not str(caption).strip():
                raise BadImage("empty caption")
            rng = row_rng(seed, keys[i], int(passes[i])) if train else None
            if on_device:
                jpegs[i], boxes[i] = _for_device(bytes(images[i]), image_size, train, rng,
                                                 lambda: row_rng(seed, keys[i], int(passes[i])) if train else None)
            else:
                pixels[i] = decode_image(bytes(images[i]), image_size, train=train, rng=rng)
            texts[i] = str(caption)
        except BadImage as exc:
            ok[i] = BAD
            bad[i] = f"{os.path.basename(str(batch['_file'][i]))} row {int(batch['_row'][i])} key={keys[i]}: {exc}"
    out = {
        **({"jpeg": jpegs, "box": boxes} if on_device else {"image": pixels}),
        "tokens": tokenizer.encode(texts, text_length),
        "_ok": ok,
        "_bad": bad,
        "_pos": np.asarray(batch["_pos"], np.int64),
        "_unit": np.asarray(batch["_unit"], np.int64),
        "_unit_rows": np.asarray(batch["_unit_rows"], np.int32),
        "_unit_absent": np.asarray(batch["_unit_absent"], np.int32),
    }
    if keep_keys:
        out["key"] = np.asarray(keys, dtype=object)
        out["_pass"] = np.asarray(passes, np.int32)
    return out


def _for_device(data: bytes, size: int, train: bool, rng: Any, fresh_rng) -> tuple[bytes, np.ndarray]:
    """A JPEG goes to the device as it is, with its crop box; any other format is decoded here (with the row's RNG
    drawn afresh, so the crop is the one ``decode_image`` gives) and sent as a re-encoded JPEG of the crop."""
    from reclip_ray.data.device_decode import encode_for_device
    from reclip_ray.data.images import plan_crop

    fmt, box = plan_crop(data, train=train, rng=rng)
    if fmt == "JPEG":
        return data, np.asarray(box, dtype=np.float32)
    return encode_for_device(decode_image(data, size, train=train, rng=fresh_rng()))


@functools.lru_cache(maxsize=4)
def _tokenizer_from(tokenizer_json: str) -> CaptionTokenizer:
    """The JSON text itself (travels to remote tasks without a shared filesystem) or a path to it; built once per
    worker process (Ray reuses task processes, so this is once per run, not once per batch)."""
    if tokenizer_json.lstrip().startswith("{"):
        return CaptionTokenizer.from_json(tokenizer_json)
    return load_tokenizer(tokenizer_json)


class ItemsDatasource(ray.data.Datasource):
    """A phase's read items as a Ray Data source: one read task per item, holding only its item, which it yields as a
    one-row table (to ``read_and_decode``, fused into the same task).

    Why not ``ray.data.from_items``: it builds and ``ray.put`` s one block per item when the dataset is made, ~1.5 ms
    of Ray Train's controller per item for every phase at every worker-group start (BENCHMARKS.md, "A phase's
    dataset at each restart"). Making this one only lists the read tasks; Ray Data puts each (~1.4 KB) when the
    phase's execution starts, in the split coordinator of the phase being read (~0.7 ms an item there)."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list["ray.data.ReadTask"]:
        from ray.data.block import BlockMetadata

        meta = BlockMetadata(num_rows=1, size_bytes=None, input_files=None, exec_stats=None)
        return [ray.data.ReadTask(functools.partial(_item_table, item), meta, per_task_row_limit=per_task_row_limit)
                for item in self.items]


def _item_table(item: dict) -> list["pa.Table"]:
    import pyarrow as pa

    return [pa.Table.from_pylist([item])]


def read_and_decode(items: "pa.Table", *, read: dict, decode: dict, batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """map_batches generator: a read item in, its rows out decoded ``batch_rows`` at a time (``read_groups``'
    units, batched across units, each batch through ``decode_batch``).

    One function, not ``map_batches(read_groups)`` then ``map_batches(decode_batch, batch_size=...)``: Ray Data
    fuses a read only into a map that takes its blocks whole, and a map that asks for a batch size bundles that
    many input rows, read items here, into one task."""
    for batch in _rebatch(read_groups(items, **read), batch_rows):
        yield decode_batch({name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names},
                           **decode)


def _rebatch(tables: Iterator["pa.Table"], rows: int) -> Iterator["pa.Table"]:
    """The rows of ``tables``, in order, in tables of ``rows`` rows (the last one fewer)."""
    import pyarrow as pa

    held: list["pa.Table"] = []
    count = 0
    for table in tables:
        held.append(table)
        count += table.num_rows
        while count >= rows:
            joined = pa.concat_tables(held)
            yield joined.slice(0, rows)
            held, count = [joined.slice(rows)], count - rows
    if count:
        yield pa.concat_tables(held)


def phase_dataset(
    stream: PhaseStream,
    columns: ColumnMap,
    *,
    image_size: int,
    text_length: int,
    tokenizer_json: str,
    train: bool = True,
    frontier: int = 0,
    done: Sequence[int] = (),
    units: Sequence[int] = (),
    decode_batch_size: int = 64,
    missing: str = "fail",
    missing_actor=None,
    concurrency: int | None = None,
    num_cpus: float = DECODE_NUM_CPUS,
    keep_keys: bool = False,
    on_device: bool = False,
) -> "ray.data.Dataset":
    """The rows of ``stream`` not yet trained (units from ``frontier`` on, minus the whole ``units`` and the
    ``done`` positions: a ``feed.DataPosition``), decoded to ``image_size`` and tokenized to ``text_length``. Lazy:
    nothing runs until a worker iterates."""
    _tokenizer_from(tokenizer_json)  # fail here (driver), not inside a task, on a bad tokenizer
    items = stream.items(frontier, done, units)
    if not items:
        raise DataError("the phase's data stream is exhausted at its checkpointed position")
    concurrency = min(concurrency or MAX_TASKS, len(items))  # no more tasks than inputs (Ray Data warns otherwise)
    # One task per read item: as many read tasks as items whatever the cluster's size (Ray Data splits or merges
    # them otherwise), fused with the map (same strategy and CPUs), which takes each item whole
    ds = ray.data.read_datasource(ItemsDatasource(items), override_num_blocks=len(items), num_cpus=num_cpus,
                                  compute=ray.data.TaskPoolStrategy(size=concurrency))
    # One decode batch is one block (``run_names.block_rows`` sizes it): Ray Data would coalesce the decoded batches
    # into blocks of up to 128 MB (a whole group, thousands of rows), and the split hands out whole blocks, so
    # bounded blocks keep the ranks' shares interleaved in stream order.
    per_row = row_bytes(image_size, on_device) + 9 * text_length + 64  # the image, the tokens, the bookkeeping
    ds.context.target_max_block_size = max(1 << 16, int(1.1 * decode_batch_size * per_row))
    # Ray Data's progress bars, drawn by every rank (or split coordinator) for every phase, are cursor codes in the
    # job's log and break up the trainer's own lines, which already say samples/s and data wait
    ds.context.enable_progress_bars = False
    # Our errors in a task (a shard gone with missing_shards=fail, one replaced mid-run) reach the worker as
    # themselves, which it records as deterministic: the run ends at once, not after run.max_failures restarts
    # that fail at the same shard. Ray Data wraps what a map function raises in its UserCodeException, which keeps
    # ours only as text; it leaves a generator's errors alone (read_and_decode is one), and with this a plain
    # function's too
    ds.context.raise_original_map_exception = True
    read = {"columns": columns, "chunk_rows": stream.chunk_rows, "seed": stream.seed, "missing": missing,
            "missing_actor": missing_actor}
    decode = {"image_size": image_size, "text_length": text_length, "tokenizer_json": tokenizer_json, "train": train,
              "seed": stream.seed, "keep_keys": keep_keys, "on_device": on_device}
    return ds.map_batches(read_and_decode, fn_kwargs={"read": read, "decode": decode, "batch_rows": decode_batch_size},
                          batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                          compute=ray.data.TaskPoolStrategy(size=concurrency))
