"""Testing aids in the worker's loop: a planted failure (``fault.fail_at_samples``), a slowed step
(``fault.step_delay_s``, gated by ``fault.step_delay_while``) and the row log (``fault.record_rows``) that shows
which rows each rank trained. All are off in a real run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from reclip_ray import storage
from reclip_ray.config import Config
from reclip_ray.run_names import FAULT_ENV
from reclip_ray.train.checkpoint import TrainState


def fault_marker(run_dir: str) -> str:
    """The file that remembers an injected fault (so a restarted run does not fail again at the same count)."""
    return storage.join(run_dir, ".fault_injected")


def maybe_inject_fault(cfg: Config, state: TrainState, prev_samples: int, rank: int, marker: str) -> None:
    """Testing only: make one rank raise once when the run crosses ``fault.fail_at_samples``.

    "Once" is remembered by a marker file in the run folder, so the restarted run does not fail again at the same
    sample count (a rerun with another ``fail_at_samples`` fails once more).
    """
    at = int(os.environ.get(FAULT_ENV, "0") or 0) or cfg.fault.fail_at_samples
    if not at or rank != cfg.fault.fail_rank or not (prev_samples < at <= state.samples):
        return
    seen = storage.read_json(marker)
    if seen is not None and seen.get("at", at) == at:
        return
    storage.write_json(marker, {"at": at, "samples": state.samples, "time": time.time()})
    raise RuntimeError(f"fault injected at {state.samples} samples on rank {rank} (fault.fail_at_samples={at})")


def step_delay_s(cfg: Config) -> float:
    """Testing only: the seconds to sleep after a step. ``fault.step_delay_s`` keeps a short test run training
    while the test acts on it (removes a node, kills a worker); with ``fault.step_delay_while`` it applies only
    while that file exists, so the test deletes the file once it has done so and the run finishes at full speed
    instead of crawling through a margin sized for the slowest machine.

    The file is a local path: a test on the workers' machine flips it (the simulated cluster's nodes share one
    disk). Cost: one stat() per step per rank when the file is set, nothing otherwise.
    """
    fault = cfg.fault
    if not fault.step_delay_s or (fault.step_delay_while and not os.path.exists(fault.step_delay_while)):
        return 0.0
    return fault.step_delay_s


class RowLog:
    """Testing only (``fault.record_rows``): the keys each rank trains at each step, one JSON line per step.

    A local file is appended to; an object store has no append, so there the whole file is rewritten each step
    (one upload per step, fine for the tests this exists for).
    """

    def __init__(self, run_dir: str, rank: int, restarts: int, world: int) -> None:
        self.path = storage.join(run_dir, "rows", f"rank{rank}-start{restarts}-{os.getpid()}.jsonl")
        self.local = storage.local_path(self.path)
        if self.local is not None:
            os.makedirs(os.path.dirname(self.local), exist_ok=True)
        self.lines: list[str] = []
        self.world = world

    def write(self, step: int, phase: int, batch: dict[str, Any]) -> None:
        line = json.dumps({"step": step, "phase": phase, "t": time.time(), "world": self.world,
                           "keys": [str(k) for k in batch["key"]],
                           "passes": [int(p) for p in batch["_pass"]]}) + "\n"
        if self.local is not None:
            with open(self.local, "a") as f:
                f.write(line)
            return
        self.lines.append(line)
        storage.write_text(self.path, "".join(self.lines))
