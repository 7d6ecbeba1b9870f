"""``data_rows_seen``: every row read counted once, across checkpoints, a crash and a restart (no Ray).

The worker counts the rows settled at checkpoints (``PhaseFeed.merge``: trained or dropped as bad) plus, live, what
each rank recorded since and holds in its buffer (``recorded + available``), and at the phase end what is left in
the buffers. Hand-made blocks (positions and ``_ok`` flags only: the feed needs nothing else) make the reference
a set of positions.
"""

from __future__ import annotations

import numpy as np

from reclip_ray.data.feed import DataPosition, PhaseFeed
from reclip_ray.data.stream import BAD, OK

UNITS, ROWS = 12, 10  # 120 rows, positions 0..119; every 7th row is bad


def _blocks(position: DataPosition | None = None) -> list[dict[str, np.ndarray]]:
    """One block per unit, as the rebuilt stream sends them: units before the frontier, whole units done beyond it
    and done positions dropped."""
    position = position or DataPosition()
    out = []
    for u in range(position.frontier, UNITS):
        if u in position.units:
            continue
        pos = np.arange(u * ROWS, (u + 1) * ROWS)
        pos = pos[~np.isin(pos, position.done)]
        if len(pos) == 0:
            continue
        out.append({"_pos": pos, "_unit": np.full(len(pos), u), "_unit_rows": np.full(len(pos), ROWS),
                    "_unit_absent": np.zeros(len(pos), np.int64), "_ok": np.where(pos % 7 == 0, BAD, OK),
                    "_bad": np.where(pos % 7 == 0, "bad", ""), "key": pos.astype(str)})
    return out


class _Counted:
    """The blocks a feed pulled (what it read)."""

    def __init__(self, blocks: list[dict]) -> None:
        self._it, self.read = iter(blocks), set()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        block = next(self._it)
        self.read |= set(block["_pos"].tolist())
        return block


def _live(settled: int, feeds: list[PhaseFeed]) -> int:
    """The worker's live count (``Worker.log_window``)."""
    return settled + sum(f.recorded + f.available for f in feeds)


def _merge(feeds: list[PhaseFeed]) -> int:
    reports = [f.report() for f in feeds]
    counts = [f.merge(reports) for f in feeds]
    pending = [f.pending() for f in feeds]  # the second exchange (rank_data.settle_data): positions still needed
    for f in feeds:
        f.agree(pending)
    assert all(c == counts[0] for c in counts)
    return counts[0]["seen"]


def test_rows_read_are_counted_once_across_a_crash_and_a_restart():
    blocks = _blocks()
    streams = [_Counted(blocks[0::2]), _Counted(blocks[1::2])]
    feeds = [PhaseFeed(s, buffer_rows=15, seed=1) for s in streams]
    settled = 0
    for _ in range(2):  # two checkpoints, 3 batches of 4 per rank before each
        for f in feeds:
            for _ in range(3):
                assert f.take(4) is not None
        read = set().union(*(s.read for s in streams))
        assert _live(settled, feeds) == len(read)  # every row read so far, once
        settled += _merge(feeds)
        assert _live(settled, feeds) == len(read)
        buffered = sum(f.available for f in feeds)
        assert buffered > 0  # the checkpoint leaves rows in the buffers: the case that used to count twice
    position = feeds[0].position()
    for f in feeds:  # steps after the checkpoint, then a crash: their counts are lost with them
        f.take(4)

    # Restart on 3 ranks from the checkpoint: the rebuilt stream holds every row not settled, buffered ones included.
    rebuilt = _blocks(position)
    streams = [_Counted(rebuilt[r::3]) for r in range(3)]
    feeds = [PhaseFeed(s, buffer_rows=15, seed=2, position=position) for s in streams]
    for f in feeds:
        for _ in range(2):
            assert f.take(4) is not None
    settled += _merge(feeds)
    for f in feeds:  # the phase ends before the streams do: rows stay in the buffers
        assert f.take(4) is not None
    settled += _merge(feeds)
    left = sum(f.available for f in feeds)
    unread = sum(len(b["_pos"]) for s in streams for b in s._it)
    assert left > 0
    # The phase end (Worker.end_phase) adds what is left in the buffers: every row read, once.
    assert settled + left == UNITS * ROWS - unread
