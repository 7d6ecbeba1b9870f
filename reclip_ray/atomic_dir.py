"""A local folder replaced whole: readers and crashes see the old folder or the new one, never half of one or none.

Exports (``model/``, open_clip folders) and ``storage.upload_dir``'s local copies are written this way. The new
folder is filled beside the target, under ``.NAME.tmp-<rnd>``, then swapped into place:
- **One rename, not two.** Linux's ``renameat2(RENAME_EXCHANGE)`` swaps the two folders in one step; the old one
  is then at the staging name and is removed. Where it is missing (not Linux, an old kernel, a filesystem that
  refuses it) the old folder is renamed away first and the new one in after it, and for the microseconds between
  the two a reader (or a crash) finds no folder at the target.
- **A killed writer's folder is removed by the next writer.** A vit-b-16 export is ~600 MB; a writer SIGKILLed
  while it fills the staging folder cannot remove it, and each restart that dies there would leave another. So the
  writer holds an exclusive ``flock`` on the staging folder for as long as it writes; the kernel drops the lock
  when the process dies. Each write first lists the target's parent and removes every staging folder of the same
  target whose lock is free (also the unlocked names earlier versions left: ``.NAME.old-<pid>``,
  ``NAME.tmp-<pid>-<rnd>``, ``NAME.old-<pid>-<rnd>``). A live writer's folder is never touched, whichever node it
  runs on, where the filesystem's locks reach across nodes (local disks; NFSv4); where ``flock`` is refused, nothing
  is removed. Cost: one listing of the parent and one lock attempt per leftover.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import uuid
from typing import Callable, Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28; musl and macOS have none
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def replace_dir(target: str, write: Callable[[str], None]) -> None:
    """Call ``write(folder)`` on an empty staging folder beside ``target`` (a local path), then put that folder at
    ``target``, replacing what was there. If ``write`` raises, the staging folder is removed and ``target`` is as
    it was."""
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    remove_dead_staging(parent, name)
    with _locked_staging(parent, name) as staging:
        write(staging)
        if not exchange(staging, target):
            _two_renames(staging, target)
        # staging now holds the old folder (or nothing): removed on leaving


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one rename (``renameat2(RENAME_EXCHANGE)``). False where the platform or the filesystem
    cannot (or ``b`` does not exist: nothing to swap with); other errors raise."""
    if _renameat2 is None or not os.path.lexists(b):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _two_renames(staging: str, target: str) -> None:
    """The fallback: the old folder away, the new one in, the old one removed."""
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    old = staging + "-old"  # a staging name: if this process dies before removing it, the next writer does
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _locked_staging(parent: str, name: str) -> Iterator[str]:
    """A new staging folder for ``parent/name``, exclusively locked until the block ends, then removed. It is made
    and locked under a name the sweep does not match (``.NAME.new-<rnd>``) and only then renamed to
    ``.NAME.tmp-<rnd>``, so another writer's sweep never finds it unlocked. Made with ``os.mkdir``, not
    ``mkdtemp``: the folder becomes the export, which should have the umask's mode like the files in it, not 0700."""
    while True:
        rnd = uuid.uuid4().hex[:12]
        new = os.path.join(parent, f".{name}.new-{rnd}")
        try:
            os.mkdir(new)
            break
        except FileExistsError:
            continue
    fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # no flock on this filesystem: other writers' sweeps cannot lock it either
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        staging = os.path.join(parent, f".{name}.tmp-{rnd}")
        os.rename(new, staging)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(fd)
        shutil.rmtree(new, ignore_errors=True)  # only if the rename to the staging name failed


def _leftover_pattern(name: str) -> re.Pattern[str]:
    """Staging and old folders of ``name``: this module's, and the unlocked ones of earlier versions."""
    n = re.escape(name)
    return re.compile(rf"\.{n}\.tmp-.+|\.{n}\.old-\d+|{n}\.(tmp|old)-\d+-[0-9a-f]{{8}}")


def remove_dead_staging(parent: str, name: str) -> list[str]:
    """Remove every staging (or old) folder of ``parent/name`` whose lock is free: its writer died. Returns their
    paths."""
    pattern = _leftover_pattern(name)
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone already (its writer finished, or another sweep)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live writer, or no flock here: cannot tell, so leave it
            os.close(fd)
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed
