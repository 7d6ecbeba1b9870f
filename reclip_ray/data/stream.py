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
checkpoint stores the first unit not known to be fully trained (the *frontier*) and the positions already
trained beyond it; the restarted stream starts at the frontier's group and drops those positions before decoding.
Cost at scale: the footers are read once per run on the driver (a thread pool; 140k shards is a few minutes of
small reads on object storage, once), and the stream is one list of groups (140k / 16 = 9k items per pass).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from reclip_ray.errors import DataError

FOOTER_THREADS = 32
OK, BAD, MARKER = 1, 0, 2  # the ``_ok`` flag of a decoded row: trained, dropped as bad, a unit's end marker


@dataclass(frozen=True)
class Shard:
    """What the footer says about one Parquet file (no data read)."""

    path: str
    rows: int
    row_groups: tuple[int, ...]  # rows per row group, in file order
    absent: int = 0  # null cells in the image column (footer statistics; 0 when the writer kept none)


def read_footers(files: Sequence[str], image_column: str = "image", threads: int = FOOTER_THREADS) -> list[Shard]:
    """Every file's footer, read once and in parallel (object storage answers one small read at a time)."""
    if not files:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return list(pool.map(lambda f: _footer(f, image_column), files))


def _footer(file: str, image_column: str) -> Shard:
    import pyarrow.parquet as pq

    from reclip_ray.data.schema import _filesystem

    fs, inner = _filesystem(file)
    try:
        with fs.open_input_file(inner) as fh:
            meta = pq.ParquetFile(fh).metadata
    except FileNotFoundError:
        raise DataError(f"{file}: shard not found") from None
    except Exception as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from exc
    column = None
    for i in range(meta.num_columns):
        if meta.schema.column(i).path == image_column:
            column = i
    absent = 0
    groups = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        groups.append(rg.num_rows)
        if column is not None:
            stats = rg.column(column).statistics
            if stats is not None and stats.has_null_count:
                absent += stats.null_count
    return Shard(file, meta.num_rows, tuple(groups), absent)


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
                 chunk_rows: int = 64, shuffle: bool = True) -> None:
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
                          tuple(s.row_groups for s in members), unit, pos, self.chunk_rows)
                self.groups.append(g)
                unit += g.num_units
                pos += g.num_rows
        self.total_units = unit
        self.total_rows = pos

    def items(self, frontier: int = 0, done: Iterable[int] = ()) -> list[dict]:
        """One read item per group that still has untrained rows: ``frontier`` is the first unit not known to be
        trained, ``done`` the positions trained beyond it (they are dropped before decoding)."""
        done_arr = np.unique(np.asarray(list(done), dtype=np.int64))
        out = []
        for g in self.groups:
            if g.first_unit + g.num_units <= frontier:
                continue
            end = g.first_pos + g.num_rows
            lo, hi = np.searchsorted(done_arr, [g.first_pos, end])
            out.append({
                "pass_index": g.pass_index, "group": g.index, "files": list(g.files), "rows": list(g.rows),
                "row_groups": [list(r) for r in g.row_groups], "first_unit": g.first_unit,
                "first_pos": g.first_pos, "start_round": max(0, frontier - g.first_unit),
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

