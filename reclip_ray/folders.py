"""Whole folders on local disk or an object store: written atomically, read through a local copy.

What an exported model needs from storage, whatever its format (``export.py`` writes reclip-ray folders,
``openclip.py`` open_clip ones, ``init_weights.py`` reads either): a folder appears whole or not at all, and a
remote folder is read from a local copy, because safetensors, ``torch.load`` and open_clip open local files only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from reclip_ray import atomic_dir, storage


def write_folder_atomic(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path | str:
    """Fill a sibling temp folder with ``write(tmp)`` and swap it into place at ``out_dir`` (replacing an old one:
    ``atomic_dir.replace_dir``), so a crash never leaves a folder that looks like an export but holds half of one.
    Returns the folder: a ``Path`` when local, the URI string when remote.

    On an object store there is no rename: the folder is filled locally, then the old objects are deleted and the
    new ones uploaded one by one (``storage.upload_dir``), each whole. A crash during the upload can leave a folder
    with some of the files (a model of 3 objects: a few seconds' window); ``load_export`` then names the missing
    one."""
    if storage.is_uri(str(out_dir)):
        with tempfile.TemporaryDirectory(prefix="reclip-export-") as local_tmp:
            write(Path(local_tmp))
            storage.upload_dir(local_tmp, str(out_dir))
        return str(out_dir).rstrip("/")
    out = Path(storage.local_path(str(out_dir)))
    atomic_dir.replace_dir(str(out), lambda staging: write(Path(staging)))
    return out


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """A local path holding ``path``'s contents: the path itself when local, else a temp copy of the remote file
    or folder (deleted on exit). Cost: one LIST (or HEAD) plus one GET per file; a vit-b-16 export is ~600 MB."""
    path = str(path)
    local = storage.local_path(path)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="reclip-download-") as tmp:
        if storage.is_file(path):
            target = os.path.join(tmp, storage.name(path))
            with open(target, "wb") as f:
                f.write(storage.read_bytes(path))
            yield target
        elif storage.exists(path):
            yield storage.download_dir(path, os.path.join(tmp, storage.name(path) or "model"))
        else:
            raise FileNotFoundError(path)
