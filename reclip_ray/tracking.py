"""MLflow bookkeeping: one MLflow run per training run, continued across restarts and resizes.

The driver owns the run's lifecycle (create or reopen, end FINISHED/FAILED/KILLED); rank 0 of the worker group logs
per-step metrics into the same run by id. Nothing here relies on MLflow's "active run" (a thread-local that Ray
workers do not share), so every call names the run explicitly.

A local store (the default ``sqlite:///<cwd>/mlflow.db``, or any SQLite file) is a file on the driver's machine.
On a multi-node cluster rank 0 usually runs on another node, where that path is another, empty file (and the model
artifact would land in that node's ``mlartifacts``): the run's metrics would silently go elsewhere. So for a local
store the launcher starts a ``TrackingRelay`` actor on the driver's node and the workers send their MLflow calls
to it (``use_relay``): the calls below marked ``@_relayed`` run in the relay, artifacts travel as bytes. About one
call per log window, so the relay is never a bottleneck. A server URI (``http://...``) is written directly.

A relay call waits at most ``RELAY_TIMEOUT_S`` and is tried ``RELAY_ATTEMPTS`` times; a write that still fails is a
warning in the worker's log, never a failed training step (a read, which decides what a restart logs, raises).
Retries cannot write a point twice: every call carries an id that the relay runs once, and a metric's timestamp is
taken by the caller, so even a call Ray re-runs on a restarted relay writes the same (key, value, timestamp, step)
row, which MLflow's SQL store keeps once.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from reclip_ray.config import Config

# MLflow caps a param value at 6000 characters and a batch at 1000 metrics / 100 params.
_MAX_PARAM_LEN = 6000


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working directory.

    Absolute because Ray workers run in other directories: a relative ``sqlite:///mlflow.db`` would silently
    create a second, empty database next to each worker.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        return f"sqlite:///{Path(rel).resolve()}"
    if "://" not in uri:  # a bare path to a database file
        return f"sqlite:///{Path(uri).resolve()}"
    return uri


# ------------------------------------------------------------------------------------------------ relay

_RELAY: Any = None  # set in a worker process by use_relay(); None: call MLflow directly


def is_local_store(tracking_uri: str) -> bool:
    """A store that is a file on one machine (SQLite, a file: URI, a bare path), not a server every node reaches."""
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def use_relay(relay: Any) -> None:
    """In this process, send the ``@_relayed`` calls to ``relay`` (a TrackingRelay actor handle); None: direct."""
    global _RELAY
    _RELAY = relay


RELAY_TIMEOUT_S = 60.0  # one metric batch, tag or read; a write this slow has met a hiccup, not a big batch
ARTIFACT_TIMEOUT_S = 900.0  # the model's bytes (a ViT-L export is ~1.7 GB)
RELAY_ATTEMPTS = 3
RELAY_BACKOFF_S = 2.0  # the wait before try k + 1 is k times this
_RELAY_REMEMBERS = 10_000  # call ids the relay keeps (hours of log windows)


def _relayed(write: bool) -> Callable[[Callable], Callable]:
    """Run the function in the relay when this process has one (``use_relay``), through ``_through_relay``."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _RELAY is None:
                return fn(*args, **kwargs)
            return _through_relay(fn.__name__, "call", (fn.__name__, args, kwargs), write=write,
                                  timeout_s=RELAY_TIMEOUT_S)

        return call

    return wrap


def _through_relay(what: str, method: str, payload: tuple, *, write: bool, timeout_s: float) -> Any:
    """One relay call: a bounded wait, retried under the same call id (the relay runs an id once, so a reply lost
    to a timeout is not a second write); a write that fails every time is a warning, a read an error."""
    call_id = uuid.uuid4().hex
    error: Exception | None = None
    for attempt in range(1, RELAY_ATTEMPTS + 1):
        try:
            return _wait(getattr(_RELAY, method).remote(call_id, *payload), timeout_s)
        except Exception as exc:  # noqa: BLE001 - a timeout, a relay restarting, an MLflow error: all retried
            error = exc
            if attempt < RELAY_ATTEMPTS:
                time.sleep(RELAY_BACKOFF_S * attempt)
    lines = str(error).strip().splitlines() or [""]
    message = (f"MLflow {what} through the tracking relay failed {RELAY_ATTEMPTS} times "
               f"({type(error).__name__}: {lines[-1][:300]})")
    if not write:
        raise RuntimeError(message) from error
    print(f"[reclip] WARNING: {message}; training goes on without it", file=sys.stderr, flush=True)
    return None


def _wait(ref: Any, timeout_s: float) -> Any:
    import ray

    return ray.get(ref, timeout=timeout_s)


def _read_files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


