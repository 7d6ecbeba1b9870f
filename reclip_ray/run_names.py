"""Names that the driver, the training workers, the sweep and the report all use: files of the run folder, phase
datasets and seeds, and the metric names a sweep reads from a worker's reports.

A leaf module (it imports nothing of reclip_ray but the config type), so none of those modules has to import
another to agree on a name, and the report can read a run folder without importing torch or Ray.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reclip_ray.config import Config

# ------------------------------------------------------------------------------------------ the run folder
RUN_STATE_FILE = "reclip_run.json"  # the launcher's record: its MLflow run, attempts, the final evaluation
FATAL_FILE = ".fatal_error.json"  # a deterministic error of this run's workers (not retried)
DATA_START_DIR = ".data_start"  # phase<i>.json: where each phase's stream starts (the position the driver read)
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2 keeps its registered checkpoints here
FAULT_ENV = "RECLIP_FAIL_AT_SAMPLES"  # testing only: a sample count at which one rank raises once


# ------------------------------------------------------------------------------------------ phases
def phase_dataset_name(index: int) -> str:
    return f"phase{index}"


def phase_seed(cfg: "Config", phase_index: int) -> int:
    """The seed of a phase's stream (shard order, row order, crops): the same in every attempt of the run."""
    return cfg.train.seed * 1_000_003 + phase_index * 101


def shuffle_buffer_rows(cfg: "Config", local_batch: int) -> int:
    return 10 * local_batch if cfg.data.shuffle_buffer == -1 else cfg.data.shuffle_buffer


# ------------------------------------------------------------------------------------------ metrics a sweep reads
TIME_ATTR = "gflops_total"  # the training GFLOPs spent, in every report of the worker
FULL = "eval/full/"
EVAL_ERROR = "eval_error"  # in a report whose evaluation failed or did not run: why


def full_view(full_image_size: int, eval_metrics: dict[str, float]) -> dict[str, float]:
    """The full-resolution metrics again under ``eval/full/...``: one name for a sweep's metric, whatever each
    trial's full size is."""
    full = f"eval/{full_image_size}px/"
    return {FULL + k[len(full):]: v for k, v in eval_metrics.items() if k.startswith(full)}
