"""What a person sees while a run trains: one progress display, drawn by the driver.

Rank 0 sends each log window's numbers and the run's events (a phase starts, an evaluation finishes, a warning)
to a small named actor, ``ProgressBoard``, with fire-and-forget calls (one per log window: nothing waits on
them). A thread in the driver polls the board and draws: on a terminal one live status line, redrawn in place,
with events printed above it; elsewhere (CI logs, ``ray job submit`` logs) one line per log window. The workers
print nothing to the console themselves, and Ray's own output goes to the run's log file
(``console.setup_logging``), so every line the user sees is printed once, by one process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, TextIO

import ray

BOARD_NAME = "reclip-progress-{run}"


class _ProgressBoard:
    """The latest log window and the events not yet shown, per run."""

    def __init__(self) -> None:
        self._window: dict[str, Any] = {}
        self._events: list[str] = []
        self._seq = 0

    def update(self, window: dict[str, Any]) -> None:
        self._seq += 1
        self._window = {**window, "seq": self._seq}

    def event(self, text: str) -> None:
        self._events.append(text)

    def take(self) -> tuple[dict[str, Any], list[str]]:
        events, self._events = self._events, []
        return self._window, events


ProgressBoard = ray.remote(num_cpus=0, max_restarts=-1)(_ProgressBoard)


def get_board(run: str, create: bool = False):
    """The run's board (created by the driver; the workers look it up by name, None if there is none)."""
    name = BOARD_NAME.format(run=run)
    if create:
        return ProgressBoard.options(name=name, get_if_exists=True).remote()
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def board_reader(board: Any) -> Callable[[], tuple[dict[str, Any], list[str]]]:
    return lambda: ray.get(board.take.remote(), timeout=10)


