"""The tracking relay: the workers' MLflow calls, run on the driver's node.

A local MLflow store (the default ``sqlite:///<cwd>/mlflow.db``, or any SQLite file) is a file on the driver's
machine. On a multi-node cluster rank 0 usually runs on another node, where that path is another, empty file (and the
model artifact would land in that node's ``mlartifacts``): the run's metrics would silently go elsewhere. So for a
local store the launcher starts a ``TrackingRelay`` actor on the driver's node (``start_relay``) and the workers send
their MLflow calls to it (``use_relay``): the functions of ``tracking.py`` marked ``@relayed`` run in the relay,
artifacts travel as bytes. About one call per log window, so the relay is never a bottleneck. A server URI
(``http://...``) is written directly.

A relay call waits at most ``RELAY_TIMEOUT_S`` and is tried ``RELAY_ATTEMPTS`` times; a write that still fails is a
warning in the worker's log, never a failed training step (a read, which decides what a restart logs, raises). A
worker that writes to a server directly (``use_relay(None, worker=True)``) has the same rule, with MLflow's own
HTTP retries bounded (``bound_mlflow_requests``).
A training worker never waits for its writes either: they are made in the order asked, by one thread of its own
(``_Writer``), so a slow or hung store costs rank 0's loop nothing, and with it every rank that would wait for rank 0
at the next collective. The worker waits for them, for a bounded time, only where they must have landed: before it
reports a checkpoint (a restart from it then logs no gap: it re-logs only the steps after the last one MLflow has;
``flush_before_checkpoint``), before a read, before an artifact and at the run's end (``flush_writes``).
Retries cannot write a point twice: every call carries an id that the relay runs once, and a metric's timestamp is
taken by the caller, so even a call Ray re-runs on a restarted relay writes the same (key, value, timestamp, step)
row, which MLflow's SQL store keeps once.

The relay knows nothing of MLflow: it runs the module-level functions it is sent (Ray pickles them by reference, so
the relay imports ``tracking`` itself), which keeps this module a leaf under ``tracking``.
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

RELAY_TIMEOUT_S = 60.0  # one metric batch, tag or read; a write this slow has met a hiccup, not a big batch
ARTIFACT_TIMEOUT_S = 900.0  # the model's bytes (a ViT-L export is ~1.7 GB)
RELAY_ATTEMPTS = 3
RELAY_BACKOFF_S = 2.0  # the wait before try k + 1 is k times this
_RELAY_REMEMBERS = 10_000  # call ids the relay keeps (hours of log windows)

_RELAY: Any = None  # set in a worker process by use_relay(); None: call MLflow directly
_WORKER = False  # a training worker (use_relay(..., worker=True)): a write that fails is a warning, not an error
# A worker's HTTP requests to an MLflow server, unless the user set them: 3 tries (MLflow's default is 8, with backoff
# up to 120 s). Each waits up to MLflow's 120 s for a reply (the model artifact's upload needs it), so a write to a
# server that hangs takes about 6 minutes (by arithmetic), in the write thread: the writes queued behind it wait, the
# training loop does not; with MLflow's own retries 3 writes to a server that was down took over 9 minutes (measured).
WORKER_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
# A worker's writes waiting for its writer thread while MLflow is down: one per log window, ~4.8 KB each (measured:
# 25 metrics), so ~48 MB at the cap. That is about 70 minutes of vit-b-16's 64 px phase on 64 GPUs (a window of 10
# steps every ~0.4 s) and hours at lower rates; past it the newest are dropped, with a warning, rather than grow the
# worker's memory for as long as MLflow stays down.
MAX_PENDING_WRITES = 10_000
# At a checkpoint: a store that is only slow catches up; a hung one costs 30 s once, not at every checkpoint while it
# stays hung (flush_before_checkpoint).
FLUSH_BEFORE_REPORT_S = 30.0
FLUSH_BEFORE_READ_S = 30.0
FLUSH_AT_END_S = 120.0  # before an artifact (the model, at the run's end), which then waits its own time
FLUSH_ON_EXIT_S = 10.0  # a worker's loop ending, on an error too (after the final report the queue is empty)
_WRITER: "_Writer | None" = None  # a worker's write thread (use_relay(..., worker=True))


def use_relay(relay: Any, *, worker: bool = False) -> None:
    """In this process, send the ``@relayed`` calls to ``relay`` (a TrackingRelay actor handle); None: direct.

    ``worker``: a training worker. A write that fails there is a warning whichever way it went (a server URI is
    written directly): MLflow down must not fail a training step, which restarts the whole worker group from its
    last checkpoint, and again at each write for as long as the server stays down, until ``run.max_failures`` ends
    the run. A driver's calls (the run's start and end) raise: without its MLflow run it cannot start or resume."""
    global _RELAY, _WORKER, _WRITER
    flush_writes(FLUSH_AT_END_S)  # the writes asked for so far go the way they were asked
    _RELAY, _WORKER = relay, worker
    if worker and _WRITER is None:
        _WRITER = _Writer(MAX_PENDING_WRITES)
    if worker and relay is None:
        bound_mlflow_requests()


def flush_writes(timeout_s: float) -> bool:
    """Wait, at most ``timeout_s``, until this worker's writes asked for so far are made (or failed, as warnings);
    True when they are. Without a write thread (not a worker) there is nothing to wait for."""
    return True if _WRITER is None else _WRITER.flush(timeout_s)


def flush_before_checkpoint(timeout_s: float, at: str) -> str | None:
    """Wait, at most ``timeout_s``, for this worker's writes before a checkpoint is reported (``at``: where, for the
    warning); None when they are made, else a warning. A wait that timed out is not made again until MLflow has made
    one of the queued writes: a server that hangs holds its write for minutes (``WORKER_HTTP_DEFAULTS``), and every
    checkpoint would pay ``timeout_s`` for nothing."""
    return None if _WRITER is None else _WRITER.flush_before_checkpoint(timeout_s, at)


def pending_writes() -> int:
    """This worker's writes not made yet (0 outside a worker)."""
    return 0 if _WRITER is None else _WRITER.pending


