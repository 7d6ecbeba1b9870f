"""MLflow bookkeeping: one MLflow run per training run, continued across restarts and resizes.

The driver owns the run's lifecycle (create or reopen, end FINISHED/FAILED/KILLED); rank 0 of the worker group logs
per-step metrics into the same run by id. Nothing here relies on MLflow's "active run" (a thread-local that Ray
workers do not share), so every call names the run explicitly.

A local store (the default ``sqlite:///<cwd>/mlflow.db``, or any SQLite file) is a file on the driver's machine, which
workers on other nodes cannot reach: there the calls marked ``@relayed`` run in the driver's ``TrackingRelay``
(``tracking_relay.py``), and artifacts travel to it as bytes. A server URI (``http://...``) is written directly.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from reclip_ray.config import Config
from reclip_ray.errors import ReclipError
from reclip_ray.tracking_relay import (ARTIFACT_TIMEOUT_S, FLUSH_AT_END_S, active, direct_write, flush_writes,
                                      read_files, relayed, start_relay, through_relay)

# MLflow caps a param value at 6000 characters and a batch at 1000 metrics / 100 params.
_MAX_PARAM_LEN = 6000


# Tracking URIs without "://" that are no path: MLflow's names for Databricks' (and Unity Catalog's) servers.
NAMED_STORES = ("databricks", "databricks-uc", "uc")


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working directory (in a
    ``ray job submit``'s temporary copy of it: in ``job_dir.output_base``, where a relative one is taken from too).

    Absolute because Ray workers run in other directories: a relative ``sqlite:///mlflow.db`` would silently
    create a second, empty database next to each worker. A bare path is an SQLite file; ``file:/x`` (a file store)
    and ``databricks`` are URIs, as MLflow reads them, though neither has "://".
    """
    from reclip_ray.job_dir import output_base

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{output_base() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        return f"sqlite:///{(output_base() / rel).resolve()}"
    if _bare_path(uri):  # a bare path to a database file
        return f"sqlite:///{(output_base() / os.path.expanduser(uri)).resolve()}"
    return uri


def _bare_path(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("file:") and uri not in NAMED_STORES


def is_local_store(tracking_uri: str) -> bool:
    """A store that is a file on one machine (SQLite, a file: URI, a bare path), not a server every node reaches: the
    workers then write through the relay (``tracking_relay``)."""
    return tracking_uri.startswith(("sqlite:", "file:")) or _bare_path(tracking_uri)


def default_artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, keep artifacts in an absolute folder beside the database (MLflow's default is cwd-relative)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").as_uri()
    return None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists to dotted keys, the same paths ``--set`` uses (``phases.0.image_size``)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def client(tracking_uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


# MLflow's largest page of search_runs (and its default): a sweep or experiment can hold more runs than one page.
SEARCH_PAGE = 1000


def search_all_runs(c, experiment_ids: list[str], filter_string: str = "", **kwargs: Any) -> list[Any]:
    """Every run ``MlflowClient.search_runs`` matches, over all its pages (one call returns at most one page)."""
    runs: list[Any] = []
    token = None
    while True:
        page = c.search_runs(experiment_ids, filter_string, max_results=SEARCH_PAGE, page_token=token, **kwargs)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def start_store_relay(run_name: str, tracking_uri: str, node_id: str | None = None) -> Any:
    """The run's relay to a local store (``tracking_relay``), named for the run, opening the store as it starts;
    on this node, or on ``node_id`` (a sweep trial's: the sweep driver's, where the store is)."""
    return start_relay(f"reclip-tracking-{run_name}", warm_up=functools.partial(client, tracking_uri),
                       node_id=node_id)


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=default_artifact_root(tracking_uri))


@relayed(write=False)  # a sweep trial's driver may run on any node: it reaches a local store through its relay
def start_or_resume_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    run_id: str | None,
    cfg: Config,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Reopen ``run_id`` if this store has it (a restart), else create a run with the flattened config as params."""
    c = client(tracking_uri)
    run = _run_to_resume(tracking_uri, run_id) if run_id else None
    if run is not None:
        c.update_run(run_id, status="RUNNING")
        restarts = int(run.data.tags.get("reclip.restarts", "0")) + 1
        c.set_tag(run_id, "reclip.restarts", str(restarts))
        return run_id
    exp_id = get_or_create_experiment(tracking_uri, experiment)
    all_tags = {"mlflow.runName": run_name, "reclip.restarts": "0", **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    log_params(tracking_uri, run.info.run_id, flatten(cfg.to_dict()))
    return run.info.run_id


def find_run(tracking_uri: str, run_id: str, doing: str) -> Any:
    """``run_id``'s run, or None where the store has no such run (SQLite, file and server stores all say
    RESOURCE_DOES_NOT_EXIST). Any other error (a server that does not answer, a locked database) is a one-line
    ``ReclipError``, "MLflow at URI ``doing``: its first line": read as "no such run", a run would seem lost, or a
    restart would start a second run and split the run's history in two."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        error: Exception = exc
    except Exception as exc:  # noqa: BLE001 - the store's own errors (a connection, a file), named below
        error = exc
    lines = str(error).strip().splitlines() or [type(error).__name__]
    raise ReclipError(f"MLflow at {tracking_uri} {doing}: {lines[0][:300]}") from error


def _run_to_resume(tracking_uri: str, run_id: str) -> Any:
    """``run_id``'s run, or None where a new run is right: the store has no such run (the run folder's run is in
    another store) or it was deleted (a resumed run would log into a run no one sees). Any other error is one
    (``find_run``)."""
    run = find_run(tracking_uri, run_id, f"could not read run {run_id}, which this run continues (no new run "
                                         "started: rerun once it can)")
    return None if run is None or run.info.lifecycle_stage == "deleted" else run


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(tracking_uri)
    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    # The timestamp is taken here, by the caller: a retried relay write is then the very same row (tracking_relay).
    ts = int(time.time() * 1000)
    _log_metric_rows(tracking_uri, run_id,
                     [(_metric_key(k), float(v), ts, int(step)) for k, v in metrics.items() if _is_number(v)])


@relayed(write=True)
def _log_metric_rows(tracking_uri: str, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    from mlflow.entities import Metric

    items = [Metric(*row) for row in rows]
    c = client(tracking_uri)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


@relayed(write=True)
def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Keys as metric names are kept (``_metric_key``): some hold a phase's name (``reclip.eval_error.PHASE``), and
    MLflow refuses the whole batch for one character it does not take (``lowres (32 px)``)."""
    from mlflow.entities import RunTag

    c = client(tracking_uri)
    c.log_batch(run_id, tags=[RunTag(_metric_key(k), str(v)) for k, v in tags.items()])


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Logged now, after this worker's queued writes (a model's bytes wait their own, longer time)."""
    flush_writes(FLUSH_AT_END_S)
    if active():  # the files are on this node: send their bytes to the driver's node
        files = read_files(Path(local_dir))
        payload = (log_artifacts, (tracking_uri, run_id, None, artifact_path), files, False, {})
        through_relay("log_artifacts", "call_with_files", payload, write=True, timeout_s=ARTIFACT_TIMEOUT_S)
        return
    direct_write("log_artifacts", lambda: client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path))


def log_artifact(tracking_uri: str, run_id: str, local_file: str | Path, artifact_path: str | None = None) -> None:
    flush_writes(FLUSH_AT_END_S)
    if active():
        payload = (log_artifact, (tracking_uri, run_id, None, artifact_path), read_files(Path(local_file)), True, {})
        through_relay("log_artifact", "call_with_files", payload, write=True, timeout_s=ARTIFACT_TIMEOUT_S)
        return
    direct_write("log_artifact", lambda: client(tracking_uri).log_artifact(run_id, str(local_file), artifact_path))


@relayed(write=False)
def last_logged_step(tracking_uri: str, run_id: str, key: str = "loss") -> int:
    """Highest step already logged for ``key`` (-1 if none): a resumed run skips steps it has already logged."""
    latest = _latest_point(tracking_uri, run_id, key)
    return -1 if latest is None else latest.step


@relayed(write=False)
def latest_metric(tracking_uri: str, run_id: str, key: str) -> float | None:
    """The value logged at the highest step for ``key`` (None if never logged)."""
    latest = _latest_point(tracking_uri, run_id, key)
    return None if latest is None else latest.value


def _latest_point(tracking_uri: str, run_id: str, key: str) -> Any:
    """``key``'s point at its highest step (then latest timestamp), from the run itself: MLflow keeps each metric's
    latest point with the run, so a restart reads one row per key, not the key's whole history. A multi-day run
    logs hundreds of thousands of ``loss`` points: at 200,000 the history took 6.3 s to read from SQLite and 18 s
    from a server, the run 0.01 and 0.02 s (BENCHMARKS.md, "MLflow reads at a restart"); a read through the relay
    that takes over 60 s fails."""
    for point in client(tracking_uri).get_run(run_id).data.to_proto().metrics:  # public; carries each point's step
        if point.key == key:
            return point
    return None


@relayed(write=True)
def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """FINISHED, FAILED or KILLED: a run must never be left RUNNING."""
    client(tracking_uri).set_terminated(run_id, status=status)


def _metric_key(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def metric_history(tracking_uri: str, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    c = client(tracking_uri)
    return {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in keys}
