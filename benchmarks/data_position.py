"""Data position at cluster scale: how big a checkpoint's data position gets, and what the checkpoint-time gather +
merge costs, with the real ``stream.PhaseStream`` and ``feed.PhaseFeed`` and blocks delivered as Ray Data would.

No Ray and no images: shards are footers only (``shards.Shard``), and a read task's output is the bookkeeping
columns that ``pipeline.read_groups`` + ``decode_batch`` give each row (``_pos``, ``_unit``, ``_unit_rows``,
``_unit_absent``, ``_ok``). How the blocks reach the ranks (what ``pipeline.phase_dataset`` does on a cluster):

* ``tasks`` read tasks (``data.read_parallelism``) each stream one group at a time, taking the stream's items in
  order; a task emits its group's units in order, each unit's rows at consecutive positions (``read_groups``
  permutes which file row gets which position, not the positions), less the absent rows and the ones done before
  a restart; a unit with nothing left sends one marker row;
* the fused decode cuts a task's output into blocks of ``decode_batch`` rows (a block may span two units);
* the tasks run side by side: each next block comes from a task drawn at random, so groups progress together and
  finish in any order; ``queue`` blocks wait between the tasks and the ranks (Ray Data's output buffer), and each
  rank prefetches 2 (``iter_batches(prefetch_batches=2)``); a rank takes the next queued block when its feed needs
  one (``streaming_split``'s dynamic split).

At every checkpoint (every ``every`` samples) the ranks settle as ``rank_data.settle_data`` does: two all-gathers
(``report`` then ``merge``, ``pending`` then ``agree``), each simulated by pickling every rank's object and
unpickling them all (the serialisation; the network transfer itself is not simulated); every rank merges, and
rank 0's position is measured as ``meta.json`` writes it (``json.dumps(indent=2)``, under "data"). The script checks
at every checkpoint that the position is exactly the rows trained (every position trained at most once, and the
rows the position calls done are the rows trained), and prints one JSON line per checkpoint with the bytes, the
bound (``position_bound``), the units read and not done (P), the gather and merge seconds, and the positions
the earlier format (every done position beyond the frontier, as lists of ints) would have held.

    python benchmarks/data_position.py --samples 16000000 --every 2000000   # the cluster case (BENCHMARKS.md)
    PYTHONPATH=/tmp/old python benchmarks/data_position.py ...              # another checkout's reclip_ray
    python benchmarks/data_position.py --shards 64 --rows 400 --group-shards 4 --chunk-rows 16 --tasks 8 \\
        --ranks 4 --batch 128 --buffer 320 --every 1024 --decode-batch 16 --queue 16   # the fast test's case

The earlier code (positions as lists, one all-gather) runs too: the script uses whichever API it finds.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from reclip_ray.data.feed import DataPosition, PhaseFeed
from reclip_ray.data.shards import Shard
from reclip_ray.data.stream import MARKER, OK, PhaseStream, unit_sizes

META_INDENT = 2  # checkpoint.save_checkpoint writes meta.json with indent=2; the position sits under "data"


def position_bound(tasks: int, units_in_flight: int, unit_rows: int, max_unit: int, max_pos: int) -> int:
    """The most bytes the position can take in meta.json, from what ``DataPosition.to_dict`` writes.

    The whole units beyond the frontier are runs separated by units that are not done: units read and not done
    (``units_in_flight``, P) or a read task's unread rest of its group (one run per task, G). So there are at
    most P + G ranges of ``2 D_u + 2`` characters ("a-b,"). At most P units have rows done and not all; each is one
    string of ``6 + 2 + D_u + 1 + D_p + 1 + 4 ceil(ceil(U / 8) / 3) + 2`` bytes (indent, quotes, "UNIT:FIRST:",
    a base64 bitmap of at most U = ``group_shards x chunk_rows`` bits, ",\\n"). 120 bytes cover the keys, the
    phase and the frontier. D_u, D_p: the digits of the largest unit and position.
    """
    d_u, d_p = len(str(max(1, max_unit))), len(str(max(1, max_pos)))
    bitmap = 4 * math.ceil(math.ceil(unit_rows / 8) / 3)
    return 120 + (2 * d_u + 2) * (units_in_flight + tasks) + (d_u + d_p + 12 + bitmap) * units_in_flight


def meta_bytes(position: DataPosition) -> int:
    """Bytes of the position in meta.json (as ``save_checkpoint`` writes it, minus the rest of the state)."""
    return len(json.dumps({"data": position.to_dict()}, indent=META_INDENT)) - len('{\n}')


def earlier_format_bytes(positions: int, max_unit: int, max_pos: int) -> int:
    """meta.json bytes of the earlier format: every done position beyond the frontier and its unit as a list of
    ints, one per line at indent 6 (an upper bound from the largest number's digits)."""
    return positions * (2 * (6 + 2) + len(str(max(1, max_pos))) + len(str(max(1, max_unit))))


# ------------------------------------------------------------------------------------------------ the delivery


def absent_rows(seed: int, unit: int, size: int, fraction: float) -> np.ndarray:
    """Which of a unit's positions are absent (failed downloads): fixed per unit, so a rebuilt stream agrees."""
    if fraction <= 0:
        return np.zeros(size, dtype=bool)
    return np.random.default_rng([seed, 99, unit]).random(size) < fraction


def unit_rows_of(item: dict, chunk_rows: int, seed: int, absent_fraction: float) -> Iterator[dict[str, np.ndarray]]:
    """What ``read_groups`` + ``decode_batch`` emit for one stream item, as bookkeeping columns (one dict per unit)."""
    sizes = unit_sizes(item["rows"], chunk_rows)
    start, skip = item["start_round"], set(item.get("skip_rounds", ()))
    done = np.asarray(item["done"], dtype=np.int64)
    unit_pos = item["first_pos"] + sum(sizes[:start])
    for k in range(start, len(sizes)):
        size, unit = sizes[k], item["first_unit"] + k
        positions = unit_pos + np.arange(size, dtype=np.int64)
        unit_pos += size
        if k in skip:
            continue
        absent = absent_rows(seed, unit, size, absent_fraction)
        keep = ~absent
        if done.size:
            keep &= ~np.isin(positions, done)
        n = int(keep.sum())
        pos, ok = (positions[keep], np.full(n, OK, np.int8)) if n else (np.asarray([-1]), np.full(1, MARKER, np.int8))
        m = len(pos)
        yield {"_pos": pos, "_unit": np.full(m, unit, np.int64), "_unit_rows": np.full(m, m, np.int32),
               "_unit_absent": np.full(m, int(absent.sum()), np.int32), "_ok": ok}


def task_blocks(item: dict, chunk_rows: int, seed: int, absent_fraction: float,
                rows: int) -> Iterator[dict[str, np.ndarray]]:
    """One read task's output cut into ``rows``-row blocks (the fused decode's batches span units)."""
    carry: list[dict[str, np.ndarray]] = []
    have = 0
    for unit in unit_rows_of(item, chunk_rows, seed, absent_fraction):
        carry.append(unit)
        have += len(unit["_pos"])
        if have < rows:
            continue
        merged = {k: np.concatenate([c[k] for c in carry]) for k in unit}
        cut = have - have % rows
        for s in range(0, cut, rows):
            yield {k: v[s : s + rows] for k, v in merged.items()}
        carry = [{k: v[cut:] for k, v in merged.items()}] if cut < have else []
        have -= cut
    if have:
        yield {k: np.concatenate([c[k] for c in carry]) for k in carry[0]}


class Delivery:
    """Blocks of a stream's items as the ranks receive them (see the module docstring)."""

    def __init__(self, items: list[dict], *, chunk_rows: int, seed: int, tasks: int, decode_batch: int,
                 queue: int, absent_fraction: float = 0.0, draw_seed: int = 0) -> None:
        self._items = deque(items)
        self._args = (chunk_rows, seed, absent_fraction, decode_batch)  # ``seed``: the data's (absent rows)
        self._running: list[Iterator] = []
        self._tasks = tasks
        self._queue: deque = deque()
        self._size = max(1, queue)
        self._rng = np.random.default_rng([draw_seed, 5])  # which task's block comes next
        self.read_units: set[int] = set()  # units a task has emitted rows of (P is those of them not done)

    def _produce(self) -> dict[str, np.ndarray] | None:
        while self._items and len(self._running) < self._tasks:
            self._running.append(task_blocks(self._items.popleft(), *self._args))
        while self._running:
            i = int(self._rng.integers(len(self._running)))
            block = next(self._running[i], None)
            if block is not None:
                self.read_units.update(np.unique(block["_unit"]).tolist())
                return block
            self._running.pop(i)
            if self._items:
                self._running.append(task_blocks(self._items.popleft(), *self._args))
        return None

    def next(self) -> dict[str, np.ndarray] | None:
        while len(self._queue) < self._size:
            block = self._produce()
            if block is None:
                break
            self._queue.append(block)
        return self._queue.popleft() if self._queue else None

    def rank(self, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
        ahead: deque = deque()
        while True:
            while len(ahead) < prefetch:
                block = self.next()
                if block is None:
                    break
                ahead.append(block)
            if not ahead:
                return
            yield ahead.popleft()


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class Sim:
    """One phase's stream and its rows' truth: which positions exist (not absent) and how often each was trained."""

    stream: PhaseStream
    seed: int
    absent_fraction: float
    unit_of: np.ndarray = field(init=False)
    present: np.ndarray = field(init=False)
    trained: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        sizes = [s for g in self.stream.groups for s in g.unit_sizes()]
        self.unit_of = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        self.present = np.ones(self.stream.total_rows, dtype=bool)
        if self.absent_fraction > 0:
            for u, (a, n) in enumerate(zip(starts.tolist(), sizes)):
                self.present[a : a + n] = ~absent_rows(self.seed, u, n, self.absent_fraction)
        self.trained = np.zeros(self.stream.total_rows, dtype=np.uint8)

    def done_by(self, position: DataPosition) -> np.ndarray:
        """The positions ``position`` calls done (present rows of done units, and its done positions)."""
        whole = np.zeros(self.stream.total_units, dtype=bool)
        whole[: position.frontier] = True
        whole[np.asarray(getattr(position, "units", ()), dtype=np.int64)] = True
        done = whole[self.unit_of] & self.present
        done[np.asarray(position.done, dtype=np.int64)] = True
        return done

    def rollback(self, position: DataPosition) -> None:
        """A crash: the rows trained after the checkpoint at ``position`` are lost with the weights."""
        self.trained = self.done_by(position).astype(np.uint8)

    def check(self, position: DataPosition) -> None:
        assert self.trained.max(initial=0) <= 1, "a row was trained twice"
        wrong = np.flatnonzero(self.done_by(position) != (self.trained > 0))
        assert not wrong.size, f"the position disagrees with the rows trained at {wrong.size} positions: {wrong[:5]}"


def shards(n: int, rows: int) -> list[Shard]:
    return [Shard(f"shard-{i:06d}.parquet", rows, (rows,)) for i in range(n)]


def feeds_for(delivery: Delivery, ranks: int, buffer_rows: int, seed: int, position: DataPosition) -> list[PhaseFeed]:
    return [PhaseFeed(delivery.rank(), buffer_rows=buffer_rows, seed=seed * 31 + r, position=position)
            for r in range(ranks)]


def run(sim: Sim, *, tasks: int, ranks: int, batch: int, buffer_rows: int, decode_batch: int, queue: int,
        every: int, samples: int, position: DataPosition | None = None, restarts: int = 0, drain: bool = False,
        on_checkpoint=None) -> DataPosition:
    """Train ``samples`` rows (or to the stream's end) from ``position`` on, checkpointing every ``every``; return the
    last checkpoint's position. ``drain``: at the stream's end, train the rows left in the buffers too (the last
    step of a phase) and checkpoint. ``on_checkpoint(stats)`` gets each checkpoint's measurements."""
    stream = sim.stream
    delivery = Delivery(_items(stream, position), chunk_rows=stream.chunk_rows, seed=sim.seed, tasks=tasks,
                        decode_batch=decode_batch, queue=queue, absent_fraction=sim.absent_fraction,
                        draw_seed=stream.seed + 1000 * restarts)
    feeds = feeds_for(delivery, ranks, buffer_rows, stream.seed + restarts, position or DataPosition())
    local = batch // ranks
    trained = 0
    while trained < samples:
        got = [f.take(local) for f in feeds]
        if any(g is None for g in got):  # the stream ended (a worker would fail: datasets are sized with margin)
            if drain:  # the rows taken count as trained (``take`` recorded them); then the feeds' rest
                got = [g for g in got if g is not None] + [g for f in feeds for g in _rest(f, local)]
                for g in got:
                    sim.trained[g["_pos"]] += 1
                position = checkpoint(sim, feeds, delivery, tasks, trained + sum(len(g["_pos"]) for g in got),
                                      on_checkpoint)
            break
        for g in got:
            sim.trained[g["_pos"]] += 1
        prev, trained = trained, trained + local * ranks
        if trained // every > prev // every or trained >= samples:
            position = checkpoint(sim, feeds, delivery, tasks, trained, on_checkpoint)
    return position or DataPosition()


def _rest(feed: PhaseFeed, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Every row a feed still has once the stream has ended (its last batch short)."""
    while (got := feed.take(batch) or (feed.take(feed.available) if feed.available else None)) is not None:
        yield got


def _items(stream: PhaseStream, position: DataPosition | None) -> list[dict]:
    if position is None:
        return stream.items()
    units = getattr(position, "units", ())  # absent before the whole units (the earlier code: see ``main``)
    return stream.items(position.frontier, position.done, units) if len(units) else stream.items(
        position.frontier, position.done)


def settle_steps(feed: PhaseFeed) -> list[tuple[str, str]]:
    """``rank_data.settle_data`` as (what each rank sends, what it folds the gathered list with): two all-gathers
    (counts, then the positions of the units not done), or one (every position trained) in the earlier code."""
    return [("report", "merge"), ("pending", "agree")] if hasattr(feed, "agree") else [("report", "merge")]


def checkpoint(sim: Sim, feeds: list[PhaseFeed], delivery: Delivery, tasks: int, samples: int,
               on_checkpoint) -> DataPosition:
    """``rank_data.settle_data`` on every rank, timed: each all-gather simulated as pickling each rank's object and
    unpickling all of them (the serialisation every rank pays; not the transfer), then every rank's merge."""
    wire_bytes, gather_s, merge_s = 0, 0.0, [0.0] * len(feeds)
    for send, fold in settle_steps(feeds[0]):
        t0 = time.perf_counter()
        wire = [pickle.dumps(getattr(f, send)(), protocol=pickle.HIGHEST_PROTOCOL) for f in feeds]
        gathered = [pickle.loads(w) for w in wire]
        gather_s += time.perf_counter() - t0
        wire_bytes += sum(len(w) for w in wire)
        for r, f in enumerate(feeds):  # every rank does the same work: the median is one rank's time
            t0 = time.perf_counter()
            getattr(f, fold)(gathered)
            merge_s[r] += time.perf_counter() - t0
    position = feeds[0].position()
    sim.check(position)
    stream = sim.stream
    whole = np.asarray(getattr(position, "units", ()), dtype=np.int64)
    done_units = set(range(position.frontier)) | set(whole.tolist())
    in_flight = len(delivery.read_units - done_units)
    beyond = int(sim.trained[sim.unit_of >= position.frontier].sum())
    max_unit, max_pos = stream.total_units, stream.total_rows
    unit_rows = max(max(g.unit_sizes()) for g in stream.groups)
    stats = {
        "samples": samples, "frontier": position.frontier, "whole_units": len(whole),
        "partial_units": len(np.unique(np.asarray(position.done_units))), "done_positions": len(position.done),
        "units_in_flight": in_flight, "meta_bytes": meta_bytes(position),
        "bound_bytes": position_bound(tasks, in_flight, unit_rows, max_unit, max_pos),
        "earlier_format_positions": beyond, "earlier_format_bytes": earlier_format_bytes(beyond, max_unit, max_pos),
        "gathered_bytes": wire_bytes, "gather_s": round(gather_s, 4),
        "merge_s": round(float(np.median(merge_s)), 4), "merge_max_s": round(max(merge_s), 4),
    }
    if on_checkpoint is not None:
        on_checkpoint(stats)
    return position


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2048, help="shards in the phase (one pass)")
    p.add_argument("--rows", type=int, default=10_000, help="rows per shard")
    p.add_argument("--group-shards", type=int, default=16)
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--tasks", type=int, default=64, help="read tasks in flight (data.read_parallelism)")
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--batch", type=int, default=32768, help="global batch")
    p.add_argument("--buffer", type=int, default=-1, help="shuffle buffer rows per rank (-1: 10x the local batch)")
    p.add_argument("--decode-batch", type=int, default=64, help="rows per block (data.decode_batch_size)")
    p.add_argument("--queue", type=int, default=-1, help="blocks queued between tasks and ranks (-1: 2 per task)")
    p.add_argument("--every", type=int, default=2_000_000, help="samples between checkpoints")
    p.add_argument("--samples", type=int, default=10_000_000, help="samples to train (checkpoints mid-phase)")
    p.add_argument("--absent", type=float, default=0.1, help="fraction of absent rows (failed downloads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    local = args.batch // args.ranks
    buffer_rows = 10 * local if args.buffer < 0 else args.buffer
    queue = 2 * args.tasks if args.queue < 0 else args.queue
    stream = PhaseStream(shards(args.shards, args.rows), seed=args.seed, passes=1, group_shards=args.group_shards,
                         chunk_rows=args.chunk_rows)
    sim = Sim(stream, args.seed, args.absent)
    setup = {k: v for k, v in vars(args).items()} | {"buffer": buffer_rows, "queue": queue,
                                                    "stream_rows": stream.total_rows, "units": stream.total_units}
    print(json.dumps({"setup": setup}), flush=True)
    t0 = time.perf_counter()
    run(sim, tasks=args.tasks, ranks=args.ranks, batch=args.batch, buffer_rows=buffer_rows,
        decode_batch=args.decode_batch, queue=queue, every=args.every, samples=args.samples,
        on_checkpoint=lambda s: print(json.dumps(s), flush=True))
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
