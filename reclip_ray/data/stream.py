"""The phase stream: which rows a phase reads, in which order, and where a restart picks it up.

A phase reads the shards as one deterministic stream of rows, fixed by the seed and the shards' footers alone:

* each pass over the data permutes the shards (seeded by pass);
* consecutive shards form *groups* of ``group_shards``; one read task streams a group, taking ``chunk_rows`` rows
  from each of its shards per *round*, so that rows of up to ``group_shards`` shards are interleaved at the
  source (a batch draws from many shards, not from the one or two that a file-by-file reader would be on);
* the rows of one round (a *unit*: at most ``group_shards * chunk_rows`` rows, a few MB of image bytes) are
  permuted by a seeded RNG, and each row gets its *position*: its index in the phase's stream.

Positions and unit numbers depend only on the footers' row counts, so a restarted run (another worker count, a
new process, a new ``fit()``) computes the same ones. That is what makes the data position checkpointable: a
checkpoint stores the first unit not known to be fully trained (the *frontier*), the whole units trained beyond
it and the positions trained in the others (``feed.DataPosition``); the restarted stream starts at the frontier's
group, skips the whole units (a group starts after those it begins with) and drops those positions before
decoding.
Cost at scale: the footers are read once per run on the driver (a thread pool; 140k shards is a few minutes of
small reads on object storage, once), and the stream is one list of groups (140k / 16 = 9k items per pass).
``footers`` keeps what each footer says for the life of the process, keyed by (path, size, mtime), so the launch's
schema check, eval-set checks, tokenizer and phase streams share that one read.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from reclip_ray.errors import DataError

FOOTER_THREADS = 32
FOOTER_PROBE = 32  # footers read one by one and timed before deciding whether threads help (``footers``)
FOOTER_IO_BOUND_S = 0.0005  # a local-disk footer parses in ~0.1 ms; object storage takes 10-50 ms per read
MAX_SCHEMAS = 64  # distinct Parquet schemas kept for reuse (``_schema_of``); more are converted per file
OK, BAD, MARKER = 1, 0, 2  # the ``_ok`` flag of a decoded row: trained, dropped as bad, a unit's end marker


@dataclass(frozen=True)
class Shard:
    """What the footer says about one Parquet file (no data read)."""

    path: str
    rows: int
    row_groups: tuple[int, ...]  # rows per row group, in file order
    absent: int = 0  # null cells in the image column (footer statistics; 0 when the writer kept none)
    copies: tuple[int, ...] = ()  # sizes of the shrunk copies the footer vouches for (``copies.footer_copies``)
    stale_copies: tuple[int, ...] = ()  # copy columns present but not vouched for: never read


def read_footers(files: Sequence[str], image_column: str = "image", threads: int = FOOTER_THREADS) -> list[Shard]:
    """Every file's footer as a ``Shard``: read at most once per process, in parallel (see ``footers``)."""
    return [f.shard(image_column) for f in footers(files, threads)]


@dataclass(frozen=True)
class Footer:
    """What one Parquet footer says, kept by ``footers`` so that no launch step reads it a second time.

    Compact on purpose: pyarrow's ``FileMetaData`` costs ~9 KiB per small file (over 1 GB for 140k shards); this
    keeps the row counts, one shared ``pyarrow.Schema`` per distinct schema, the non-zero null counts, the
    footer's ``reclip.*`` key-value entries (what ``copies.footer_copies`` reads) and the ClassLabel names of a
    Hugging Face ``datasets`` footer (one shared tuple per distinct ``huggingface`` entry: ``_class_labels``).
    """

    path: str
    rows: int
    row_groups: tuple[int, ...]  # rows per row group, in file order
    schema: Any  # pyarrow.Schema without metadata, interned: files with equal schemas share one object
    null_counts: tuple[tuple[str, int], ...] = ()  # (image-like column, nulls) from row-group statistics, nulls > 0
    reclip_metadata: tuple[tuple[bytes, bytes], ...] = ()  # the footer's key-value entries named reclip.*
    class_labels: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, class names): ``schema.hf_class_labels``

    def shard(self, image_column: str = "image") -> Shard:
        """The phase stream's view: rows, row groups, the image column's nulls (absent samples), shrunk copies."""
        from types import SimpleNamespace

        from reclip_ray.data.copies import footer_copies

        view = SimpleNamespace(schema=self.schema, metadata=dict(self.reclip_metadata), num_rows=self.rows)
        copies, stale = footer_copies(view, image_column)
        return Shard(self.path, self.rows, self.row_groups, dict(self.null_counts).get(image_column, 0), copies, stale)


