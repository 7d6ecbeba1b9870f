"""``reclip-ray train``: run the job, then print its summary table (or JSON) and draw report.png."""

from __future__ import annotations

import json
import sys
import time

from reclip_ray import storage
from reclip_ray.config import full_image_size, load_config
from reclip_ray.errors import ReclipError
from reclip_ray.run_names import EVAL_ERROR
from reclip_ray.train.launch import run_training
from reclip_ray.train.ray_errors import root_message


def train_from_cli(config: str | None, overrides: list[str], as_json: bool = False, verbose: bool = False) -> int:
    """Run the job; print the summary table (or, with ``as_json``, the final metrics as JSON) and draw report.png."""
    from reclip_ray.report import report_after_training, summary_table

    cfg = load_config(config, overrides)
    t0 = time.monotonic()
    try:
        metrics = run_training(cfg, console=True, verbose=verbose)
    except ReclipError:
        raise
    except Exception as exc:  # a worker's error arrives wrapped in Ray's; show the line that says what went wrong
        raise ReclipError(f"training failed: {root_message(exc)}") from None
    wall_s = time.monotonic() - t0
    uri = cfg.tracking.uri  # made absolute by prepare()
    png = report_after_training(metrics["run_dir"], uri, metrics["mlflow_run_id"])  # warns, never raises
    if as_json:
        final = {k: v for k, v in metrics.items()
                 if k.startswith("eval/") and not k.startswith("eval/full/") and ("top1" in k or "r@1" in k)}
        why = {EVAL_ERROR: metrics[EVAL_ERROR]} if metrics.get(EVAL_ERROR) else {}  # why the final model has none
        print(json.dumps({"final": final, **why, "run_dir": metrics["run_dir"],
                          "mlflow_run_id": metrics["mlflow_run_id"], "report": png}, indent=2))
        print(f"[reclip] model: {storage.join(metrics['run_dir'], 'model')}   "
              f"metrics: mlflow ui --backend-store-uri {uri}", file=sys.stderr)
    else:
        print(summary_table(metrics, wall_s=wall_s, run_dir=metrics["run_dir"], mlflow_run_id=metrics["mlflow_run_id"],
                            tracking_uri=uri, full_size=full_image_size(cfg),
                            report_png=png), flush=True)
    return 0
