"""Names that the driver, the training workers, the sweep and the report all use: files of the run folder, phase
datasets and seeds, and the metric names a sweep reads from a worker's reports.

A leaf module (it imports nothing of reclip_ray but the config type), so none of those modules has to import
another to agree on a name, and the report can read a run folder without importing torch or Ray.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


def stream_layout(cfg: "Config") -> dict[str, Any]:
    """The config keys that number a phase stream's units and positions (``data.stream``), with their values. A
    checkpoint's data position means something only in a stream laid out by the same values: it stores them, and a
    relaunch refuses other ones (``train.handover.check_stream_layout``) instead of skipping or repeating rows."""
    return {"train.seed": cfg.train.seed, "data.group_shards": cfg.data.group_shards,
            "data.chunk_rows": cfg.data.chunk_rows, "data.shuffle": cfg.data.shuffle}


def shuffle_buffer_rows(cfg: "Config", local_batch: int) -> int:
    return 10 * local_batch if cfg.data.shuffle_buffer == -1 else cfg.data.shuffle_buffer


JPEG_ROW_BYTES = 64 << 10  # data.decode_device=cuda sends JPEG bytes, not pixels: a generous mean per row


def row_bytes(image_size: int, on_device: bool = False) -> int:
    """Bytes of one row's image in a phase's stream: decoded uint8 pixels, or (``data.decode_device=cuda``) the
    JPEG the worker decodes."""
    return JPEG_ROW_BYTES if on_device else 3 * image_size**2


def block_rows(cfg: "Config", image_size: int) -> int:
    """Rows per block of a phase's stream (``data.pipeline``: one decode batch): about ``data.block_mb`` MB of
    decoded rows, at least ``data.decode_batch_size`` rows and at most one read unit (``group_shards x
    chunk_rows`` rows); ``data.block_mb=0``: ``decode_batch_size`` rows.

    Why bytes and not rows: every block passes through the phase's one split coordinator (``streaming_split``), an
    actor that spends about 0.9 ms of CPU per block whatever it holds (``benchmarks/split_blocks.py``,
    BENCHMARKS.md), so it serves about 1,100 blocks/s. At one row count for every phase, the 64 px phase sends
    blocks ~9x as often as the 224 px phase (its samples/s are ~9x, by the FLOPs): 64-row blocks cap it at ~70k
    samples/s for the whole cluster, a few GPUs' worth. A size in bytes, with samples/s about inversely
    proportional to the pixels, keeps the blocks/s about the same in every phase, set by the full-resolution one.
    The cap at one unit keeps a read task's memory at one unit of raw bytes and the rows in flight (which a
    restart reads again and the data position tracks) near a unit per block where images are tiny."""
    d = cfg.data
    if d.block_mb <= 0:
        return d.decode_batch_size
    per_row = row_bytes(image_size, d.decode_device == "cuda")
    return max(d.decode_batch_size, min(d.group_shards * d.chunk_rows, int(d.block_mb * (1 << 20) // per_row)))


# ------------------------------------------------------------------------------------------ metrics a sweep reads
TIME_ATTR = "gflops_total"  # the training GFLOPs spent, in every report of the worker
FULL = "eval/full/"
EVAL_ERROR = "eval_error"  # in a report whose evaluation failed or did not run: why


def full_view(full_image_size: int, eval_metrics: dict[str, float]) -> dict[str, float]:
    """The full-resolution metrics again under ``eval/full/...``: one name for a sweep's metric, whatever each
    trial's full size is."""
    full = f"eval/{full_image_size}px/"
    return {FULL + k[len(full):]: v for k, v in eval_metrics.items() if k.startswith(full)}