# path -> ((size, mtime_ns), Footer). Process-wide on purpose: the driver's launch steps (prepare's schema check,
# the eval-set checks, the tokenizer, build_datasets) each take a file list, and this is how they share one read.
_FOOTERS: dict[str, tuple[tuple[int, int], Footer]] = {}
_LISTED: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) as the latest ``list_parquet_files`` saw it
_SCHEMAS: dict[str, list] = {}  # "entries": the distinct schemas seen (``_schema_of``)
_CLASS_LABELS: dict[bytes, tuple] = {}  # a footer's ``huggingface`` entry -> its parsed ClassLabels (``_class_labels``)
FOOTER_READS = [0]  # footers read from storage by this process (the tests count them)


def note_listing(path: str, size: int | None, mtime_ns: int | None) -> None:
    """Record a file's (size, mtime) as a listing saw it, so a cache lookup needs no stat of its own (on object
    storage a stat is a HEAD request, as slow as reading the footer)."""
    _LISTED[path] = (int(size or 0), int(mtime_ns or 0))


def clear_footer_cache() -> None:
    _FOOTERS.clear()
    _LISTED.clear()
    _SCHEMAS.clear()
    _CLASS_LABELS.clear()


def footers(files: Sequence[str], threads: int = FOOTER_THREADS) -> list[Footer]:
    """Every file's ``Footer``, in order: each read at most once per process; many in parallel when reads wait on
    storage.

    The first ``FOOTER_PROBE`` footers not cached are read one by one and timed. Slower than
    ``FOOTER_IO_BOUND_S`` each, the reads wait on storage (object storage, NFS: one small read at a time, ms
    each) and the rest go ``threads`` at a time. Faster, they are parsing on a local disk, where Python threads only
    contend for the GIL (measured here: 20,000 footers took twice as long with 32 threads as with one), so the
    rest are read in this thread too.

    A cached footer is reused while the file's (size, mtime) is unchanged: taken from the latest listing when
    ``list_parquet_files`` saw the file, else from a stat. A file rewritten in place with the same size within
    the filesystem's mtime resolution would be missed; shard writers here write a temp file and rename it.
    """
    files = list(files)
    out: list[Footer | None] = [None] * len(files)
    todo: list[int] = []
    for i, f in enumerate(files):
        hit = _FOOTERS.get(f)
        if hit is not None and _LISTED.get(f) == hit[0]:
            out[i] = hit[1]
        else:
            todo.append(i)
    import time

    t0 = time.perf_counter()
    for i in todo[:FOOTER_PROBE]:
        out[i] = _cached_footer(files[i])
    rest = todo[FOOTER_PROBE:]
    io_bound = (time.perf_counter() - t0) / max(1, min(FOOTER_PROBE, len(todo))) > FOOTER_IO_BOUND_S
    if rest and io_bound and threads > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(rest))) as pool:
            for i, footer in zip(rest, pool.map(lambda i: _cached_footer(files[i]), rest)):
                out[i] = footer
    else:
        for i in rest:
            out[i] = _cached_footer(files[i])
    return out  # type: ignore[return-value]


def _cached_footer(file: str) -> Footer:
    import pyarrow.fs as pafs

    from reclip_ray.data.schema import _filesystem

    stamp = _LISTED.get(file)
    if stamp is None:
        fs, inner = _filesystem(file)
        try:
            info = fs.get_file_info(inner)
        except Exception as exc:
            raise DataError(f"{file}: cannot read ({exc})") from exc
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{file}: shard not found")
        stamp = (int(info.size or 0), int(info.mtime_ns or 0))
    hit = _FOOTERS.get(file)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    footer = _footer(file)
    _FOOTERS[file] = (stamp, footer)
    return footer