class _Writer:
    """One thread that makes a worker's MLflow writes in the order they were asked for (module docstring). Each
    write is a call that already turns its own failure into a warning (``direct_write``, ``through_relay``); the
    thread only keeps them in order and off the training loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0  # asked for and not yet made
        self.made = 0  # made (or failed, as warnings) so far
        self.dropped = 0
        self._stalled: tuple[int, str, float] | None = None  # (made, where, seconds): a checkpoint's wait timed out
        self._calls: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, what: str, call: Callable[[], Any]) -> None:
        with self._changed:
            if self.pending >= self.limit:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    print(f"[reclip] WARNING: MLflow is {self.pending} writes behind; {what} dropped "
                          f"({self.dropped} so far); training goes on without them", file=sys.stderr, flush=True)
                return
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="reclip-mlflow-writes", daemon=True)
                self._thread.start()
        self._calls.put(call)

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - the calls warn themselves; anything else must not stop the thread
                _warn("MLflow write", exc)
            finally:
                with self._changed:
                    self.pending -= 1
                    self.made += 1
                    self._changed.notify_all()

    def flush(self, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.pending == 0, timeout=timeout_s)

    def flush_before_checkpoint(self, timeout_s: float, at: str) -> str | None:
        with self._changed:
            if self.pending and self._stalled is not None and self._stalled[0] == self.made:
                _, since, waited = self._stalled
                return (f"{self.pending} MLflow write(s) still pending {at}, none made since the {waited:g} s wait "
                        f"{since}: not waiting again until MLflow answers (down or hung?); training goes on")
            if self._changed.wait_for(lambda: self.pending == 0, timeout=timeout_s):
                self._stalled = None
                return None
            self._stalled = (self.made, at, timeout_s)
            return (f"{self.pending} MLflow write(s) still pending after {timeout_s:g} s {at} (MLflow slow or down); "
                    "training goes on")


def bound_mlflow_requests() -> None:
    """``WORKER_HTTP_DEFAULTS`` in this process's environment, where the user has not set them (MLflow reads them at
    each request)."""
    for key, value in WORKER_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def direct_write(what: str, call: Callable[[], Any]) -> Any:
    """A write this process makes to MLflow itself: in a training worker one that fails is a warning (``use_relay``),
    elsewhere an error."""
    if not _WORKER:
        return call()
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - a server down, refusing, timing out: the run trains on without it
        _warn(f"MLflow {what} failed", exc)
        return None


def _warn(message: str, error: BaseException) -> None:
    lines = str(error).strip().splitlines() or [""]
    print(f"[reclip] WARNING: {message} ({type(error).__name__}: {lines[-1][:300]}); training goes on without it",
          file=sys.stderr, flush=True)


def active() -> bool:
    """Whether this process sends its MLflow calls to a relay."""
    return _RELAY is not None


def relayed(write: bool) -> Callable[[Callable], Callable]:
    """Run the function in the relay when this process has one (``use_relay``), through ``through_relay``; in a
    training worker a write is queued for its write thread and returns None at once, and a read waits for the
    writes asked before it.

    The function must be a module-level name (the relay receives the wrapped function by reference)."""

    def wrap(fn: Callable) -> Callable:
        def now(args: tuple, kwargs: dict) -> Any:
            if _RELAY is None:
                return direct_write(fn.__name__, lambda: fn(*args, **kwargs)) if write else fn(*args, **kwargs)
            return through_relay(fn.__name__, "call", (call, args, kwargs), write=write, timeout_s=RELAY_TIMEOUT_S)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _WRITER is not None and _WORKER:
                if write:  # the caller may change its dicts once this returns: the write takes copies
                    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
                    _WRITER.submit(fn.__name__, lambda: now(args, dict(kwargs)))
                    return None
                flush_writes(FLUSH_BEFORE_READ_S)
            return now(args, kwargs)

        return call

    return wrap


def through_relay(what: str, method: str, payload: tuple, *, write: bool, timeout_s: float) -> Any:
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
    message = f"MLflow {what} through the tracking relay failed {RELAY_ATTEMPTS} times"
    if not write:
        lines = str(error).strip().splitlines() or [""]
        raise RuntimeError(f"{message} ({type(error).__name__}: {lines[-1][:300]})") from error
    _warn(message, error)
    return None


def _wait(ref: Any, timeout_s: float) -> Any:
    import ray

    return ray.get(ref, timeout=timeout_s)


def read_files(path: Path) -> dict[str, bytes]:
    """A file or a folder's files as {relative path: bytes}, to send to the relay."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


