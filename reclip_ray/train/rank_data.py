"""This rank's share of a phase's data: its feed, the data position all ranks agree on at a checkpoint, and the
bad-row budget. Every function here that talks to the other ranks runs at checkpoints and log windows only.
"""

from __future__ import annotations

from typing import Any

from reclip_ray.config import Config
from reclip_ray.run_names import phase_dataset_name, phase_seed, shuffle_buffer_rows
from reclip_ray.train.checkpoint import TrainState
from reclip_ray.train.collectives import gather


def open_feed(cfg: Config, plan: Any, state: TrainState, rank: int, local_batch: int) -> Any:
    """This rank's feed of the phase: its shard of the stream (which starts where the checkpoint left off)."""
    import ray.train

    from reclip_ray.data.feed import DataPosition, PhaseFeed

    position = DataPosition.from_dict(state.data)
    if position.phase != plan.index:
        position = DataPosition(phase=plan.index)
    shard = ray.train.get_dataset_shard(phase_dataset_name(plan.index))
    blocks = iter(shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    return PhaseFeed(blocks, buffer_rows=shuffle_buffer_rows(cfg, local_batch),
                     seed=phase_seed(cfg, plan.index) * 31 + 1000 * state.restarts + rank, position=position)


def settle_data(feed: Any, state: TrainState, world: int, layout: dict[str, Any]) -> None:
    """Agree on the data position (all ranks) and fold the settled row counts into the run state. Two all-gathers:
    each rank's counts per unit (which units are done), then its positions in the units that are not (a few per
    unit with rows in flight, however many rows were trained since the last checkpoint).

    ``rows_seen`` counts each row read once, across restarts: a checkpoint settles the rows trained or dropped as
    bad (``PhaseFeed.merge``), never those still in a buffer, which a restart from it reads again; those count
    when trained, or at the phase end (``Worker.end_phase``) if they never are. ``layout``: the config values the
    position is numbered by (``run_names.stream_layout``), stored beside it for a restart to check.
    """
    settled = feed.merge(gather(feed.report(), world))
    feed.agree(gather(feed.pending(), world))
    state.rows_seen += settled["seen"]
    state.rows_bad += settled["bad"]
    state.rows_absent += settled["absent"]
    state.data = {**feed.position().to_dict(), "layout": layout}


def check_bad_rows(feed: Any, world: int, seen: int, bad: int, max_bad_fraction: float) -> None:
    """``data.max_bad_fraction`` over the whole run so far; every rank decides alike (same totals), and the error
    names a bad row that one of the ranks saw."""
    from reclip_ray.data.local import check_bad_fraction

    if seen <= 0 or bad / seen <= max_bad_fraction:
        return
    examples = gather(feed.example, world)
    check_bad_fraction(seen, bad, max_bad_fraction, next((e for e in examples if e), None))