def _footer(file: str) -> Footer:
    import pyarrow.parquet as pq

    from reclip_ray.data.schema import _filesystem

    fs, inner = _filesystem(file)
    try:
        with fs.open_input_file(inner) as fh:
            meta = pq.ParquetFile(fh).metadata
            kv = meta.metadata or {}
            schema, binary_leaves = _schema_of(meta)
    except FileNotFoundError:
        raise DataError(f"{file}: shard not found") from None
    except Exception as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from exc
    FOOTER_READS[0] += 1
    nulls = dict.fromkeys(binary_leaves, 0)
    groups = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        groups.append(rg.num_rows)
        for c, path in binary_leaves.items():
            stats = rg.column(c).statistics
            if stats is not None and stats.has_null_count:
                nulls[c] += stats.null_count
    ours = tuple(sorted((k, v) for k, v in kv.items() if k.startswith(b"reclip.")))
    return Footer(file, meta.num_rows, tuple(groups), schema,
                  tuple((binary_leaves[c], n) for c, n in nulls.items() if n), ours,
                  _class_labels(kv.get(b"huggingface")))


def _class_labels(raw: bytes | None) -> tuple:
    """The ClassLabels of a ``huggingface`` footer entry, parsed once per distinct entry: the shards of one dataset
    share the entry, so 140k footers keep one tuple between them (a pointer each), not 140k copies of the JSON."""
    if not raw:
        return ()
    hit = _CLASS_LABELS.get(raw)
    if hit is None:
        from reclip_ray.data.schema import hf_class_labels

        hit = hf_class_labels(raw)
        if len(_CLASS_LABELS) < MAX_SCHEMAS:
            _CLASS_LABELS[raw] = hit
    return hit


