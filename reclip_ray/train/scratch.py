"""Local folders that checkpoints are written to before Ray Train copies them to ``run.storage_path``, and the
removal of those that a dead process left behind.

Rank 0 writes each checkpoint to a local folder and reports it; Ray Train copies it to the run folder (in the
report with ``checkpoint.upload: sync``, in a thread with ``async``) and the folder is deleted after the copy. A
process that dies in between (a SIGKILL, a preempted node, ``ray job stop``, a failed async copy, which ends the
attempt) cannot delete it: a whole checkpoint stays in the node's temp folder, 1.8 GB for vit-b-16 and 5.1 GB for
vit-l-16 each time, and a run with many restarts fills the disk. (Before this module, this VM's /tmp held 21 such
folders after a few days of tests.)

So each process writes its checkpoints under its own folder, ``$TMPDIR/reclip-ray-scratch-<uid>/<host>-<pid>-<rnd>``
(a root per user: another user's would not let this one write there, nor remove what it left), and holds an
exclusive ``flock`` on a lock file beside it for as long as it lives. The kernel releases the lock when the process
dies, however it dies, so any later process can tell a dead writer's folder from a live one's by trying the lock:
no pid check, which a reused pid or another container's pid namespace would fool. Every rank calls
``remove_orphans`` when it starts (a restarted rank 0 may land on another node; every node is swept when one of
the run's workers starts there). It costs one directory listing and one lock attempt per folder.

The run's final export (``final_export``) is written under the process folder too, before MLflow and the run folder
get it: a rank killed there leaves a whole model (~600 MB for vit-b-16) for the sweep, not in $TMPDIR for good.

The same root holds the local copy of a checkpoint that a restart resumes from (``downloaded``): one copy per node,
shared by the node's ranks, not Ray's ``Checkpoint.as_directory``, whose copy a late rank downloads again over the
files an earlier rank is reading (ray-project/ray#48726: CI saw ``state.pt`` fail to load that way).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import pyarrow.fs

ROOT = "reclip-ray-scratch"
_LOCK = ".lock"
_NEW = ".new"
_RESTORE = "restore-"

_held: dict[str, object] = {}  # this process's folder and the open lock file that holds its flock


def scratch_root() -> str:
    """Where this user's processes' folders lie: ``$TMPDIR/reclip-ray-scratch-<uid>`` (``tempfile.gettempdir``)."""
    return os.path.join(tempfile.gettempdir(), f"{ROOT}-{os.getuid()}")


def process_folder() -> str:
    """This process's folder, created and locked at the first call. The lock file is created under a temporary
    name, locked, then renamed into place, so a sweep in another process never finds it unlocked."""
    path = _held.get("path")
    if isinstance(path, str):
        os.makedirs(path, exist_ok=True)
        return path
    root = scratch_root()
    os.makedirs(root, exist_ok=True)
    name = f"{socket.gethostname().split('.')[0][:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = os.path.join(root, name)
    lock = open(os.path.join(root, f".{name}{_NEW}"), "w")  # noqa: SIM115 - held open for the process's life
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(lock.name, path + _LOCK)
    os.makedirs(path)
    _held.update(path=path, lock=lock)
    return path


def checkpoint_folder() -> str:
    """A new empty folder for one checkpoint, under this process's folder."""
    return tempfile.mkdtemp(prefix="checkpoint-", dir=process_folder())


def remove_orphans() -> list[tuple[str, int]]:
    """Remove every process folder whose lock is free (its process died), and every restore copy whose lock is free
    (no rank reads it: its last reader died), with what it holds and its lock file. Returns (folder, bytes) for
    each folder removed."""
    root = scratch_root()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    removed: list[tuple[str, int]] = []
    own = os.path.basename(str(_held.get("path", "")))
    for name in names:
        if name.endswith(_LOCK) and name[: -len(_LOCK)] != own:
            _remove_if_dead(os.path.join(root, name), os.path.join(root, name[: -len(_LOCK)]), removed)
        elif name.startswith(".") and name.endswith(_NEW):  # a process died before its lock file was in place
            _remove_if_dead(os.path.join(root, name), None, removed)
    return removed


