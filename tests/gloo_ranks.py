"""A gloo group of a few processes on this machine, for the tests of collectives that run without Ray.

Each test's rank function calls ``join`` first and ``leave`` last, and the test starts them with ``spawn``. A rank
ends in ``os._exit`` once its results are on disk: the interpreter's own shutdown is where the threads of gloo (and
of pyarrow, which some ranks read with) can abort the process with SIGABRT, "terminate called without an active
exception" (pytorch/pytorch#179291). A full suite saw one rank end so, which failed every test of its module; the
results a test reads are its files, so nothing is lost by skipping that shutdown.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any, Callable, NoReturn

import torch


def join(rank: int, world: int, init_file: str, timeout_s: float = 60.0) -> None:
    """Join the group through ``init_file``, on one thread. The timeout is short so that a rank left alone in a
    collective fails its test in a minute, not in gloo's default 30."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave() -> NoReturn:
    """Wait for every rank (so each has written its results), leave the group and end this process at once."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# What the ranks of this suite import (torch; open_clip's loss, the one we check ours against, alone ~3 s more; the
# trainer's step and evaluation), loaded once into the forkserver that they are forked from (below).
PRELOAD = ["gloo_ranks", "torch.distributed", "torch.nn.parallel", "open_clip.loss", "reclip_ray.train.step",
           "reclip_ray.evaluation.dataset", "pyarrow.parquet"]


def spawn(rank_main: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``rank_main(rank, *args)`` in ``world`` processes and wait for them; a rank that fails (an exception,
    or an exit status other than 0) fails the caller.

    The ranks are forked from a forkserver: one clean, single-threaded process per test session that has imported
    torch once, not a fresh interpreter per rank that imports it again (spawn: ~3 s of CPU each, 26 ranks a suite).
    Not forked from pytest's own process, which holds threads (Ray's, torch's) that a fork would copy half of."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # read when the server first starts
    mp.start_processes(rank_main, args=args, nprocs=world, join=True, start_method="forkserver")
