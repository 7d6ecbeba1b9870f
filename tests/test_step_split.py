"""How a phase's samples become steps and each step's rows become rank shares, without Ray.

Every step must give every rank at least one row (DDP and the loss's all-gather need every rank in every step), the
steps must add up to the phase exactly, and over a phase each rank must need no more rows than
``streaming_split(equal=True)`` hands it: ``floor(stream rows / N)``, the rows beyond a multiple of N dropped
(Ray Data's ``OutputSplitter``). ``datasets.phase_rows_needed`` sizes the stream for that.
"""

from __future__ import annotations

import math

import pytest

from reclip_ray.config import from_dict, load_config
from reclip_ray.run_names import block_rows
from reclip_ray.schedule import Schedule
from reclip_ray.train.batch_split import split_batch, step_split
from reclip_ray.train.datasets import phase_rows_needed


def _schedule(samples: list[int], batch: int, workers: int, min_workers: int | None = None) -> Schedule:
    phases = [{"name": f"p{i}", "image_size": 32, "text_length": 16, "samples": n} for i, n in enumerate(samples)]
    return Schedule.from_config(from_dict({
        "model": "tiny", "phases": phases, "train": {"samples": sum(samples), "batch_size": batch},
        "scaling": {"min_workers": min_workers or workers, "max_workers": workers}}))


def _walk(plan, world: int, start: int | None = None) -> list[list[int]]:
    """Every step's per-rank rows from ``start`` (a step boundary) to the phase end, as the worker loop takes them."""
    samples, steps = plan.start_sample if start is None else start, []
    while samples < plan.end_sample:
        sizes = step_split(plan, samples, world)
        steps.append(sizes)
        samples += sum(sizes)
    assert samples == plan.end_sample
    return steps


def test_split_batch_rotates_the_rows_that_do_not_divide():
    assert split_batch(10, 3) == [4, 3, 3]
    assert split_batch(10, 3, first=2) == [3, 3, 4]
    assert split_batch(11, 3, first=2) == [4, 3, 4]
    assert split_batch(9, 3, first=1) == [3, 3, 3]
    with pytest.raises(ValueError, match="global batch 1 is smaller than the number of workers 2"):
        split_batch(1, 2)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch", [7, 50, 64])
def test_every_remainder_trains_on_every_rank_and_the_phase_exactly(world, batch):
    """Phases of k full batches plus every remainder 0..batch-1 (1..N-1 are the ones that joined the last full step)
    on N = max_workers; and on fewer workers (an elastic run shrunk), which sees the same steps."""
    for full in (1, 2, 5):
        for rest in range(batch):
            n = full * batch + rest
            plan = _schedule([n], batch, world).phases[0]
            for ranks in range(1, world + 1):
                steps = _walk(plan, ranks)
                assert len(steps) == plan.steps, (n, ranks)
                assert all(min(s) >= 1 for s in steps), (n, ranks, steps)
                assert sum(map(sum, steps)) == n
                sizes = [sum(s) for s in steps]
                if 0 < rest < world:  # too small for a step of its own: the last full step takes it
                    assert sizes == [batch] * (full - 1) + [batch + rest] == [plan.batch_at(plan.start_sample + i * batch)
                                                                               for i in range(full)]
                    assert plan.last_batch == batch + rest
                else:
                    assert sizes == [batch] * full + ([rest] if rest else [])
                totals = [sum(col) for col in zip(*steps)]
                assert max(totals) - min(totals) <= 1, (n, ranks, totals)  # every rank within a row of n / N


def test_the_issue_config_now_has_a_step_for_every_sample():
    """``train.samples=650``, batch 64, 2 workers: the finetune phase is 65 = 64 + 1, which used to end in a 1-sample
    step ("global batch 1 is smaller than the number of workers 2")."""
    cfg = load_config("tiny", ["train.samples=650", "train.batch_size=64"])
    schedule = Schedule.from_config(cfg)
    assert [(p.samples, p.steps, p.last_batch) for p in schedule.phases] == [(585, 10, 9), (65, 1, 65)]
    for plan in schedule.phases:
        assert all(min(s) >= 1 for s in _walk(plan, 2))
    assert schedule.total_steps == 11


def _need_per_rank(steps: list[list[int]]) -> list[int]:
    return [sum(col) for col in zip(*steps)]


@pytest.mark.parametrize("world, batch", [(2, 63), (3, 50), (8, 1001), (64, 32769)])
def test_exactly_the_rows_the_margin_counts_are_enough_for_every_rank_and_restart(world, batch):
    """A long phase (1,000 steps plus a remainder) with a batch that does not divide, and a stream of exactly
    ``samples + 2 (N - 1)`` rows, the margin without its slack: each rank's equal share covers what it trains,
    from the start and from every checkpoint (a restart rebuilds the stream without the rows trained), on
    max_workers and on fewer. Always giving the first ranks the extra rows would starve rank 0."""
    n = 1000 * batch + batch // 3
    plan = _schedule([n], batch, world, min_workers=1).phases[0]
    rows = n + 2 * (world - 1)
    for ranks in sorted({1, max(1, world // 2), world - 1, world}):
        steps = _walk(plan, ranks)
        for k in (0, 1, 17, 500, len(steps) - 2, len(steps) - 1):
            left = rows - sum(map(sum, steps[:k]))  # the rebuilt stream: every row not trained before step k
            assert max(_need_per_rank(steps[k:])) <= left // ranks, (ranks, k)
    # The margin the driver uses covers it (its slack comes on top).
    cfg = from_dict({"model": "tiny", "phases": [{"name": "p", "image_size": 32, "text_length": 16, "samples": n}],
                     "train": {"samples": n, "batch_size": batch},
                     "scaling": {"min_workers": 1, "max_workers": world}, "data": {"shuffle_buffer": 0, "block_mb": 0}})
    slack = world * 4 * block_rows(cfg, 32)
    assert phase_rows_needed(cfg, plan) == rows + slack
    # The old split (the first B % N ranks one more in every step): rank 0 needs steps x (1 - (B % N) / N) rows
    # more than n / N, far more than the equal share and the slack.
    old = _need_per_rank([split_batch(sum(s), world) for s in _walk(plan, world)])
    assert max(old) - math.ceil(n / world) >= 1000 * (world - batch % world) // world - 1
    assert max(old) > (rows + slack) // world + 10 * world
