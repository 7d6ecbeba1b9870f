"""A finished sweep's results: one row per trial (``trial_rows``), each trial's MLflow status set to what Tune saw,
and results.csv, pareto.png and best.yaml written to the sweep folder and its MLflow parent run."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from reclip_ray import storage
from reclip_ray.config import from_dict
from reclip_ray.job_dir import temporary_working_dir
from reclip_ray.run_names import EVAL_ERROR
from reclip_ray.sweep.plot import plot_sweep
from reclip_ray.sweep.space import Space, trial_params, trial_setup_of
from reclip_ray.sweep.trial_config import resolve_inputs, trial_raw

OUTPUTS = ("results.csv", "pareto.png", "best.yaml")


def trial_rows(grid: Any, space: Space, n_phases: int) -> list[dict[str, Any]]:
    """One row per trial of Tune's ``ResultGrid``: parameters, compute, metrics, and how it ended (completed,
    stopped_early: fewer phases finished than planned, or error)."""
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        cfg = trial_params(result.config or {})
        rounds = int(m.get("eval_round", 0) or 0)  # phases finished
        if result.error is not None:
            status = "error"
        elif rounds < int(m.get("eval_rounds_planned", n_phases)):
            status = "stopped_early"
        else:
            status = "completed"
        rows.append({
            "trial_id": m.get("trial_id", ""),
            **{f"param:{k}": v for k, v in cfg.items()},
            "gflops_spent": m.get("gflops_total", float("nan")),
            "budget_gflops": space.budget.get("gflops", ""),
            "samples": m.get("samples", 0),
            "phases": m.get("eval_rounds_planned", ""),
            "eval_rounds": rounds,
            space.metric: m.get(space.metric, float("nan")),
            **{k: v for k, v in sorted(m.items()) if k.startswith("eval/full/") and k != space.metric
               and ("top1" in k or "r@" in k)},
            "mlflow_run_id": m.get("mlflow_run_id", ""),
            "status": status,
            "error": _last_line(result.error) if result.error is not None else "",
            EVAL_ERROR: str(m.get(EVAL_ERROR) or "")[:200],  # why the metric is NaN (a failed/absent evaluation)
        })
    return rows


def trial_configs(grid: Any) -> dict[str, dict[str, Any]]:
    """Each trial's Tune config (its parameters and the ``_setup`` it ran with, which Tune saved at the sweep's
    start), by the trial id its rows carry; best.yaml is made from the best trial's."""
    return {str((result.metrics or {}).get("trial_id", "")): dict(result.config or {}) for result in grid}


