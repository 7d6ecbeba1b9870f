"""How a step's global batch is split over the ranks: exact, and rotating the rows that do not divide."""

from __future__ import annotations

from typing import Any


def split_batch(global_batch: int, world_size: int, first: int = 0) -> list[int]:
    """Per-rank batch sizes that add up to the global batch exactly: ranks ``first``, ``first + 1``, ... (wrapping
    around) take the rows that do not divide, one each."""
    base, extra = divmod(global_batch, world_size)
    if base == 0:
        raise ValueError(f"global batch {global_batch} is smaller than the number of workers {world_size}")
    return [base + (1 if (r - first) % world_size < extra else 0) for r in range(world_size)]


def step_split(plan: Any, samples_seen: int, world_size: int) -> list[int]:
    """Every rank's rows in the step of ``plan`` that starts at ``samples_seen``.

    The rows that do not divide go to the next ranks in turn, continuing where the step before left off (step k of
    the phase starts at rank ``k * (batch % world) % world``), so over any run of steps each rank trains within one
    row of ``rows / world``. That is what ``streaming_split(equal=True)`` gives each rank of the phase's stream;
    always favouring the first ranks would make rank 0 need ``steps x (1 - (batch % world) / world)`` rows more than
    its share. A function of the sample count, so a restart continues the rotation where the checkpoint left it.
    """
    k = (samples_seen - plan.start_sample) // plan.batch_size
    return split_batch(plan.batch_at(samples_seen), world_size, first=k * (plan.batch_size % world_size) % world_size)
