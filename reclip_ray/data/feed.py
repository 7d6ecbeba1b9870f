"""A worker's side of the phase stream: a row-level shuffle buffer, exact batch sizes, and the data position.

Rows arrive from Ray Data in blocks of one shard group each (``pipeline.phase_dataset``). ``PhaseFeed`` keeps up
to ``buffer_rows`` of them, serves each batch from a random permutation of the buffer (a window shuffle: rows
left when a window runs low are shuffled into the next one, so a row waits about one buffer fill on average and
the data position below stays small), and records which stream positions
it has trained, dropped as bad, or seen as a unit's end marker.

The data position is what a restart needs to continue exactly where the last checkpoint was. At every checkpoint
the ranks exchange, in two all-gathers, their counts per unit since the last one (``report`` / ``merge``: a unit
is done once its rows trained, dropped as bad or marked reach the rows its read task emitted), then the positions
they recorded in units still not done (``pending`` / ``agree``). They agree on the *frontier* (the first unit of
``stream.PhaseStream`` not done), the *whole* units done beyond it, and the positions done in units not done.
Everything before the frontier is trained, the rebuilt stream skips the whole units and drops the done positions,
and what was in a buffer or in flight is read again.

Size: with ``data.read_parallelism`` groups read side by side, done units pile up beyond the frontier until the
frontier's group finishes; they are kept as unit numbers (ranges in ``meta.json``), and positions only for the
units with rows in flight. The position takes at most

    120 + (2 D_u + 2) (P + G) + (D_u + D_p + 12 + 4 ceil(ceil(U / 8) / 3)) P   bytes of meta.json

G: read tasks in flight; P: units read and not done at the checkpoint; U = group_shards x chunk_rows, the most
rows of a unit (its bitmap's bits); D_u, D_p: the digits of the largest unit and position (derived in
``benchmarks/data_position.py``, ``position_bound``). With U = 1,024, D_u = 8, D_p = 11 that is 120 + 18 G + 221 P.
Each unit in P has a row in flight (a rank's buffer or prefetch, Ray Data's queue), and a window is trained down to
less than a batch before the next fill, so P is about the rows in flight over U, times 1.3 to 2: measured
P = 479-717 and 88-135 KB for 64 ranks with 5,120-row buffers, 64 read tasks and 64-row blocks; 644-1,181 and
106-212 KB with ``data.block_mb``'s 682-row blocks at 64 px (``BENCHMARKS.md``, "Data position at cluster scale").
The earlier position, every done position beyond the frontier, grew to 7.9 million positions (213 MB) there. The
exchange: the counts are three dicts per rank over the units it touched since the last checkpoint (about its rows
/ the rows per block, ``run_names.block_rows``), the positions a few hundred per unit in flight; 2.7-8.3 MB
gathered in all per checkpoint every 2M samples (7.8-12.7 MB with 682-row blocks), 9.4 MB every 10M, and a merge
of 0.02-0.13 s per rank (the earlier exchange, every position trained since the last checkpoint: 16 bytes each,
160 MB per 10M samples).

Memory: the buffer holds ``buffer_rows + batch`` decoded images, ``buffer_rows x size^2 x 3`` bytes: 5,120 rows
are 63 MB at 64 px and 770 MB at 224 px per worker (host memory); a refill holds the incoming rows and the new
window at once, about 2x that (measured in ``test_data_stream.py``, the refill test).

Plain numpy, no Ray: the unit tests drive it with hand-made blocks.
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from reclip_ray.data.stream import BAD, MARKER, OK
from reclip_ray.errors import CheckpointError

SERVED = ("image", "jpeg", "box", "tokens", "_pos", "_unit", "key", "_pass")  # jpeg/box: data.decode_device=cuda


def _ints(values: Any = ()) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


@dataclass(eq=False)
class DataPosition:
    """Where a phase's stream continues: units before ``frontier`` are done, so are the whole ``units`` beyond it
    and the ``done`` positions (rows trained in units that are not done yet; ``done_units`` holds each one's unit).

    Sorted int64 arrays. In ``meta.json`` (``to_dict``) the whole units are ranges in one string ("40-56,60") and
    the done positions one string per unit: "UNIT:FIRST:BITS", BITS the base64 of a little-endian bitmap of the
    positions from FIRST on (at most ``group_shards x chunk_rows`` bits). Checkpoints written before this format
    (the positions as lists of ints, ``done`` and ``done_units``) still load.
    """

    phase: int = 0
    frontier: int = 0
    units: np.ndarray = field(default_factory=_ints)
    done: np.ndarray = field(default_factory=_ints)
    done_units: np.ndarray = field(default_factory=_ints)

    def __post_init__(self) -> None:
        self.units, self.done, self.done_units = _ints(self.units), _ints(self.done), _ints(self.done_units)
        if len(self.done) != len(self.done_units):
            raise ValueError(f"{len(self.done)} done positions but {len(self.done_units)} units for them")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DataPosition) and (self.phase, self.frontier) == (other.phase, other.frontier)
                and all(np.array_equal(a, b) for a, b in zip(self._arrays(), other._arrays())))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.units, self.done, self.done_units

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "frontier": self.frontier, "units": _ranges_text(self.units),
                "partial": _bitmaps_text(self.done, self.done_units)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "DataPosition":
        raw = raw or {}
        phase, frontier = int(raw.get("phase", 0)), int(raw.get("frontier", 0))
        try:
            if "done" in raw:  # the earlier format: every done position and its unit, as lists of ints
                done, units = _ints(raw["done"]), _ints(raw["done_units"])
                order = np.argsort(done, kind="stable")
                return cls(phase, frontier, done=done[order], done_units=units[order])
            done, done_units = _parse_bitmaps(raw.get("partial", []))
            return cls(phase, frontier, _parse_ranges(raw.get("units", "")), done, done_units)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint's data position (meta.json 'data') is unreadable: {exc}") from None


def _ranges_text(units: np.ndarray) -> str:
    """Sorted unit numbers as inclusive ranges: [3, 4, 5, 9] -> "3-5,9"."""
    if not len(units):
        return ""
    cut = np.flatnonzero(np.diff(units) != 1) + 1
    starts, ends = units[np.r_[0, cut]], units[np.r_[cut - 1, len(units) - 1]]
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts.tolist(), ends.tolist()))


def _parse_ranges(text: str) -> np.ndarray:
    parts = []
    for item in filter(None, str(text).split(",")):
        a, _, b = item.partition("-")
        lo, hi = int(a), int(b or a)
        if hi < lo:
            raise ValueError(f"unit range {item!r} ends before it starts")
        parts.append(np.arange(lo, hi + 1, dtype=np.int64))
    return np.unique(np.concatenate(parts)) if parts else _ints()


def _bitmaps_text(done: np.ndarray, units: np.ndarray) -> list[str]:
    """One "UNIT:FIRST:BITS" per unit of ``done`` (sorted positions; a unit's positions are contiguous in the
    stream, so its bitmap spans at most the unit's rows)."""
    out = []
    cut = np.flatnonzero(np.diff(units) != 0) + 1
    for pos, unit in zip(np.split(done, cut), np.split(units, cut)):
        if not len(pos):
            continue
        bits = np.zeros(int(pos[-1] - pos[0]) + 1, dtype=bool)
        bits[pos - pos[0]] = True
        packed = np.packbits(bits, bitorder="little").tobytes()
        out.append(f"{int(unit[0])}:{int(pos[0])}:{base64.b64encode(packed).decode('ascii')}")
    return out


def _parse_bitmaps(entries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    done, units = [], []
    for entry in entries:
        unit, first, bits = str(entry).split(":")
        offsets = np.flatnonzero(np.unpackbits(np.frombuffer(base64.b64decode(bits, validate=True), np.uint8),
                                               bitorder="little"))
        done.append(int(first) + offsets)
        units.append(np.full(len(offsets), int(unit), np.int64))
    if not done:
        return _ints(), _ints()
    done_arr, unit_arr = np.concatenate(done), np.concatenate(units)
    order = np.argsort(done_arr, kind="stable")
    return done_arr[order], unit_arr[order]


@dataclass
class FeedReport:
    """What one rank counted since the last merge, per unit (the first exchange between ranks at a checkpoint)."""

    emitted: dict[int, int]
    absent: dict[int, int]
    done: dict[int, int]
    seen: int
    bad: int
    example: str
    recorded: int = 0  # rows trained or dropped as bad (positions recorded): what a merge settles as seen


class PhaseFeed:
    def __init__(self, blocks: Iterator[dict[str, np.ndarray]], *, buffer_rows: int, seed: int,
                 position: DataPosition | None = None) -> None:
        self._blocks = blocks
        self._buffer_rows = max(0, int(buffer_rows))
        self._rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
        self._pool: dict[str, np.ndarray] = {}  # the window's rows as they arrived
        self._order = _ints()  # the order they are served in (a permutation of the pool)
        self._head = 0
        self._exhausted = False
        position = position or DataPosition()
        # Agreed by every rank at the last merge.
        self.phase = position.phase
        self.frontier = position.frontier
        self._whole = position.units  # whole units done beyond the frontier (the rebuilt stream skips them)
        self._done_pos, self._done_unit = position.done, position.done_units  # rows done in units not done yet
        # Units seen but not done yet: rows emitted (the rebuilt stream's count), rows done since, absent rows.
        self._g_emitted: dict[int, int] = {}
        self._g_done: Counter[int] = Counter()
        self._g_absent: dict[int, int] = {}
        self.absent_done = 0  # absent rows of units that became done at a merge
        self._mine = (_ints(), _ints())  # this rank's positions in units not done at the last merge (``pending``)
        # Recorded by this rank since the last merge.
        self._reset_local()

    def _reset_local(self) -> None:
        self._emitted: dict[int, int] = {}
        self._absent: dict[int, int] = {}
        self._done: Counter[int] = Counter()
        self._pos: list[np.ndarray] = []
        self._units: list[np.ndarray] = []
        self.seen = 0
        self.bad = 0
        self.example = ""

    # ------------------------------------------------------------------------------------------ batches

    @property
    def available(self) -> int:
        return len(self._pool.get("_pos", ())) - self._head

    @property
    def recorded(self) -> int:
        """Rows trained or dropped as bad since the last merge (what the merge settles as seen)."""
        return sum(len(p) for p in self._pos)

    def take(self, n: int) -> dict[str, np.ndarray] | None:
        """The next ``n`` rows (image, tokens, and key/_pass when the stream carries them); None when the stream
        ends first (the rows that are left stay unrecorded, so a restart would read them again)."""
        while self.available < n:
            if not self._refill():
                return None
        rows = self._order[self._head : self._head + n]
        out = {k: v[rows] for k, v in self._pool.items()}  # a copy of n rows: no batch holds the window alive
        self._head += n
        self._record(out["_pos"], out["_unit"])
        return out

    def _refill(self) -> bool:
        """Pull blocks until the buffer is full (or the stream ends); the new buffer is the rows not yet served
        plus the new ones, in a fresh random order."""
        incoming: list[dict[str, np.ndarray]] = []
        rows = 0
        while not self._exhausted and (rows < self._buffer_rows or rows == 0):
            block = next(self._blocks, None)
            if block is None:
                self._exhausted = True
                break
            good = self._ingest(block)
            if good is not None:
                incoming.append(good)
                rows += len(good["_pos"])
        if not incoming:
            return False
        # The rows not served yet, then the old window is let go before the new one is built: at most the incoming
        # rows and the new window are held at once (2x the buffer; permuting the merged window as well held 4x,
        # 3.1 GB per worker at 224 px), and the window is copied once, not twice.
        left = self._order[self._head :]
        parts = ([{k: v[left] for k, v in self._pool.items()}] if len(left) else []) + incoming
        self._pool = {}
        self._pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[-1]}
        self._order = self._rng.permutation(len(self._pool["_pos"]))
        self._head = 0
        return True

    def _ingest(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Note the block's units; record bad rows and markers as done; return its good rows."""
        units, idx = np.unique(block["_unit"], return_index=True)
        for u, i in zip(units.tolist(), idx.tolist()):
            self._emitted[u] = int(block["_unit_rows"][i])
            self._absent[u] = int(block["_unit_absent"][i])
        ok = block["_ok"]
        bad = ok == BAD
        # Rows are counted as seen when they arrive (good and bad alike), so the bad fraction is a fraction of the
        # rows read, whatever the buffer holds back.
        self.seen += int((ok != MARKER).sum())
        if bad.any():
            self.bad += int(bad.sum())
            if not self.example:
                self.example = str(block["_bad"][np.flatnonzero(bad)[0]])
            self._record(block["_pos"][bad], block["_unit"][bad])
        marker = ok == MARKER
        if marker.any():
            for u in block["_unit"][marker].tolist():
                self._done[int(u)] += 1
        good = ok == OK
        if not good.any():
            return None
        return {k: block[k][good] for k in SERVED if k in block}

    def _record(self, positions: np.ndarray, units: np.ndarray) -> None:
        self._pos.append(np.asarray(positions, np.int64))
        self._units.append(np.asarray(units, np.int64))
        for u, c in zip(*np.unique(units, return_counts=True)):
            self._done[int(u)] += int(c)

    # ------------------------------------------------------------------------------------------ position

    def report(self) -> FeedReport:
        """This rank's counts since the last merge (to be all-gathered, then ``merge``d)."""
        return FeedReport(dict(self._emitted), dict(self._absent), dict(self._done), self.seen, self.bad, self.example,
                          self.recorded)

    def merge(self, reports: list[FeedReport]) -> dict[str, int]:
        """Fold every rank's counts into the agreed position (every rank calls this with the same reports and so
        reaches the same state). Returns the counts that the merge settled: rows seen / bad, and the absent rows
        of the units that became done. ``pending`` / ``agree`` then exchange the positions still needed.

        A unit is done once its rows done reach its rows emitted, wherever it lies: it joins the whole ``units``,
        and the frontier moves over every whole unit in front of it. So positions are kept (and exchanged) only
        for units with rows still in flight, whatever the order groups finish in, and however many rows were
        trained since the last merge.
        """
        touched: set[int] = set()
        for r in reports:
            self._g_emitted.update(r.emitted)
            self._g_absent.update(r.absent)
            self._g_done.update(r.done)
            touched.update(r.done)  # a unit's last rows done are in some report's ``done``
        finished = sorted(u for u in touched if u in self._g_emitted and self._g_done[u] >= self._g_emitted[u])
        absent_before = self.absent_done
        for u in finished:
            self.absent_done += self._g_absent.pop(u, 0)
            del self._g_emitted[u]
            self._g_done.pop(u, None)
        units = np.union1d(self._whole, np.asarray(finished, dtype=np.int64))
        self.frontier = _advance(self.frontier, units)
        self._whole = units[units >= self.frontier]
        pending = _pending(self.frontier, self._whole)
        keep = pending(self._done_unit)
        self._done_pos, self._done_unit = self._done_pos[keep], self._done_unit[keep]
        mine_pos, mine_unit = (np.concatenate([m, *xs]) for m, xs in zip(self._mine, (self._pos, self._units)))
        keep = pending(mine_unit)
        self._mine = (mine_pos[keep], mine_unit[keep])
        # Seen = trained or dropped as bad: the positions recorded, which a restart never reads again. (``seen``
        # counts rows on arrival, buffered ones too, which a restart from this merge reads again: summed over merges
        # it would count every buffer left at a crash twice. The caller counts what is buffered at the phase end.)
        settled = {"seen": sum(r.recorded for r in reports), "bad": sum(r.bad for r in reports),
                   "absent": self.absent_done - absent_before}
        self._reset_local()
        return settled

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, units) this rank trained or dropped since the last merge in units that are still not done:
        the second exchange (to be all-gathered, then passed to ``agree``). At most the rows of the units that
        have rows in flight."""
        return self._mine

    def agree(self, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Add every rank's ``pending`` positions to the agreed position."""
        pos = np.concatenate([self._done_pos] + [p for p, _ in pending])
        unit = np.concatenate([self._done_unit] + [u for _, u in pending])
        order = np.argsort(pos, kind="stable")
        self._done_pos, self._done_unit = pos[order], unit[order]
        self._mine = (_ints(), _ints())

    def position(self) -> DataPosition:
        """The agreed position (after ``merge`` and ``agree``)."""
        return DataPosition(self.phase, self.frontier, self._whole.copy(), self._done_pos.copy(),
                            self._done_unit.copy())

    def close(self) -> None:
        """Stop reading. A phase ends at its sample count, mid-stream: closing Ray Data's batch iterator tells the
        phase's split coordinator that this rank is done, and once every rank has, the coordinator stops the phase's
        executor and drops the blocks it buffered for the ranks (Ray 2.60, ``notify_split_finished``). Left open, they
        hold object-store memory through the phase's evaluation and beyond, until garbage collection closes it."""
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()
        self._blocks = iter(())
        self._exhausted = True

    def absent_in_flight(self) -> int:
        """Absent rows of units seen but not yet done (counted once the phase ends)."""
        return sum(self._g_absent.values()) + sum(v for u, v in self._absent.items() if u not in self._g_absent)


def _advance(frontier: int, units: np.ndarray) -> int:
    """The frontier moved over the run of whole ``units`` (sorted, unique) that starts at it."""
    run = units[np.searchsorted(units, frontier):]
    at = run - np.arange(len(run)) == frontier  # True for the consecutive run from the frontier on, then False
    return frontier + (len(at) if at.all() else int(np.argmin(at)))


def _pending(frontier: int, whole: np.ndarray):
    """A test for an array of units: which are not done (not before the frontier, not one of the ``whole`` units,
    sorted and >= frontier). One table lookup per row: a rank tests every row it trained since the last merge."""
    table = np.zeros(int(whole[-1]) - frontier + 2 if whole.size else 1, dtype=bool)  # the last slot: beyond them
    table[whole - frontier] = True

    def pending(unit: np.ndarray) -> np.ndarray:
        offset = unit - frontier
        return (offset >= 0) & ~table[np.clip(offset, 0, len(table) - 1)]

    return pending