class TrackingRelay:
    """Runs MLflow calls for the workers on the driver's node (see the module docstring). Apart from a call count
    it remembers only the ids of recent calls and their results, so that a retried call runs once; a restarted
    relay (``max_restarts``) forgets them, and a metric row written again is then the same row (module docstring)."""

    def __init__(self, warm_up: Callable[[], Any] | None = None) -> None:
        use_relay(None)  # this process talks to MLflow itself
        self.calls = 0
        self._done: collections.OrderedDict[str, Any] = collections.OrderedDict()
        if warm_up is not None:
            self._warm_up(warm_up)

    @staticmethod
    def _warm_up(warm_up: Callable[[], Any]) -> None:
        """Pay the store's first-call cost (importing MLflow, opening the SQLite store: ~1.5 s on 2 cores) while
        the worker group starts, instead of in rank 0's first call. A failure here is only a warning: that first
        call then tries again and reports what is wrong."""
        try:
            warm_up()
        except Exception as exc:  # noqa: BLE001
            print(f"[reclip] WARNING: the MLflow relay could not open the store ahead of time: {exc}",
                  file=sys.stderr, flush=True)

    def _once(self, call_id: str, run: Callable[[], Any]) -> Any:
        if call_id in self._done:
            return self._done[call_id]
        self.calls += 1
        result = run()  # an error is not remembered: the retry runs the call again
        self._done[call_id] = result
        while len(self._done) > _RELAY_REMEMBERS:
            self._done.popitem(last=False)
        return result

    def call(self, call_id: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """A ``@relayed`` function, run here without the relay."""
        return self._once(call_id, lambda: getattr(fn, "__wrapped__", fn)(*args, **kwargs))

    def call_with_files(self, call_id: str, fn: Callable, args: tuple, files: dict[str, bytes], single: bool,
                        kwargs: dict) -> None:
        """``log_artifact(s)``: the worker's files, rewritten here, then logged from the driver's node (``fn``'s
        third argument is the local path; ``single``: a file, else a folder)."""

        def run() -> None:
            with tempfile.TemporaryDirectory(prefix="reclip-relay-") as tmp:
                for rel, data in files.items():
                    target = Path(tmp) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                local = Path(tmp) / next(iter(files)) if single else Path(tmp)
                fn(args[0], args[1], local, *args[3:], **kwargs)

        return self._once(call_id, run)

    def stats(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "calls": self.calls}


def start_relay(name: str, warm_up: Callable[[], Any] | None = None, node_id: str | None = None) -> Any:
    """The run's relay actor, pinned to this (the driver's) node, or to ``node_id``; an existing one of that name
    is reused. A new one runs ``warm_up`` (e.g. opening the run's store) as it starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = node_id or ray.get_runtime_context().get_node_id()
    return ray.remote(TrackingRelay).options(
        name=name, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(warm_up)


def mark_home(name: str) -> Any:
    """A named actor that marks this node as the store's home, for processes that are drivers themselves and may
    run on any node (a sweep's trials): ``home_node(name)`` finds it, and their relays are pinned there. Keep the
    handle while they run: the actor goes with its last handle (or this process)."""
    return start_relay(name)


def home_node(name: str, timeout_s: float = 30.0) -> str | None:
    """The node ``mark_home(name)`` marked, or None when there is no such actor (or it does not answer)."""
    import ray

    try:
        return ray.get(ray.get_actor(name).stats.remote(), timeout=timeout_s)["node_id"]
    except (ValueError, ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None
