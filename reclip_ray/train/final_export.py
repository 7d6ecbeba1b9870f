"""The run's last act on rank 0: the inference model and eval.json, next to the checkpoints and into MLflow."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from reclip_ray import storage, tracking
from reclip_ray.config import Config
from reclip_ray.folders import upload_folder
from reclip_ray.train import scratch
from reclip_ray.train.checkpoint import TrainState
from reclip_ray.train.phase_eval import eval_report


def export_run(cfg: Config, model: torch.nn.Module, tokenizer: Any, run_dir: str, tracking_uri: str, run_id: str,
               state: TrainState, eval_error: str | None) -> None:
    """Write the inference model and eval.json next to the checkpoints and into MLflow.

    The model folder is replaced whole (``folders.upload_folder``: a swap locally; on an object store a manifest
    that readers check the files against). eval.json goes last: the launcher reads it as the run's final metrics.
    It holds the last phase's evaluation of this model, or, where that failed or did not run (``eval_error``), why:
    never ``state.eval`` then, which is the previous phase's model's evaluation (at full resolution too). The same
    as the final report's evaluation (``eval_report``).
    """
    from reclip_ray.export import export_model

    # In this process's scratch folder: if the process dies here, the next worker on the node removes the ~600 MB
    with tempfile.TemporaryDirectory(prefix="export-", dir=scratch.process_folder()) as tmp:
        local = os.path.join(tmp, "model")
        export_model(model, tokenizer, cfg, local)
        final_eval = eval_report(0, cfg, state.eval, eval_error)
        eval_file = os.path.join(tmp, "eval.json")
        with open(eval_file, "w") as f:
            f.write(json.dumps(final_eval, indent=2, sort_keys=True))
        tracking.log_artifacts(tracking_uri, run_id, local, "model")
        tracking.log_artifact(tracking_uri, run_id, eval_file)
        upload_folder(local, storage.join(run_dir, "model"))
        storage.write_json(storage.join(run_dir, "eval.json"), final_eval)
    print(f"[reclip] exported model to {storage.join(run_dir, 'model')}", flush=True)  # the run's log