class TrackingRelay:
    """Runs MLflow calls for the workers on the driver's node (see the module docstring). Apart from a call count
    it remembers only the ids of recent calls and their results, so that a retried call runs once; a restarted
    relay (``max_restarts``) forgets them, and a metric row written again is then the same row (module docstring)."""

    def __init__(self) -> None:
        use_relay(None)  # this process talks to MLflow itself
        self.calls = 0
        self._done: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def _once(self, call_id: str, run: Callable[[], Any]) -> Any:
        if call_id in self._done:
            return self._done[call_id]
        self.calls += 1
        result = run()  # an error is not remembered: the retry runs the call again
        self._done[call_id] = result
        while len(self._done) > _RELAY_REMEMBERS:
            self._done.popitem(last=False)
        return result

    def call(self, call_id: str, name: str, args: tuple, kwargs: dict) -> Any:
        fn = globals()[name]
        return self._once(call_id, lambda: getattr(fn, "__wrapped__", fn)(*args, **kwargs))

    def call_with_files(self, call_id: str, name: str, args: tuple, files: dict[str, bytes], single: bool,
                        kwargs: dict) -> None:
        """``log_artifact(s)``: the worker's files, rewritten here, then logged from the driver's node."""

        def run() -> None:
            with tempfile.TemporaryDirectory(prefix="reclip-relay-") as tmp:
                for rel, data in files.items():
                    target = Path(tmp) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                local = Path(tmp) / next(iter(files)) if single else Path(tmp)
                globals()[name](args[0], args[1], local, *args[3:], **kwargs)

        return self._once(call_id, run)

    def stats(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "calls": self.calls}


def start_relay(name: str) -> Any:
    """The run's relay actor, pinned to this (the driver's) node; an existing one of that name is reused."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(TrackingRelay).options(
        name=name, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote()


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


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=default_artifact_root(tracking_uri))


def start_or_resume_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    run_id: str | None,
    cfg: Config,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Reopen ``run_id`` if it exists (a restart), else create a run with the flattened config as params."""
    c = client(tracking_uri)
    if run_id:
        try:
            run = c.get_run(run_id)
            c.update_run(run_id, status="RUNNING")
            restarts = int(run.data.tags.get("reclip.restarts", "0")) + 1
            c.set_tag(run_id, "reclip.restarts", str(restarts))
            return run_id
        except Exception:  # deleted or from another store: start fresh rather than fail the job
            pass
    exp_id = get_or_create_experiment(tracking_uri, experiment)
    all_tags = {"mlflow.runName": run_name, "reclip.restarts": "0", **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    log_params(tracking_uri, run.info.run_id, flatten(cfg.to_dict()))
    return run.info.run_id


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(tracking_uri)
    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    # The timestamp is taken here, by the caller: a retried write is then the very same row (module docstring).
    ts = int(time.time() * 1000)
    _log_metric_rows(tracking_uri, run_id,
                     [(_metric_key(k), float(v), ts, int(step)) for k, v in metrics.items() if _is_number(v)])


@_relayed(write=True)
def _log_metric_rows(tracking_uri: str, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    from mlflow.entities import Metric

    items = [Metric(*row) for row in rows]
    c = client(tracking_uri)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


@_relayed(write=True)
def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    c = client(tracking_uri)
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    if _RELAY is not None:  # the files are on this node: send their bytes to the driver's node
        files = _read_files(Path(local_dir))
        payload = ("log_artifacts", (tracking_uri, run_id, None, artifact_path), files, False, {})
        _through_relay("log_artifacts", "call_with_files", payload, write=True, timeout_s=ARTIFACT_TIMEOUT_S)
        return
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(tracking_uri: str, run_id: str, local_file: str | Path, artifact_path: str | None = None) -> None:
    if _RELAY is not None:
        payload = ("log_artifact", (tracking_uri, run_id, None, artifact_path), _read_files(Path(local_file)), True, {})
        _through_relay("log_artifact", "call_with_files", payload, write=True, timeout_s=ARTIFACT_TIMEOUT_S)
        return
    client(tracking_uri).log_artifact(run_id, str(local_file), artifact_path)


@_relayed(write=False)
def last_logged_step(tracking_uri: str, run_id: str, key: str = "loss") -> int:
    """Highest step already logged for ``key`` (-1 if none): a resumed run skips steps it has already logged."""
    history = client(tracking_uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


@_relayed(write=False)
def latest_metric(tracking_uri: str, run_id: str, key: str) -> float | None:
    """The value logged at the highest step for ``key`` (None if never logged)."""
    history = client(tracking_uri).get_metric_history(run_id, key)
    if not history:
        return None
    return max(history, key=lambda m: (m.step, m.timestamp)).value


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
