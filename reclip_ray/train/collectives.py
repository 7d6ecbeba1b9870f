"""The few collectives the worker's loop runs besides DDP's and the loss's: never per step, only at log windows,
checkpoints and phase ends (at 64 ranks an all-gather of a few small objects, milliseconds). With one rank they
are plain returns, so a single worker needs no process group.
"""

from __future__ import annotations

from typing import Any

import torch


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: list[int], world: int, device: torch.device) -> list[int]:
    """The element-wise sum of every rank's integers (one small all-reduce on the training device: nccl reduces
    GPU tensors only)."""
    if world == 1:
        return [int(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def steps_on_every_rank(step: int, world: int, device: torch.device) -> list[int]:
    """Every rank's step count at a phase end; raises if they differ.

    Equal counts are what keeps the collectives (DDP's all-reduce, the loss's all-gather, ``report``) paired up; a
    rank that took one step more would hang the others on a real cluster, so a mismatch fails loudly instead.
    """
    if world == 1:
        return [step]
    import torch.distributed as dist

    steps = torch.tensor([step], dtype=torch.int64, device=device)  # nccl gathers GPU tensors only
    gathered = [torch.zeros_like(steps) for _ in range(world)]
    dist.all_gather(gathered, steps)
    out = [int(t.item()) for t in gathered]
    if len(set(out)) != 1:
        raise RuntimeError(f"ranks disagree on the step count at a phase end: {out}")
    return out