def _last_line(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong: the last one (the first is Ray's actor banner)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def best_row(rows: list[dict[str, Any]], space: Space) -> dict[str, Any] | None:
    """The completed trial with the best metric (a trial stopped early, failed or without a metric is not one)."""
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(float(r[space.metric]))]
    if not done:
        return None
    sign = 1 if space.mode == "max" else -1
    return max(done, key=lambda r: sign * float(r[space.metric]))


def close_trial_runs(tracking_uri: str, parent: str, rows: list[dict[str, Any]]) -> None:
    """Make each trial's MLflow status say what Tune saw: completed -> FINISHED, stopped early -> KILLED,
    error -> FAILED. No MLflow run may stay RUNNING after the sweep.

    Tune stops a trial by tearing down its actor, sometimes while the trial is still writing its final report or
    export (ASHA also stops a trial that reaches the last round): its own ``end_run`` then never runs, or records
    the teardown as FAILED.

    A trial that reported nothing to Tune (it failed before its first phase end or rung) has no ``mlflow_run_id``
    in its row: its run is found by its ``reclip.trial_id`` tag, and the row gets the id.
    """
    from reclip_ray import tracking

    wanted = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED"}
    by_run = {r["mlflow_run_id"]: r for r in rows if r.get("mlflow_run_id")}
    by_trial = {r["trial_id"]: r for r in rows if r.get("trial_id")}
    for run in _trial_runs(tracking_uri, parent):
        row = by_run.get(run.info.run_id) or by_trial.get(run.data.tags.get("reclip.trial_id", ""))
        if row is not None and not row.get("mlflow_run_id"):
            row["mlflow_run_id"] = run.info.run_id
        status = wanted[row["status"]] if row is not None else "KILLED"
        if run.info.status != status and run.info.status in ("RUNNING", "FAILED", "KILLED"):
            tracking.end_run(tracking_uri, run.info.run_id, status)


def kill_running_trial_runs(tracking_uri: str, parent: str) -> None:
    """A sweep stopped mid-way without Tune's graceful stop (``ray job stop`` sends SIGTERM, and Ray's driver exits
    on it from inside Tune's loop): its trials' MLflow runs still RUNNING are KILLED. A rerun of the sweep resumes
    them. A trial's own run that ended (FINISHED, FAILED) keeps its status."""
    from reclip_ray import tracking

    for run in _trial_runs(tracking_uri, parent, "attributes.status = 'RUNNING'"):
        tracking.end_run(tracking_uri, run.info.run_id, "KILLED")


def _trial_runs(tracking_uri: str, parent: str, where: str = "") -> list[Any]:
    """The sweep's trial runs (children of its parent run), or those matching ``where``."""
    from reclip_ray import tracking

    c = tracking.client(tracking_uri)
    query = f"tags.mlflow.parentRunId = '{parent}'" + (f" and {where}" if where else "")
    return tracking.search_all_runs(c, [c.get_run(parent).info.experiment_id], query)


def write_outputs(rows: list[dict[str, Any]], space: Space, configs: dict[str, dict[str, Any]], *, sweep_dir: str,
                  storage_path: str, tracking_uri: str, parent: str) -> dict[str, Any]:
    """results.csv, pareto.png and best.yaml (from the best trial's own config in ``configs``: ``trial_configs``):
    drawn in a local temp folder, logged to MLflow from there, and each written whole into the sweep folder (one
    PUT each on an object store). Returns the sweep's summary."""
    import tempfile

    from reclip_ray import tracking

    best = best_row(rows, space)
    out: dict[str, Any] = {"sweep_dir": sweep_dir, "trials": len(rows),
                           "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
                           "errors": sum(r["status"] == "error" for r in rows), "mlflow_parent_run_id": parent}
    with tempfile.TemporaryDirectory(prefix="reclip-sweep-") as tmp:
        _write_csv(rows, os.path.join(tmp, "results.csv"))
        plot_sweep(rows, space, best, os.path.join(tmp, "pareto.png"))
        if best is not None:
            out["best"] = _write_best(best, space, configs[best["trial_id"]], storage_path,
                                      os.path.join(tmp, "best.yaml"))
            tracking.log_metrics(tracking_uri, parent, {f"best/{space.metric}": float(best[space.metric]),
                                                        "best/gflops": float(best["gflops_spent"])}, step=0)
        for name in OUTPUTS:
            local = os.path.join(tmp, name)
            if os.path.exists(local):
                with open(local, "rb") as fh:
                    storage.write_bytes(storage.join(sweep_dir, name), fh.read())
                tracking.log_artifact(tracking_uri, parent, local)
    _print_table(rows, space)
    return out


def _write_csv(rows: list[dict[str, Any]], local: str) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(local, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _write_best(best: dict[str, Any], space: Space, config: dict[str, Any], storage_path: str,
                local: str) -> dict[str, Any]:
    """best.yaml: the best trial's full config, which ``reclip-ray train --config best.yaml`` reruns.

    Made from the trial's own Tune ``config``: its parameters, and the base config and budget the sweep started
    with, which Tune resumed it with (a rerun's base may differ where the sweep's definition does not: a preset an
    upgrade changed). Inputs the base named relative are resolved against this launch's folder, as its trials
    resolved them, so that best.yaml runs from any folder; except in a Ray job's temporary copy of its working dir
    (``job_dir.temporary_working_dir``), a folder the next submit does not have: there they stay relative, for the
    launch that reruns it to resolve as the sweep's launches did (``trial_config.keep_relative_inputs``). The run
    goes to ``storage_path`` as ``<sweep>-best``."""
    setup, params = trial_setup_of(config), trial_params(config)
    raw = trial_raw(setup["base_raw"], params, setup["budget"])
    if temporary_working_dir() is None:
        raw = resolve_inputs(raw, os.getcwd())
    raw["run"]["name"] = f"{space.name}-best"
    raw["run"]["storage_path"] = storage_path  # a string: a Path would mangle s3://
    cfg = from_dict(raw)
    text = f"# best trial of sweep '{space.name}': {json.dumps(params)} -> {space.metric}={best[space.metric]:.4f}\n"
    with open(local, "w") as fh:
        fh.write(text + cfg.to_yaml())
    return {"params": params, space.metric: best[space.metric], "gflops": best["gflops_spent"]}


def _print_table(rows: list[dict[str, Any]], space: Space) -> None:
    params = [k for k in rows[0] if k.startswith("param:")] if rows else []
    head = [p[6:] for p in params] + ["GFLOPs", "/".join(space.metric.split("/")[-2:]), "status"]
    table = [[str(r[p]) for p in params] + [f"{float(r['gflops_spent']):.1f}", f"{float(r[space.metric]):.4f}", r["status"]]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
