"""Whole folders on local disk or an object store: written atomically, read through a local copy.

What an exported model needs from storage, whatever its format (``export.py`` writes reclip-ray folders,
``openclip.py`` open_clip ones, ``init_weights.py`` reads either): a folder appears whole or not at all, and a
remote folder is read from a local copy, because safetensors, ``torch.load`` and open_clip open local files only.

An object store has no rename, so a remote folder cannot be swapped in whole. It carries a manifest instead,
``.reclip-folder.json``: each file's size and SHA-256, written before the files. A reader copies the files the
manifest names and checks each against it; a file that does not match is being replaced (or was left half-replaced
by a writer that died), and the reader reads the manifest and the changed files again until they match; once
nothing has changed there for ``WHOLE_WAIT_S``, it names the file in one line. Without it, ``reclip-ray eval
RUN_DIR/model`` while the run re-exports could load a mix of two models: the weights file keeps its size from
export to export, and a file over 16 MB is read in parallel ranged GETs, so even a single file can mix two versions
unnoticed. Cost on a vit-b-16 export (~600 MB): one PUT and one GET more, and a SHA-256 pass over the files on each
side (0.47 s for 600 MiB on one core of this 2-core VM).
A remote folder without a manifest (copied there by other tools, or exported before it existed) is read as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import pyarrow.fs as pafs

from reclip_ray import atomic_dir, storage
from reclip_ray.errors import CheckpointError

MANIFEST = ".reclip-folder.json"
WHOLE_WAIT_S = 120.0  # how long a reader waits, while nothing changes, for a remote folder to match its manifest


def write_folder_atomic(out_dir: str | os.PathLike, write: Callable[[Path], None],
                        replaces: Collection[str] = ()) -> Path | str:
    """Fill a sibling temp folder with ``write(tmp)`` and swap it into place at ``out_dir`` (replacing an old one:
    ``atomic_dir.replace_dir``), so a crash never leaves a folder that looks like an export but holds half of one.
    Returns the folder: a ``Path`` when local, the URI string when remote.

    An existing ``out_dir`` is replaced only when it holds nothing but the files named in ``replaces`` (what an
    earlier folder of this kind holds: ``check_replaceable``). On an object store there is no rename: the folder is
    filled locally, then uploaded with its manifest (``upload_folder``)."""
    check_replaceable(str(out_dir), replaces)
    if storage.is_uri(str(out_dir)):
        with _scratch_dir("reclip-export-") as local_tmp:
            write(Path(local_tmp))
            upload_folder(local_tmp, str(out_dir))
        return str(out_dir).rstrip("/")
    out = Path(storage.local_path(str(out_dir)))
    atomic_dir.replace_dir(str(out), lambda staging: write(Path(staging)))
    return out


def check_replaceable(out_dir: str, replaces: Collection[str]) -> None:
    """Refuse to replace a folder that holds anything but an earlier folder of the same kind.

    The swap deletes the old folder whole: ``reclip-ray export RUN/model --out .`` (or ``--out RUN``) would
    otherwise take the working directory (or the run's checkpoints) with it. Absent and empty folders are fine.
    One LIST of the folder's top level (on an object store, one request)."""
    fs, inner = storage.filesystem(out_dir)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        return
    if kind == pafs.FileType.File:
        raise CheckpointError(f"{out_dir} is a file, not a folder: choose another output folder")
    names = {posixpath.basename(i.path.rstrip("/")) for i in fs.get_file_info(pafs.FileSelector(inner))}
    foreign = sorted(names - set(replaces) - {MANIFEST})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(f"{out_dir} holds {shown}, which an export would delete: it replaces only an empty "
                              f"folder or an earlier export; choose another output folder")


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """A local path holding ``path``'s contents: the path itself when local, else a temp copy of the remote file
    or folder (deleted on exit). Cost: one LIST (or HEAD) plus one GET per file part; a vit-b-16 export is ~600 MB.
    A file: two HEADs more (``storage.download_file``). A folder with a manifest (``download_folder``): one GET, one
    HEAD and one LIST more."""
    path = str(path)
    local = storage.local_path(path)
    if local is not None:
        yield local
        return
    with _scratch_dir("reclip-download-") as tmp:
        if storage.is_file(path):  # to disk in parts, never whole in memory (a 1.7 GB init_from checkpoint)
            yield storage.download_file(path, os.path.join(tmp, storage.name(path)))
        elif storage.exists(path):
            yield download_folder(path, os.path.join(tmp, storage.name(path) or "model"))
        else:
            raise FileNotFoundError(path)


def _scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temp folder in this process's scratch folder (``train.scratch``), not in $TMPDIR itself: a process killed
    while it holds a copy (a worker stopped during its ``init_from`` download, an eval killed for memory) cannot
    remove it, and in $TMPDIR the ~600 MB of an export (1.7 GB of a ViT-L checkpoint) stayed for good; there, the
    next training worker on the node removes it."""
    from reclip_ray.train import scratch

    return tempfile.TemporaryDirectory(prefix=prefix, dir=scratch.process_folder())


def upload_folder(local_dir: str, target: str) -> None:
    """Put the local folder ``local_dir`` at ``target``, replacing what was there, so that no reader takes a mix of
    the two for either: locally a swap (``atomic_dir``); on an object store the manifest first, then the files over
    the old ones, then the old files the new folder lacks are removed (``storage.upload_dir``). A reader that comes
    while the files are replaced waits for them to match the new manifest (``download_folder``)."""
    if not storage.is_uri(target):
        storage.upload_dir(local_dir, target)
        return
    files = {}
    for folder, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(folder, name)
            relative = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if relative != MANIFEST:  # a stale copy of one is not uploaded over the new one either
                files[relative] = _stamp(full)
    storage.write_json(storage.join(target, MANIFEST), {"files": files})
    storage.upload_dir(local_dir, target, keep=[MANIFEST])


RECOPY_S = (1.0, 30.0)  # a file that does not match and has not changed is copied again after 1 s, 2 s, ... 30 s


def download_folder(source: str, local_dir: str) -> str:
    """Copy the remote folder ``source`` into ``local_dir`` as its manifest describes it (``upload_folder``), or as
    it is where it has none; returns ``local_dir``.

    A file that does not match is copied again when its object changes (size or time in the listing), else after
    ``RECOPY_S``, a wait that doubles at each copy (the listing's time has one-second steps, so a file replaced in
    the second it was copied lists the same), not at every look: a folder whose writer died would otherwise have
    its 600 MB of weights read a hundred times before the reader gives up. The wait ends in ``CheckpointError``,
    naming the file, once nothing has changed for ``WHOLE_WAIT_S`` (the manifest, or which files match): a live
    writer slow to upload keeps it going. An error writing here (a full disk) is raised at once."""
    fs, inner = storage.filesystem(source)
    os.makedirs(local_dir, exist_ok=True)
    have: dict[str, dict] = {}  # file -> stamp of the local copy
    copied: dict[str, tuple[Any, float, float]] = {}  # file -> (its listing entry, time, wait) at its last copy
    last: tuple[Any, ...] = ()  # what was seen when something last changed
    deadline, wait, read_error = 0.0, 0.05, None
    while True:
        want = _manifest(source)
        if want is None:  # none (any more): as it is, from scratch
            shutil.rmtree(local_dir, ignore_errors=True)
            return storage.download_dir(source, local_dir)
        for name in set(have) - set(want):  # a file an earlier version had: only ones this loop wrote
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(local_dir, name))
            del have[name]
        listing = {posixpath.relpath(i.path, inner): (i.size, i.mtime_ns)
                   for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File}
        now = time.monotonic()
        stale = [name for name in want if have.get(name) != want[name] and name in listing
                 and (copied.get(name, (None,))[0] != listing[name] or now - copied[name][1] > copied[name][2])]
        if stale:
            try:
                storage.copy_to_local(fs, inner, local_dir, only=stale)
            except OSError as exc:
                if exc.errno is not None:  # this machine's (a full disk): waiting will not mend it
                    raise
                read_error = exc  # the store's: a file shrank or vanished between the listing and its GETs
            now = time.monotonic()  # the wait before a copy again counts from this copy's end, not its start
            for name in stale:
                full = os.path.join(local_dir, name)
                have[name] = _stamp(full) if os.path.isfile(full) else {}
                again = name in copied and copied[name][0] == listing[name]
                copied[name] = (listing[name], now, min(2 * copied[name][2], RECOPY_S[1]) if again else RECOPY_S[0])
        bad = sorted(name for name in want if have.get(name) != want[name])
        if not bad:
            return local_dir
        seen = (want, tuple(bad), tuple(sorted(listing.items())))
        if seen != last:
            last, deadline = seen, time.monotonic() + WHOLE_WAIT_S
        elif time.monotonic() > deadline:
            because = f" (the last read failed: {str(read_error).splitlines()[0]})" if read_error else ""
            raise CheckpointError(
                f"{storage.join(source, bad[0])} does not match the folder's manifest ({MANIFEST}), and nothing "
                f"there changed for {WHOLE_WAIT_S:.0f} s{because}: the folder was left half-written (a writer "
                f"stopped during its upload); write it again (a run's model/: launch the run again), or delete "
                f"{MANIFEST} to read the folder as it is")
        time.sleep(wait * random.uniform(0.5, 1.5))
        wait = min(2 * wait, 1.0)


def _manifest(source: str) -> dict[str, dict] | None:
    """The files ``source``'s manifest names, each {"bytes", "sha256"}; None where it has none. A name must be a
    plain relative path: the reader writes and removes files by these names in its local copy."""
    path = storage.join(source, MANIFEST)
    try:
        doc = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, not UTF-8
        doc = None
    try:
        files = {name: {"bytes": int(stamp["bytes"]), "sha256": str(stamp["sha256"])}
                 for name, stamp in doc["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        files = None
    bad_name = files is not None and next((n for n in files if not _plain(n)), None)
    if files is None or bad_name:
        what = f"a file name that is not a plain relative path: {bad_name!r}" if bad_name else "not a folder manifest"
        raise CheckpointError(f'{path}: {what} (want {{"files": {{"NAME": {{"bytes": N, "sha256": HEX}}}}}})')
    return files


def _plain(name: str) -> bool:
    return (isinstance(name, str) and name not in ("", MANIFEST) and not name.startswith("/") and "\\" not in name
            and posixpath.normpath(name) == name and ".." not in name.split("/"))


def _stamp(path: str) -> dict:
    """A local file's size and SHA-256, the manifest's record of it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