def format_window(w: dict[str, Any]) -> str:
    """One status line from a log window's numbers."""
    eta = w.get("eta_s", float("nan"))
    return (f"{w.get('phase_name', '?')} {int(w.get('image_size', 0))}px  step {int(w.get('step', 0))}/"
            f"{int(w.get('total_steps', 0))}  samples {int(w.get('samples', 0)):,}/{int(w.get('total_samples', 0)):,}  "
            f"loss {w.get('loss', float('nan')):.4f}  {w.get('samples_per_s', 0):,.0f} samples/s  "
            f"data-wait {w.get('data_wait_fraction', 0):.0%}  GFLOPs {w.get('gflops_total', 0):,.1f}  "
            f"ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # nan
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressDisplay:
    """The driver's thread that draws the board: a live line on a terminal, a line per window elsewhere.

    ``take`` returns the board's latest window and the events not yet shown (``board_reader(board)``; tests pass a
    plain function).
    """

    def __init__(self, take: Callable[[], tuple[dict[str, Any], list[str]]], stream: TextIO | None = None,
                 interval_s: float = 0.5, live: bool | None = None) -> None:
        self.take = take
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self.live = self.stream.isatty() if live is None else live
        self._seen = 0
        self._status = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reclip-progress", daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # what arrived after the last poll
        if self.live and self._status:
            self.stream.write("\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a display problem must never stop training
                pass

    def poll(self) -> None:
        window, events = self.take()
        for text in events:
            self._print_line(text)
        if window and window.get("seq", 0) > self._seen:
            self._seen = window["seq"]
            line = format_window(window)
            if self.live:
                self._status = line
                self.stream.write("\r\x1b[2K" + line)
                self.stream.flush()
            else:
                self._print_line(line)

    def _print_line(self, text: str) -> None:
        if self.live and self._status:
            self.stream.write("\r\x1b[2K" + text + "\n" + self._status)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


RAY_LOG = "ray.log"


def ray_log_file(run_dir: str) -> str:
    """Where this process appends Ray's output: ``RUN_DIR/ray.log``, or for a remote run folder (an object store
    has no append) a local file named after it, copied there by ``upload_ray_log`` when the run ends."""
    import hashlib
    import tempfile

    from reclip_ray import storage

    local = storage.local_path(run_dir)
    if local is not None:
        return os.path.join(local, RAY_LOG)
    digest = hashlib.sha1(storage.normalize(run_dir).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "reclip-ray-logs", f"{storage.name(run_dir)}-{digest}", RAY_LOG)


def upload_ray_log(run_dir: str, log_file: str | None) -> None:
    """Copy the local log of a remote run folder there (one upload of the whole file, earlier attempts included)."""
    from reclip_ray import storage

    if log_file is None or not storage.is_uri(run_dir) or not os.path.isfile(log_file):
        return
    with open(log_file, "rb") as f:
        storage.write_bytes(storage.join(run_dir, RAY_LOG), f.read())


def ray_log_place(run_dir: str, log_file: str) -> str:
    """Where ``redirect_ray_output`` writes, as the console says it: the file, and for a remote run folder where it
    is copied at the end (``copy_ray_log``)."""
    from reclip_ray import storage

    return log_file + (f", copied to {storage.join(run_dir, RAY_LOG)} at the end" if storage.is_uri(run_dir) else "")


def copy_ray_log(run_dir: str, log_file: str | None) -> None:
    """``upload_ray_log`` at the end of a run or a sweep: a failed copy is a warning, never the run's outcome."""
    try:
        upload_ray_log(run_dir, log_file)
    except Exception as exc:  # noqa: BLE001 - a log copy must not mask the run's own outcome
        print(f"[reclip] WARNING: could not copy {log_file} to {run_dir}: {exc}", file=sys.stderr, flush=True)


def _open_ray_log(run_dir: str) -> str:
    """``ray_log_file``, its folder made; for a remote run folder, first brought up to date with the ray.log there
    (``merged_log``), so the copy at the end keeps every launch's lines: earlier ones on other machines, and one on
    this machine killed before its copy."""
    from reclip_ray import storage

    path = ray_log_file(run_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if storage.is_uri(run_dir):
        try:
            remote = storage.read_bytes(storage.join(run_dir, RAY_LOG))
        except FileNotFoundError:
            return path
        local = b""
        if os.path.exists(path):
            with open(path, "rb") as f:
                local = f.read()
        merged = merged_log(local, remote)
        if merged != local:
            with open(path, "wb") as f:
                f.write(merged)
    return path


def merged_log(local: bytes, remote: bytes) -> bytes:
    """The run folder's ray.log (``remote``) and this machine's copy (``local``) as one log, losing neither.

    Every launch appends to its machine's copy and uploads it whole at its end. This machine's copy was stale when a
    launch on another machine had run since (a copy of it would drop that launch's lines), and ahead of the folder
    when a launch here was killed before its upload; both, when both happened. Whichever extends the other wins;
    two that diverged keep the folder's, then this machine's lines after their common start."""
    if local.startswith(remote):
        return local
    if remote.startswith(local):
        return remote
    common = len(os.path.commonprefix([local, remote]))
    common = local.rfind(b"\n", 0, common) + 1  # from a whole line
    return (remote + (b"" if remote.endswith(b"\n") else b"\n")
            + b"[reclip] lines of a launch on this machine that did not reach the run folder's ray.log:\n"
            + local[common:])


MLFLOW_STORE_SETUP = "mlflow.store.db.utils"  # MLflow's logger for a SQLite store's tables: made or upgraded

# Lines that say only what is expected here: kept in ray.log, off the console. The raylet's note on fractional-CPU
# tasks; the token authentication a new local Ray turns on by default (its warning that authentication is off is
# still shown).
_NOISE = ("PYTHON worker processes have been started", "Token authentication is enabled for this Ray cluster")


def redirect_library_logging(run_dir: str) -> str:
    """Ray's and Ray Data's Python logging, and MLflow's store set-up, to ``ray_log_file``: INFO lines to the file
    only, warnings and errors to both (less ``_NOISE``). Called before ``ray.init`` and before the run's first
    MLflow call, it also takes their start-up lines ("Started a local Ray instance", "Creating initial MLflow
    database tables"); a second call for the same file changes nothing. Returns the file."""
    import importlib

    # Each sets up its logger on its first import (Ray Data's drops the handlers it finds): first them, then ours
    for module in ("mlflow", "ray.data"):
        importlib.import_module(module)
    path = _open_ray_log(run_dir)
    ray_logger = logging.getLogger("ray")
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in ray_logger.handlers):
        return path
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Ray's logger, Ray Data's (it has its own handlers and does not propagate), MLflow's store set-up
    for name in ("ray", "ray.data", MLFLOW_STORE_SETUP):
        logging.getLogger(name).addHandler(handler)
    for name in ("ray", "ray.data", "mlflow"):
        for h in logging.getLogger(name).handlers:  # the console handlers (Ray's PlainRayHandler is a StreamHandler)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                if name != "mlflow":
                    h.setLevel(logging.WARNING)
                h.addFilter(_console_worthy)
    return path


def _noise(text: str) -> bool:
    return any(n in text for n in _NOISE)


def _console_worthy(record: logging.LogRecord) -> bool:
    if record.name == MLFLOW_STORE_SETUP and record.levelno < logging.WARNING:
        return False
    return not _noise(record.getMessage())


def redirect_ray_output(run_dir: str, own_warnings: bool = False) -> str | None:
    """Write Ray's output (the logs of its workers, actors, raylet and Ray Data, which the driver otherwise prints)
    to ``RUN_DIR/ray.log`` (``ray_log_file``) instead of the console; errors and warnings are still shown, and
    with ``own_warnings`` also the workers' ``[reclip] WARNING`` lines (a sweep's trials have no progress board to
    carry them). After ``ray.init``: its log dispatcher exists from then on. Includes ``redirect_library_logging``.
    Returns the file, or None when Ray's log dispatcher is not where this Ray version kept it (then Ray prints as
    usual)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # an internal API of Ray 2.x; without it Ray simply prints as usual
        return None
    path = redirect_library_logging(run_dir)
    log = open(path, "a", buffering=1)

    def to_file(data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or data.get("pid", "")
        shown = []
        for line in data.get("lines", []):
            log.write(f"({who}) {line}\n")
            if _worth_showing(line, data, own_warnings):
                shown.append(line)
        for line in shown:
            print(f"({who}) {line}", file=sys.stderr, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("reclip_ray_log", to_file)
    # Ray's error channel (what the raylet and the GCS tell this job: a worker killed, out of memory, more worker
    # processes than expected) prints through this module function, not the dispatcher: an error or a warning each
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: to_file({**data, "error_channel": True})
    return str(path)


def _worth_showing(line: str, data: dict[str, Any], own_warnings: bool = False) -> bool:
    """Errors and warnings reach the console (every message of Ray's error channel is one); everything else only
    the log file. Our own ``[reclip]`` lines reach it through the progress board, unless ``own_warnings`` (then
    their warnings are shown here)."""
    if _noise(line):
        return False
    if data.get("error_channel"):
        return True
    if line.startswith("[reclip] "):
        return own_warnings and "WARNING" in line
    return "ERROR" in line or "Error" in line or "Traceback" in line or "WARNING" in line
