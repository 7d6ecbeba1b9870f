"""The ``torch.distributed`` steps of evaluation sharded over the ranks of a training run.

Every rank calls the same functions in the same order: each takes a contiguous ``block`` of the work, runs it in
lockstep with the others (``agree``: an error on one rank stops every rank within one unit of work, so collectives
stay paired), the results are gathered (``gather_rows``) and whatever needs computing once runs on rank 0
(``from_rank0``). Work is written as step generators (one ``yield`` per unit of work, the result as the return
value) so that one rank runs it with ``run_steps`` and several with ``agree``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from reclip_ray.errors import ReclipError


def block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of ``n`` items (sizes differ by at most one)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def run_steps(steps: Iterator[Any]) -> Any:
    """Run a step generator to its end on one rank; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def one_step(fn: Callable[[], Any]) -> Iterator[None]:
    """``fn`` as a one-step generator for ``agree``: the first ``next`` runs it and stops with its result."""
    return fn()
    yield  # unreachable: makes this a generator


def agree(steps: Iterator[Any], world_size: int, device: str | torch.device) -> Any:
    """Run the generator ``steps`` (one unit of work per ``next``; its return value is the result) on every rank
    in lockstep, so that an error on one rank stops every rank within one unit of work.

    After each unit the ranks all-reduce two flags (failed here, still working), one tiny collective per unit
    (an eval batch): a rank whose slice failed (an unreadable shard, say) would otherwise leave the others waiting
    in the next collective until they finished their own slices, or until the collective timeout when that takes
    longer. A rank that is done keeps answering until every rank is. The failing rank raises its own error; the
    others raise a ReclipError that names it.
    """
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    working = True
    while True:
        if working:
            try:
                next(steps)
            except StopIteration as stop:
                result, working = stop.value, False
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error, working = exc, False
        flags = torch.tensor([error is not None, working], dtype=torch.int64, device=device)
        dist.all_reduce(flags)
        failed, busy = flags.tolist()
        if failed or not busy:
            break
    if not failed:
        return result
    steps.close()  # a rank stopped early: its generator's ``finally`` (the model's train mode) runs now
    errors: list[Any] = [None] * world_size
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    r, message = next((r, e) for r, e in enumerate(errors) if e is not None)
    raise ReclipError(f"evaluation failed on rank {r}: {message}")


def gather_rows(local: torch.Tensor | None, world_size: int, device: str | torch.device) -> list[torch.Tensor]:
    """Every rank's ``[n_r, ...]`` tensor (n_r may differ, or be None = no rows), on CPU, in rank order.

    ``dist.all_gather`` needs equal shapes, so the row counts (and the trailing shape, which a rank without rows
    does not know) are exchanged first and each tensor is padded to the largest. The tensors travel on ``device``
    (NCCL gathers GPU tensors only).
    """
    import torch.distributed as dist

    shape = None if local is None else (int(local.shape[0]), tuple(local.shape[1:]), str(local.dtype))
    shapes: list[Any] = [None] * world_size
    dist.all_gather_object(shapes, shape)
    known = [s for s in shapes if s is not None]
    if not known:
        return [torch.zeros(0) for _ in range(world_size)]
    _, tail, dtype_name = known[0]
    dtype = getattr(torch, dtype_name.split(".")[-1])
    counts = [s[0] if s is not None else 0 for s in shapes]
    buf = torch.zeros((max(counts), *tail), dtype=dtype, device=device)
    if local is not None and local.shape[0]:
        buf[: local.shape[0]] = local.to(device)
    out = [torch.empty_like(buf) for _ in range(world_size)]
    dist.all_gather(out, buf)
    return [o[:n].cpu() for o, n in zip(out, counts)]


def from_rank0(fn: Callable[[], Any], rank: int, world_size: int) -> Any:
    """``fn()`` on rank 0 only (the metrics: once, not once per rank), its result or error broadcast to all."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value if isinstance(value, Exception) else ReclipError(str(value))
    return value