def _schema_of(meta: Any) -> tuple[Any, dict[int, str]]:
    """(Arrow schema without metadata, {leaf index: column} of the image-like columns) of a footer, computed once
    per distinct Parquet schema: most datasets have one, and converting it for each of 140k footers is a fifth of
    the read. Null counts are kept for the candidate image columns only (absent samples): binary columns, and the
    ``bytes`` leaf of a Hugging Face Image struct, counted under the struct's name (a Parquet leaf's null count
    includes the rows where its parent struct is null, so it counts both ways ``datasets`` leaves an image out).

    Files with equal Parquet schemas share the first one's Arrow schema. Their own ``ARROW:schema`` metadata could
    differ in detail (string vs large_string, say), which no reader here distinguishes; it is not part of the
    key because img2dataset's pandas metadata (in it) differs in every file. Parquet's schema equality compares
    leaf names only (``img.bytes`` equals ``image.bytes``), so the paths of nested leaves are compared too (~2 us
    a leaf: 4 us for a Hugging Face Image struct; flat schemas, whose leaf names are their paths, have none).
    """
    entries = _SCHEMAS.setdefault("entries", [])
    for parquet_schema, nested, arrow, leaves in entries:
        if parquet_schema.equals(meta.schema) and all(meta.schema.column(c).path == p for c, p in nested):
            return arrow, leaves
    import pyarrow as pa

    from reclip_ray.data.schema import HF_IMAGE_FIELD, is_image_type

    arrow = meta.schema.to_arrow_schema().remove_metadata()
    images = {f.name for f in arrow if is_image_type(f.type)}
    binary = {f.name for f in arrow if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    leaf_of = {name: name for name in binary} | {f"{name}.{HF_IMAGE_FIELD}": name for name in images - binary}
    leaves = {c: leaf_of[meta.schema.column(c).path] for c in range(meta.num_columns)
              if meta.schema.column(c).path in leaf_of}
    if len(entries) < MAX_SCHEMAS:
        nested = tuple((c, meta.schema.column(c).path) for c in range(meta.num_columns)
                       if "." in meta.schema.column(c).path)
        entries.append((meta.schema, nested, arrow, leaves))
    return arrow, leaves


@dataclass(frozen=True)
class Group:
    """Shards one read task streams together, and where their rows sit in the phase's stream."""

    pass_index: int
    index: int  # within the phase, across passes
    files: tuple[str, ...]
    rows: tuple[int, ...]
    row_groups: tuple[tuple[int, ...], ...]
    first_unit: int
    first_pos: int
    chunk_rows: int
    sources: tuple[str, ...] = ()  # the image column to read per shard ("" or absent: the configured one)

    @property
    def num_units(self) -> int:
        return len(self.unit_sizes())

    def unit_sizes(self) -> list[int]:
        return unit_sizes(self.rows, self.chunk_rows)

    @property
    def num_rows(self) -> int:
        return sum(self.rows)


class PhaseStream:
    """The ordered groups of one phase (``passes`` passes over ``shards``)."""

    def __init__(self, shards: Sequence[Shard], *, seed: int, passes: int, group_shards: int = 16,
                 chunk_rows: int = 64, shuffle: bool = True, sources: dict[str, str] | None = None) -> None:
        if group_shards < 1 or chunk_rows < 1:
            raise ValueError("group_shards and chunk_rows must be >= 1")
        self.seed = int(seed)
        self.chunk_rows = int(chunk_rows)
        self.groups: list[Group] = []
        unit = pos = 0
        shards = [s for s in shards if s.rows > 0]
        for p in range(passes):
            order = (np.random.default_rng([self.seed & 0xFFFFFFFF, p]).permutation(len(shards))
                     if shuffle else np.arange(len(shards)))
            for start in range(0, len(order), group_shards):
                members = [shards[i] for i in order[start : start + group_shards]]
                g = Group(p, len(self.groups), tuple(s.path for s in members), tuple(s.rows for s in members),
                          tuple(s.row_groups for s in members), unit, pos, self.chunk_rows,
                          tuple((sources or {}).get(s.path, "") for s in members))
                self.groups.append(g)
                unit += g.num_units
                pos += g.num_rows
        self.total_units = unit
        self.total_rows = pos

    def items(self, frontier: int = 0, done: Iterable[int] = (), units: Iterable[int] = ()) -> list[dict]:
        """One read item per group that still has untrained rows: ``frontier`` is the first unit not known to be
        trained, ``units`` the whole units trained beyond it (never emitted: a group starts after those it begins
        with, and reads past the others without decoding them) and ``done`` the positions trained in the units
        that are not whole (dropped before decoding)."""
        done_arr = np.unique(np.asarray(list(done), dtype=np.int64))
        whole = np.unique(np.asarray(list(units), dtype=np.int64))
        out = []
        for g in self.groups:
            end_unit = g.first_unit + g.num_units
            if end_unit <= frontier:
                continue
            start = max(0, frontier - g.first_unit)
            lo, hi = np.searchsorted(whole, [g.first_unit + start, end_unit])
            rounds = whole[lo:hi] - g.first_unit
            at = rounds == np.arange(start, start + len(rounds))  # True for the whole units the group starts with
            lead = len(at) if at.all() else int(np.argmin(at))
            start, skip = start + lead, rounds[lead:].tolist()
            if start >= g.num_units:
                continue
            end = g.first_pos + g.num_rows
            lo, hi = np.searchsorted(done_arr, [g.first_pos, end])
            out.append({
                "pass_index": g.pass_index, "group": g.index, "files": list(g.files), "rows": list(g.rows),
                "row_groups": [list(r) for r in g.row_groups], "first_unit": g.first_unit,
                "first_pos": g.first_pos, "start_round": start, "skip_rounds": skip,
                "sources": list(g.sources) or [""] * len(g.files),
                "done": done_arr[lo:hi].tolist(),
            })
        return out


def rows_in_round(rows: int, round_index: int, chunk_rows: int) -> int:
    """How many of a shard's ``rows`` fall in round ``round_index`` (its rows [k * chunk, (k + 1) * chunk))."""
    return min(chunk_rows, max(0, rows - round_index * chunk_rows))


def unit_sizes(rows: Sequence[int], chunk_rows: int) -> list[int]:
    """Rows per unit (round) of a group whose shards hold ``rows``: the group's rounds in order."""
    rounds = math.ceil(max(rows, default=0) / chunk_rows)
    return [sum(rows_in_round(n, k, chunk_rows) for n in rows) for k in range(rounds)]


def unit_permutation(seed: int, pass_index: int, group_index: int, round_index: int, size: int) -> np.ndarray:
    """The order of one unit's rows in the stream: a function of (seed, pass, group, round) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, pass_index, group_index, round_index]).permutation(size)


def rows_to_skip(row_groups: Sequence[int], skip: int) -> tuple[list[int], int]:
    """(row groups to read, rows to drop from the first of them) to start a file at row ``skip`` without reading
    the row groups before it."""
    start = 0
    for i, n in enumerate(row_groups):
        if skip < start + n:
            return list(range(i, len(row_groups))), skip - start
        start += n
    return [], 0

