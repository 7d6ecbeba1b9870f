"""The launcher's own record of a run (``RUN_STATE_FILE`` in the run folder): its MLflow run, its attempts, and once
it finished, its final metrics, which a rerun of the same command returns without training again.
"""

from __future__ import annotations

from typing import Any

from reclip_ray import storage
from reclip_ray.run_names import RUN_STATE_FILE


def read_run_state(run_dir: str) -> dict[str, Any]:
    """The record, {} before the first launch. One small read per launch (on S3 a HEAD and a GET)."""
    return storage.read_json(storage.join(run_dir, RUN_STATE_FILE), default={})


def write_run_state(run_dir: str, state: dict[str, Any]) -> None:
    storage.write_json(storage.join(run_dir, RUN_STATE_FILE), state)


def record_finished(run_dir: str, metrics: dict[str, Any]) -> None:
    """Keep the final metrics (the plain values) in the record: the next launch of this run has nothing to do."""
    done = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    write_run_state(run_dir, {**read_run_state(run_dir), "finished": done})


def final_eval(run_dir: str) -> dict[str, float | str]:
    """The last evaluation, as the workers exported it (Ray Train returns the last checkpoint's metrics, and the
    phase-end checkpoint is written before its evaluation), or ``eval_error``: why the final model has none."""
    final = storage.read_json(storage.join(run_dir, "eval.json"), default={})
    return {k: v if isinstance(v, str) else float(v) for k, v in final.items()}
