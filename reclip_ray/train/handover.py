"""The small files by which one start of a run's worker group hands over to the next, in the run folder.

Ray Train restores the latest checkpoint it registered (``latest_checkpoint_state`` reads which); the dataset factory
records which checkpoint each phase's stream was rebuilt from (``record_data_start``), and the workers check they
restored the same one (``check_data_start``); a deterministic error of the workers (``write_fatal``) ends the run at
the next start (``raise_if_fatal``) instead of being retried; a relaunch that changed how the stream is numbered
refuses to resume its position (``check_stream_layout``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from reclip_ray import storage
from reclip_ray.errors import DataError, ReclipError
from reclip_ray.run_names import CHECKPOINT_SNAPSHOT, DATA_START_DIR, FATAL_FILE


def latest_checkpoint_state(run_dir: str) -> tuple[str, dict[str, Any]]:
    """(name, meta.json) of the checkpoint Ray Train restores next: the latest registered one; ("", {}) if none.

    Two small reads (Ray Train's snapshot, the checkpoint's meta.json; on S3 a HEAD and a GET each) per call: once
    per phase at each worker-group start.
    """
    from reclip_ray.train.checkpoint import META_FILE

    snapshot = storage.read_json(storage.join(run_dir, CHECKPOINT_SNAPSHOT), default={})
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not latest:
        return "", {}
    return latest, json.loads(storage.read_text(storage.join(run_dir, latest, META_FILE)))


def check_stream_layout(run_dir: str, now: dict[str, Any]) -> None:
    """Refuse a relaunch whose stream is numbered otherwise than the data position it would resume.

    A checkpoint's data position counts the units and rows of a stream laid out by a few config values, stored
    beside it (``run_names.stream_layout``); restored under other ones it would skip or repeat rows. A relaunch that
    changed one (``now``: this launch's) refuses in one line that names it, before MLflow or Ray. A checkpoint at a
    phase end (the next phase starts afresh) or from before the layout was stored is not checked.
    """
    checkpoint, meta = latest_checkpoint_state(run_dir)
    saved = (meta.get("data") or {}).get("layout") if not meta.get("phase_done") else None
    changed = [key for key in now if saved and key in saved and saved[key] != now[key]]
    if changed:
        raise DataError(f"checkpoint {checkpoint}'s data position was made with "
                        f"{' '.join(f'{key}={saved[key]}' for key in changed)}, this launch has "
                        f"{' '.join(f'{key}={now[key]}' for key in changed)}: resuming would skip or repeat rows; "
                        f"rerun with {' '.join(f'--set {key}={saved[key]}' for key in changed)} (or a new run.name)")


def raise_if_fatal(run_dir: str) -> None:
    """End the run at a worker-group start when the last group died of a deterministic error (see the worker)."""

    fatal = storage.read_json(storage.join(run_dir, FATAL_FILE))
    if fatal is not None:
        raise DataError(fatal["message"])


RAY_DATA_ADVICE = re.compile(r"\nFailed to .* after \d+/\d+ attempts \(total backoff")  # Ray 2.60's suffix


def write_fatal(run_dir: str, exc: BaseException) -> None:
    """Every rank that hit it writes the same small file (3 requests on S3: pyarrow uploads in parts); the last
    one wins. A failed write is printed, never raised: it must not hide the error it was recording.

    ``exc`` may be our error as Ray raised it in the worker (a ``RayTaskError(DataError)`` from a data task, whose
    text is the remote traceback): the file keeps our class's name and our message, as for one raised here."""
    from ray.exceptions import RayTaskError

    path = storage.join(run_dir, FATAL_FILE)
    inner = exc
    while isinstance(inner, RayTaskError) and isinstance(inner.cause, BaseException):
        inner = inner.cause  # Ray's wrapper class derives from ours: "RayTaskError(DataError)"
    if isinstance(inner, ReclipError):  # Ray Data appends its retry advice to the message of a task's error
        kind, message = type(inner).__name__, RAY_DATA_ADVICE.split(str(inner), maxsplit=1)[0]
    else:  # not ours (the worker records only ours): as it is
        kind, message = type(exc).__name__, str(exc)
    try:
        storage.write_json(path, {"type": kind, "message": message})
    except Exception as write_error:  # noqa: BLE001 - then Ray Train retries the run, as without the file
        print(f"[reclip] WARNING: could not write {path}: {write_error}", flush=True)


def clear_fatal(run_dir: str) -> None:
    """A rerun of the command tries again (the user fixed it?)."""
    storage.delete_file(storage.join(run_dir, FATAL_FILE))


def record_data_start(run_dir: str, phase: int, checkpoint: str, position: Any, sources: dict | None = None) -> None:
    """Note which checkpoint a phase's stream was rebuilt from, so the worker can check it restored the same one,
    and which image column each shard is read from (the worker logs it to MLflow). One small write per phase per
    worker-group start (on S3, pyarrow's 3-request multipart upload)."""
    storage.write_json(storage.join(run_dir, DATA_START_DIR, f"phase{phase}.json"),
                       {"checkpoint": checkpoint, "frontier": position.frontier, "done": len(position.done),
                        "sources": sources or {}}, indent=None)


def check_data_start(run_dir: str, phase: int, restored_from: str) -> dict[str, Any]:
    """The phase's stream was rebuilt (by the dataset factory) from the checkpoint this worker restored; a mismatch
    would silently train rows twice or skip them, so it fails loudly instead. Returns the phase's sources (the image
    column each shard is read from; {} when nothing was recorded)."""
    start = storage.read_json(storage.join(run_dir, DATA_START_DIR, f"phase{phase}.json"))
    if start is None:
        return {}
    used = start.get("checkpoint", "")
    if used != restored_from:
        raise RuntimeError(f"phase {phase}: the data stream was rebuilt from checkpoint {used or 'none'!r} but this "
                           f"worker restored {restored_from or 'none'!r}")
    return start.get("sources") or {}