def _remove_if_dead(lock_path: str, folder: str | None, removed: list[tuple[str, int]]) -> None:
    """If the lock at ``lock_path`` can be taken, no process uses its folder (a process folder's owner died; no rank
    is reading or downloading a restore copy): remove the folder, then the lock file (in that order, so a folder
    never outlives its lock file)."""
    try:
        lock = open(lock_path, "r+")  # noqa: SIM115
    except OSError:
        return  # another sweep removed it first, or it is another user's
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process is alive
            return
        if not _current(lock, lock_path):
            return  # removed and made again since we opened it: the folder is the new holder's
        if folder is not None and os.path.isdir(folder):
            removed.append((folder, _bytes(folder)))
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass


def _current(lock, lock_path: str) -> bool:
    """Whether the open lock file is still the one at ``lock_path``: a lock file is unlinked while locked when its
    folder is removed, and a process that opened it before then holds a lock on a file nobody else will open."""
    try:
        return os.fstat(lock.fileno()).st_ino == os.stat(lock_path).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def downloaded(path: str, filesystem: pyarrow.fs.FileSystem) -> Iterator[str]:
    """The checkpoint folder at ``path`` on ``filesystem`` as a local folder, for as long as the context lasts.

    A local checkpoint is read where it is. A remote one is copied once per node: the ranks of a node share
    ``<scratch root>/restore-<hash of path>``. Every reader holds a shared lock on the file beside it, under which
    nobody copies or removes. A rank that finds no copy takes the lock exclusively, copies the checkpoint into its
    own process folder (swept like a checkpoint if it dies) and renames it into place, so the folder exists only
    whole. On leaving, a rank drops its lock and tries the exclusive lock again without waiting: only the last
    reader gets it, and removes the copy. A rank that arrives after that copies it again, which costs bytes, never
    a torn file. Cost: one checkpoint's bytes per node and restart (1.8 GB for vit-b-16), not one per GPU, read in
    parallel ranged GETs (``storage.copy_to_local``).
    """
    import pyarrow.fs as pafs

    from reclip_ray import storage

    if isinstance(filesystem, pafs.LocalFileSystem):
        yield path
        return
    root = scratch_root()
    os.makedirs(root, exist_ok=True)
    key = hashlib.sha256(f"{filesystem.type_name}://{path}".encode()).hexdigest()[:24]
    folder = os.path.join(root, _RESTORE + key)
    lock_path = folder + _LOCK
    while True:
        lock = open(lock_path, "a")  # noqa: SIM115 - closed below
        fcntl.flock(lock, fcntl.LOCK_SH)
        if _current(lock, lock_path) and os.path.isdir(folder):
            break  # a whole copy, which nobody removes while we hold this
        # Conversions are not atomic (flock(2)): another rank may copy or remove in between, hence the checks.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(lock, lock_path) and not os.path.isdir(folder):
            copy = tempfile.mkdtemp(prefix="restore-", dir=process_folder())
            try:
                storage.copy_to_local(filesystem, path, copy)
                os.rename(copy, folder)
            except BaseException:
                shutil.rmtree(copy, ignore_errors=True)
                lock.close()
                raise
        fcntl.flock(lock, fcntl.LOCK_SH)
        if _current(lock, lock_path) and os.path.isdir(folder):
            break
        lock.close()
    try:
        yield folder
    finally:
        lock.close()
        _remove_if_dead(lock_path, folder, [])


def _bytes(folder: str) -> int:
    total = 0
    for top, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(top, f))
            except OSError:
                pass
    return total


@atexit.register
def _release() -> None:
    """A clean exit removes this process's folder (empty unless an async copy was still running, which the exit
    ends anyway) and its lock file."""
    path, lock = _held.pop("path", None), _held.pop("lock", None)
    if isinstance(path, str):
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.unlink(path + _LOCK)
        except FileNotFoundError:
            pass
    if lock is not None:
        lock.close()  # type: ignore[attr-defined]
