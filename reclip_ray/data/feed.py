"""A worker's side of the phase stream: a row-level shuffle buffer, exact batch sizes, and the data position.

Rows arrive from Ray Data in blocks of one shard group each (``pipeline.phase_dataset``). ``PhaseFeed`` keeps up
to ``buffer_rows`` of them, serves each batch from a random permutation of the buffer (a window shuffle: rows
left when a window runs low are shuffled into the next one, so a row waits about one buffer fill on average and
the data position below stays small), and records which stream positions
it has trained, dropped as bad, or seen as a unit's end marker.

The data position is what a restart needs to continue exactly where the last checkpoint was: at every checkpoint
the ranks exchange what they recorded since the last one (``report`` / ``merge``) and agree on the *frontier*,
the first unit (``stream.PhaseStream``) that is not fully done, plus the positions done beyond it. Everything
before the frontier is trained, everything done beyond it is dropped when the stream is rebuilt, and what was in a
buffer or in flight is read again. Size at scale: the positions beyond the frontier are about
(workers x (buffer + prefetch)) rows, e.g. 64 x 6k = 400k int64 = 3 MB per checkpoint.

Memory: the buffer holds ``buffer_rows + batch`` decoded images, ``buffer_rows x size^2 x 3`` bytes: 5,120 rows
are 63 MB at 64 px and 770 MB at 224 px per worker (host memory).

Plain numpy, no Ray: the unit tests drive it with hand-made blocks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from reclip_ray.data.stream import BAD, MARKER, OK

SERVED = ("image", "jpeg", "box", "tokens", "_pos", "_unit", "key", "_pass")  # jpeg/box: data.decode_device=cuda


@dataclass
class DataPosition:
    """Where a phase's stream continues: units before ``frontier`` are done, and so are the ``done`` positions."""

    phase: int = 0
    frontier: int = 0
    done: list[int] = field(default_factory=list)
    done_units: list[int] = field(default_factory=list)  # the unit of each ``done`` position

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "frontier": self.frontier, "done": list(self.done),
                "done_units": list(self.done_units)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "DataPosition":
        raw = raw or {}
        done = [int(p) for p in raw.get("done", [])]
        units = [int(u) for u in raw.get("done_units", [-1] * len(done))]
        return cls(int(raw.get("phase", 0)), int(raw.get("frontier", 0)), done, units)


@dataclass
class FeedReport:
    """What one rank recorded since the last merge (exchanged between ranks at a checkpoint)."""

    emitted: dict[int, int]
    absent: dict[int, int]
    done: dict[int, int]
    positions: np.ndarray
    units: np.ndarray
    seen: int
    bad: int
    example: str


class PhaseFeed:
    def __init__(self, blocks: Iterator[dict[str, np.ndarray]], *, buffer_rows: int, seed: int,
                 position: DataPosition | None = None) -> None:
        self._blocks = blocks
        self._buffer_rows = max(0, int(buffer_rows))
        self._rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
        self._pool: dict[str, np.ndarray] = {}
        self._head = 0
        self._exhausted = False
        position = position or DataPosition()
        # Agreed by every rank at the last merge.
        self.phase = position.phase
        self.frontier = position.frontier
        self._done_pos = np.asarray(position.done, dtype=np.int64)
        self._done_unit = np.asarray(position.done_units, dtype=np.int64)
        self._g_emitted: dict[int, int] = {}
        self._g_done: Counter[int] = Counter()
        self._g_absent: dict[int, int] = {}
        self.absent_done = 0  # absent rows of units that became done at a merge
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
        out = {k: v[self._head : self._head + n] for k, v in self._pool.items()}
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
        parts = ([{k: v[self._head :] for k, v in self._pool.items()}] if self.available else []) + incoming
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[-1]}
        order = self._rng.permutation(len(merged["_pos"]))
        self._pool = {k: v[order] for k, v in merged.items()}
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
        """This rank's records since the last merge (to be all-gathered)."""
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        return FeedReport(dict(self._emitted), dict(self._absent), dict(self._done), cat(self._pos), cat(self._units),
                          self.seen, self.bad, self.example)

    def merge(self, reports: list[FeedReport]) -> dict[str, int]:
        """Fold every rank's report into the agreed position (every rank calls this with the same reports and so
        reaches the same state). Returns the counts that the merge settled: rows seen / bad, absent rows."""
        for r in reports:
            self._g_emitted.update(r.emitted)
            self._g_absent.update(r.absent)
            self._g_done.update(r.done)
        absent_before = self.absent_done
        while self.frontier in self._g_emitted and self._g_done[self.frontier] >= self._g_emitted[self.frontier]:
            u = self.frontier
            self.absent_done += self._g_absent.pop(u, 0)
            self._g_emitted.pop(u)
            self._g_done.pop(u, None)
            self.frontier += 1
        pos = np.concatenate([self._done_pos] + [r.positions for r in reports])
        unit = np.concatenate([self._done_unit] + [r.units for r in reports])
        keep = (unit >= self.frontier) | (unit < 0)
        order = np.argsort(pos[keep], kind="stable")
        self._done_pos, self._done_unit = pos[keep][order], unit[keep][order]
        # Seen = trained or dropped as bad: the positions recorded, which a restart never reads again. (``seen``
        # counts rows on arrival, buffered ones too, which a restart from this merge reads again: summed over merges
        # it would count every buffer left at a crash twice. The caller counts what is buffered at the phase end.)
        settled = {"seen": sum(len(r.positions) for r in reports), "bad": sum(r.bad for r in reports),
                   "absent": self.absent_done - absent_before}
        self._reset_local()
        return settled

    def position(self) -> DataPosition:
        return DataPosition(self.phase, self.frontier, self._done_pos.tolist(), self._done_unit.tolist())

    def absent_in_flight(self) -> int:
        """Absent rows of units seen but not yet done (counted once the phase ends)."""
        return sum(self._g_absent.values()) + sum(v for u, v in self._absent.items() if u not in self._g_absent)
