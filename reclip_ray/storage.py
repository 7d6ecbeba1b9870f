"""Paths that may be local folders or object-store URIs (``s3://bucket/runs``), through pyarrow's filesystems.

A run folder or a dataset can live on a local disk, a shared filesystem or a bucket. ``pathlib.Path`` is the wrong
type for the last: ``Path("s3://b/x")`` is ``s3:/b/x``, a *local* path, so every write would silently land in a
folder named ``s3:`` on whichever node ran it. This module is the one place that turns a path string into a
filesystem: everything else keeps paths as strings, joins them with ``join`` and reads/writes through the helpers
here. Local paths (and ``file://`` URIs) are made absolute; URIs keep their scheme.

A URI's query is its filesystem's options, on every scheme, as ``pyarrow.fs.FileSystem.from_uri`` (and so Ray Train
and Tune) reads them: ``s3://bucket/runs?endpoint_override=http://minio:9000&scheme=http`` is the key ``runs`` on
that endpoint, ``hdfs://nn/x?user=u`` the path ``/x`` as user ``u``. ``join``, ``parent``, ``name`` and
``normalize`` work on the path and keep the query at the end (``split_query``), so every file of a run folder
carries its store's options to whichever node opens it. A path in a URI therefore cannot hold ``?``; off S3 and
GCS, whose keys are read as written, not ``#`` either (a fragment, which pyarrow drops): each is one line of
``DataError`` naming the path. Credentials in a URI are refused (``_refuse_credentials``).

Writes are atomic where the storage allows it: locally a temporary file in the same folder and ``os.replace``; on
an object store a single PUT (an object becomes visible whole, when the upload completes, or not at all). On S3 an
object of ``SINGLE_PUT_BYTES`` or more is a multipart upload, and one that fails is aborted (``_abort_uploads``):
S3 keeps the parts of an upload nobody completes or aborts, and bills them, until a lifecycle rule removes them.

Cost at scale: ``pyarrow.fs.FileSystem.from_uri`` builds a client each call (on S3 it may ask the bucket for its
region; on HDFS it connects), so a filesystem is built once per process for each scheme, authority (bucket,
namenode) and query, and kept: a run's thousands of reads and writes share it. It keeps the credentials it found
then; those that expire (an instance role, a web identity) are renewed by the client itself, as before, but a change
of the environment later in the process (another ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``) is not seen: an endpoint
given in the URI is, and travels with every path to every node.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import posixpath
import random
import re
import shutil
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Collection, Iterable, Iterator

import pyarrow.fs as pafs

from reclip_ray import atomic_dir
from reclip_ray.errors import DataError


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path written as a URI)."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str | None:
    """The absolute local path of a local path or ``file://`` URI; None for a remote URI."""
    path = str(path)
    if is_uri(path):
        return None
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def split_query(path: str) -> tuple[str, str]:
    """(the URI without its query, the query): ``s3://b/x?region=r`` -> (``s3://b/x``, ``region=r``); a local path
    (also ``file://``) -> (path, ""). The one place that reads a URI's options. A ``#`` is a fragment to pyarrow,
    which drops it: on HDFS, Azure and the like it is refused in one line, so ``hdfs://nn/x#1`` fails where it is
    given, not as a folder that this module and Ray Train would read differently; an S3 or GCS key keeps it as
    written (``pyarrow_uri`` encodes it for Ray). Credentials in a URI are refused first (``_refuse_credentials``)."""
    path = str(path)
    if not is_uri(path):
        return path, ""
    _refuse_credentials(path)
    base, _, query = path.partition("?")
    if "#" in base and _scheme(base) not in OBJECT_STORES:
        raise DataError(f"{path}: '#' starts a URI fragment, which names nothing on a filesystem; a path in a URI "
                        "cannot hold '#' (nor '?', which starts the filesystem's options)")
    return base, query


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


SECRET_OPTIONS = ("access_key", "secret_key", "session_token", "client_secret", "account_key", "sas_token", "password")


def _refuse_credentials(uri: str) -> None:
    """A path is printed, logged, recorded in MLflow and the run folder's files, and joined onto every file of a run
    folder: a secret in it would go everywhere. So a URI's user:password (``s3://KEY:SECRET@bucket``,
    ``abfs://account:KEY@container``) or a secret option (``?client_secret=...``) is one line that shows neither.
    The authority ends at the first ``/``, ``?`` or ``#``, where a secret may hold any of them: a bucket name holds
    neither ``:`` nor ``@``, and elsewhere ``host:port`` has digits after its colon."""
    scheme, rest = _scheme(uri), uri.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, _, host = authority.rpartition("@")
    if scheme in OBJECT_STORES:
        leaked = ":" in authority or "@" in authority
    else:
        leaked = ":" in userinfo or not re.fullmatch(r"[^:]*(:\d*)?", host)
    if leaked:
        raise DataError(f"{scheme}://***: credentials in a URI would be written wherever the path is (logs, MLflow, "
                        "the run folder's records); give them as the store's environment (AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, a profile, a role), and the bucket or host alone in the URI")
    query = uri.partition("?")[2]
    named = {key.lower() for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    if named & set(SECRET_OPTIONS):
        raise DataError(f"{uri.partition('?')[0]}?***: a secret in a URI's options "
                        f"({', '.join(sorted(named & set(SECRET_OPTIONS)))}) would be written wherever the path is; "
                        "give it as the store's environment")


def _with_query(base: str, query: str) -> str:
    return f"{base}?{query}" if query else base


def _plain_part(base: str, part: str) -> str:
    """``part`` of a path joined onto the URI ``base``: refused in one line where it would read as options (or, off
    S3 and GCS, as a fragment). A listed file whose name holds one cannot be named by a URI, here or in pyarrow."""
    if "?" in part or ("#" in part and _scheme(base) not in OBJECT_STORES):
        raise DataError(f"{base}: cannot name {part!r} under it: in a URI '?' starts the filesystem's options"
                        + ("" if "?" in part else " and '#' a fragment") + "; rename it")
    return part


def normalize(path: str) -> str:
    """Local paths absolute, URIs without a trailing slash or empty folder names: pyarrow's URI parser, which Ray
    Train and Tune open a storage path with, reads ``s3://b//runs`` as ``s3://b/runs``, where this module's key
    would be ``/runs`` under the bucket, so checkpoints and the rest of a run folder would part (as ``os.path``
    reads ``a//b`` locally). The query stays as written (an empty one is dropped)."""
    local = local_path(path)
    if local is not None:
        return local
    base, query = split_query(path)
    scheme, rest = base.split("://", 1)
    authority, _, key = rest.partition("/")
    key = "/".join(part for part in key.split("/") if part)
    return _with_query(f"{scheme}://{authority}/{key}".rstrip("/"), query)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI alike (``os.path.join`` would do for the former only); a URI's
    query stays at the end: ``join("hdfs://nn/x?user=u", "run")`` is ``hdfs://nn/x/run?user=u``."""
    base = str(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    base, query = split_query(base)
    scheme, rest = base.split("://", 1)
    return _with_query(f"{scheme}://{posixpath.join(rest.rstrip('/'), *(_plain_part(base, p) for p in parts))}",
                       query)


def relative(path: str, root: str) -> str:
    """``path``'s place below ``root`` (``a/b.parquet``; "" for ``root`` itself), queries aside: the two are spelt
    alike, ``path`` being ``root`` joined with more (a listing of it)."""
    path, root = split_query(str(path))[0], split_query(str(root))[0]
    return path[len(root):].lstrip("/")


OBJECT_STORES = ("s3", "gs", "gcs")  # schemes whose paths are bucket/key as written, and which have no folders
_URI_AS_WRITTEN = "/:@!$&'()*+,;=-._~"  # RFC 3986's path characters besides letters and digits: pyarrow keeps them


def pyarrow_uri(path: str) -> str:
    """``path`` as a URI that ``pyarrow.fs.FileSystem.from_uri`` (Ray Train's and Tune's ``storage_path``) reads as
    the same place this module does. Here an S3 or GCS key is the text after the bucket, as written; pyarrow parses
    a URI: it refuses a space and decodes ``%20``, so ``run.storage_path=s3://b/my%20runs`` put Ray Train's
    checkpoints under ``my runs/`` and the rest of the run folder under ``my%20runs/``, and ``s3://b/my runs``
    failed in Ray Train after the launch had trained a tokenizer there. So such a key is percent-encoded, and the
    query (the store's options, ``split_query``) passed on as written, so Ray Train opens the same store; other
    schemes' paths are read here as pyarrow reads them (percent-decoded, ``filesystem``), so they are given
    decoded and encoded again: ``hdfs://nn/my runs``, which pyarrow refuses, is ``hdfs://nn/my%20runs``, the same
    folder here and there. Local paths (also ``file://`` ones) are given as plain absolute paths, which pyarrow
    takes as written."""
    local = local_path(path)
    if local is not None:
        return local
    base, query = split_query(path)
    scheme, rest = base.split("://", 1)
    if scheme not in OBJECT_STORES:
        parts = urllib.parse.urlsplit(base)
        path_part = urllib.parse.quote(urllib.parse.unquote(parts.path), safe=_URI_AS_WRITTEN)
        return _with_query(f"{scheme}://{parts.netloc}{path_part}", query)
    bucket, _, key = rest.partition("/")
    return _with_query(f"{scheme}://{bucket}/{urllib.parse.quote(key, safe=_URI_AS_WRITTEN)}".rstrip("/"), query)


def parent(path: str) -> str:
    path = str(path)
    if not is_uri(path):
        return os.path.dirname(path.rstrip("/"))
    base, query = split_query(path)
    scheme, rest = base.rstrip("/").split("://", 1)
    if "/" not in rest:  # a bucket or host's root is its own parent, as "/" is locally
        return path
    return _with_query(f"{scheme}://{posixpath.dirname(rest)}", query)


def name(path: str) -> str:
    return posixpath.basename(split_query(str(path))[0].rstrip("/"))


SINGLE_PUT_BYTES = 10 << 20  # pyarrow's S3 part size: with delayed open, an object under it is one PutObject
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _remote_filesystem(scheme: str, authority: str, query: str = "",
                       delayed_open: bool = True) -> tuple[pafs.FileSystem, str]:
    """(filesystem, its path of ``scheme://authority/``), built once per process for each authority and options:
    ``from_uri`` makes a client each call (an HDFS connection, an S3 region lookup). ``query`` holds the URI's
    options (``hdfs://nn/x?user=u``, ``s3://b/x?endpoint_override=...``)."""
    # S3: with delayed open an object under the part size (10 MB) is one PutObject at close; without it pyarrow
    # makes every object a multipart upload (create, part, complete: 3 requests). Measured on the moto server.
    # The user's own allow_delayed_open wins; a large object's filesystem (``_put_object``) never delays.
    if scheme == "s3":
        query = _with_option(query, "allow_delayed_open", "true" if delayed_open else "false",
                             override=not delayed_open)
    return pafs.FileSystem.from_uri(f"{scheme}://{authority}/" + (f"?{query}" if query else ""))


def _with_option(query: str, key: str, value: str, override: bool) -> str:
    """``query`` with ``key=value`` added where it does not set ``key`` (``override``: in place of its own)."""
    items = [item for item in query.split("&") if item]
    named = [item for item in items if urllib.parse.unquote(item.split("=", 1)[0]) == key]
    if named and not override:
        return query
    return "&".join([item for item in items if item not in named] + [f"{key}={value}"])


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it). One line of error for an unknown scheme, options pyarrow refuses, or
    missing credentials.

    S3 and GCS keys are the text after the bucket as written (``pyarrow_uri``). Other schemes' paths are what
    ``from_uri`` makes of the URI (percent-decoded), joined here to the root's path (``/`` on HDFS, the container
    on Azure) so that the filesystem itself is not built again for each path. The query is the filesystem's
    options on every scheme (``split_query``)."""
    path = str(path)
    local = local_path(path)
    if local is not None:
        return pafs.LocalFileSystem(), local
    base, query = split_query(path)
    scheme, rest = base.split("://", 1)
    try:
        if scheme in OBJECT_STORES:
            return _remote_filesystem(scheme, rest.split("/", 1)[0], query)[0], rest.rstrip("/")  # bucket/key
        parts = urllib.parse.urlsplit(base)
        fs, root = _remote_filesystem(scheme, parts.netloc, query)
        return fs, posixpath.join(root, urllib.parse.unquote(parts.path).lstrip("/"))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown schemes or missing credentials
        hint = (" (the text after '?' is the filesystem's options, as pyarrow.fs.FileSystem.from_uri reads them; "
                "a path in a URI cannot hold '?', and a pattern's one-character wildcard there is [...])"
                if query and "query parameter" in str(exc) else "")
        raise DataError(f"cannot open {path}: {str(exc).strip()}{hint}") from exc


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    """True for a folder (on an object store: a prefix that holds objects, or a folder marker)."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    """A folder (and its parents); on object stores there are no folders and this does nothing harmful."""
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str, may_change: bool = True) -> bytes:
    """The file's bytes; FileNotFoundError if it is not there.

    One GET up to ``PART_BYTES``, parallel ranged GETs above (``read_all``): pyarrow's ``open_input_stream().read()``
    reads an object as 256 KB GETs one after another, 2,400 round trips for a 600 MB vit-b-16 export.

    On an object store a file that ``may_change`` is checked against being replaced while it is read
    (``_read_object``: one HEAD more). Pass False for files nothing rewrites, where a HEAD per file adds up: the
    images of a dataset being converted."""
    fs, inner = filesystem(path)
    if local_path(path) is None and may_change:
        return _read_object(fs, inner, path)  # its own HEAD after the GETs tells a missing object
    try:
        with fs.open_input_file(inner) as f:  # random access; never decompressed (a stream would gunzip a *.gz)
            return read_all(f, path)  # locally an open file keeps its inode: a writer's os.replace cannot tear it
    except FileNotFoundError:
        raise
    except OSError as exc:  # pyarrow's S3 reports a missing key as OSError on some versions
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            raise FileNotFoundError(path) from exc
        raise


REPLACED_WAIT_S = 60.0  # how long a read goes on retrying an object that is replaced every time it is read


def _read_object(fs: pafs.FileSystem, inner: str, path: str) -> bytes:
    """The whole object, from one version of it: the read is repeated while the object is replaced under it.

    pyarrow reads an object as a HEAD for its size, then ranged GETs of that many bytes of whatever version the
    store holds by then. An object another process replaced between the two (Ray Train rewrites
    ``checkpoint_manager_snapshot.json`` at each checkpoint; a live run rewrites its metrics) came back torn: a
    longer new version cut at the old size, or a shorter one padded to the old size with uninitialised memory,
    which pyarrow returns without an error (both seen on the moto server, in 40 % of the reads of an object
    rewritten in a loop). So the size is read again after the GETs, and the read repeated until it held.

    What this cannot see: an object replaced twice between the two HEADs, the second time back to the first size.
    A replacement of the same size is harmless to a single GET (it reads that version whole), which is what every
    file under ``PART_BYTES`` is. A read that fails (a ranged GET past the end of a shorter new version) is
    judged the same way: repeated if the object changed, raised if it held still."""
    deadline, wait = time.monotonic() + REPLACED_WAIT_S, 0.01
    while True:
        size, failure = None, None
        try:
            with fs.open_input_file(inner) as f:
                size = f.size()
                data = read_all(f, path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            failure = exc
        after = fs.get_file_info(inner)
        if after.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path) from failure
        if failure is not None and (size is None or after.size == size):
            raise failure  # its own failure: the open failed, or the object held still
        if after.type != pafs.FileType.File:
            raise OSError(f"{path}: not a file")
        if failure is None and after.size == len(data):
            return data
        if time.monotonic() > deadline:
            raise OSError(f"{path}: replaced while being read, again and again for {REPLACED_WAIT_S:.0f} s")
        time.sleep(wait * (0.5 + random.random()))  # jittered, so a reader does not fall into step with a writer
        wait = min(wait * 2, 1.0)


def read_text(path: str) -> str:
    """UTF-8, with or without the byte-order mark Windows editors put first (json.loads refuses one)."""
    return read_bytes(path).decode("utf-8-sig")


def read_json(path: str, default: Any = None) -> Any:
    """The parsed JSON file, or ``default`` when it does not exist."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        return default


def write_bytes(path: str, data: bytes | memoryview) -> None:
    """Write the whole file atomically: readers see the old file or the new one, never a part."""
    fs, inner = filesystem(path)
    local = local_path(path)
    if local is None:  # an object store: one PUT (or one multipart upload), visible whole when it completes
        _put_object(fs, str(path), inner, data)
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


PARTS_IN_FLIGHT = 8  # parts of one object queued at once: pyarrow's I/O threads send 8; its queue has no bound


def _put_object(fs: pafs.FileSystem, path: str, inner: str, data: Any,
                sent: Callable[[int, int], None] | None = None) -> None:
    """``data`` (bytes-like or a ``pyarrow.Buffer``) as the object ``inner`` of the remote ``fs``: whole, or
    nothing new and no upload left open.

    Memory: pyarrow's S3 stream copies each 10 MB part of a ``write`` into a buffer of its own and queues it for its
    I/O threads, with no bound; one ``write`` of a whole buffer held a second copy of it (a 400 MB object added
    400 MB to the peak, ``benchmarks/s3_write_memory.py``). So a large object is written a part at a time and the
    stream flushed (which waits for the parts queued) every ``PARTS_IN_FLIGHT`` parts: 80 MB of copies at most.
    ``sent(start, end)`` is called after each part's bytes were copied (``_upload_files`` drops its mapped pages); it
    must not raise (its error would be taken for pyarrow's).

    Whole or nothing: pyarrow's output stream closes (never aborts) in its destructor, which completes the upload
    with what it holds. A failure of pyarrow's own (a refused part or completion) publishes nothing but leaves the
    upload open (pyarrow binds no ``Abort`` in Python): it is aborted here (``_abort_uploads``). An exception between
    two writes (a Ctrl-C) leaves a sound stream that would publish the parts so far: the upload is aborted, and where
    that cannot be done, the rest is written so that the object is the new one whole. An object of
    ``SINGLE_PUT_BYTES`` or more on S3 is opened at once, not with delayed open: with it, a refused
    CreateMultipartUpload (at the first part) made close() PUT what the stream held (nothing, or its first 10 MB
    part) over the old object (seen on the moto server); opened at once, the open raises the refusal before anything
    began. A smaller object is one write and one PUT at close."""
    with memoryview(data).cast("B") as view:  # released however this ends: a mapped file cannot close while held
        multipart = path.startswith("s3://") and view.nbytes >= SINGLE_PUT_BYTES
        if multipart:
            fs = _remote_filesystem("s3", inner.split("/", 1)[0], split_query(path)[1], delayed_open=False)[0]
        before = _open_uploads(path, inner) if multipart else None
        stream = fs.open_output_stream(inner, compression=None)
        try:
            _write_rest(stream, view, sent)
        except Exception:  # pyarrow's (a refused part): the upload failed, and its destructor cannot complete it
            if multipart:
                _abort_uploads(path, inner, before)
            raise
        except BaseException:  # between two writes (KeyboardInterrupt, SystemExit): the stream itself is sound
            if not stream.closed:
                _stop_sound_upload(stream, view, path, inner, before, multipart)
            raise


def _stop_sound_upload(stream: Any, view: memoryview, path: str, inner: str, before: set[str] | None,
                       multipart: bool) -> None:
    """An upload interrupted between two writes would be completed by the stream's destructor with the parts so
    far, a torn object: an S3 multipart upload is aborted, or where it cannot be (no boto3, S3 refuses), finished
    whole; so is any other store's (GCS, Azure: their streams too complete when destroyed, and cannot be aborted)."""
    if multipart and before is not None and _abort_uploads(path, inner, before, warn=False):
        with contextlib.suppress(Exception):
            stream.close()  # fails now (no such upload), not in the destructor
        return
    try:
        _write_rest(stream, view)
    except Exception:
        if multipart:
            _abort_uploads(path, inner, before)  # its warning says what is left open


def _write_rest(stream: Any, view: memoryview, sent: Callable[[int, int], None] | None = None) -> None:
    """The bytes of ``view`` from the stream's position on, a part at a time (``_parts``), flushed every
    ``PARTS_IN_FLIGHT`` parts; then closed."""
    done = stream.tell()
    for i, (start, end) in enumerate(_parts(view.nbytes - done), 1):
        stream.write(view[done + start:done + end])
        if sent is not None:
            sent(done + start, done + end)
        if i % PARTS_IN_FLIGHT == 0:
            stream.flush()  # waits for the parts queued: their copies are freed
    stream.close()


def _parts(size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each write of an object of ``size`` bytes: one write below ``SINGLE_PUT_BYTES`` (one PUT),
    else one per part."""
    if size < SINGLE_PUT_BYTES:
        yield 0, size
        return
    for start in range(0, size, SINGLE_PUT_BYTES):
        yield start, min(start + SINGLE_PUT_BYTES, size)


def _open_uploads(path: str, inner: str) -> set[str] | None:
    """The ids of the multipart uploads in progress for S3 object ``inner`` (bucket/key) of the URI ``path`` (whose
    options name its endpoint, ``_s3_client``): one LIST (boto3), made
    before each multipart write so that the upload a failure leaves is told from another writer's. None where they
    cannot be listed (no boto3; a role without s3:ListBucketMultipartUploads)."""
    if importlib.util.find_spec("boto3") is None:
        return None
    bucket, key = inner.split("/", 1)
    try:
        client = _s3_client(split_query(path)[1])
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key)
        return {u["UploadId"] for page in pages for u in page.get("Uploads", []) if u["Key"] == key}
    except Exception as exc:  # botocore's errors, a network error: the write goes on; only an abort would need it
        log.debug("%s: cannot list multipart uploads: %s", inner, exc)
        return None


def _abort_uploads(path: str, inner: str, before: set[str] | None, warn: bool = True) -> bool:
    """Abort the multipart uploads of S3 object ``inner`` that were not in progress before the failed write
    (``before``): its own. pyarrow can neither abort an upload from Python nor say its id, so they are listed and
    aborted through boto3 (one LIST, one DELETE each). A writer of the same key that began meanwhile has its upload
    aborted too, and fails rather than racing this one. Where that cannot be done (no boto3; S3 refuses: an expired
    token refuses the abort as it refused the part) the upload stays, with a warning naming it: a bucket lifecycle
    rule (AbortIncompleteMultipartUpload) removes such uploads. Never raises: the write's error is the one raised.
    Returns whether every upload it found is aborted (False where they cannot be listed); ``warn=False``: says nothing
    of what it could not abort (the caller finishes that upload instead)."""
    now = _open_uploads(path, inner) if before is not None else None
    if now is None:
        if warn:
            log.warning("%s: the failed multipart upload is left open on the bucket (it takes boto3 and the "
                        "s3:ListBucketMultipartUploads permission to abort it; a lifecycle rule with "
                        "AbortIncompleteMultipartUpload removes it)", path)
        return False
    bucket, key = inner.split("/", 1)
    aborted = True
    for upload_id in sorted(now - before):
        try:
            _s3_client(split_query(path)[1]).abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # botocore's errors, a network error: the write's own error is the one raised
            aborted = False
            if warn:
                log.warning("%s: the failed multipart upload %s could not be aborted (%s); a bucket lifecycle rule "
                            "(AbortIncompleteMultipartUpload) removes it", path, upload_id,
                            (str(exc) or repr(exc)).splitlines()[0])
    return aborted


_S3_CLIENTS: dict[tuple, Any] = {}  # boto3's S3 clients, once built, by the options they were built with
_S3_CLIENT_LOCK = threading.Lock()


def _s3_client(query: str = "") -> Any:
    """boto3's S3 client for an S3 URI's options (``query``), built once for each: it reads the same environment as
    pyarrow's (``AWS_ENDPOINT_URL``, the credential chain), and where the URI names the store
    (``endpoint_override``, ``scheme``, ``region``, ``tls_ca_file_path``), the same store pyarrow wrote to: an
    upload left open on a MinIO named only in the URI is aborted there, not looked for at AWS. A client is safe to
    share between threads. Building it is not: ``upload_dir``'s threads each ask for it at their first large file,
    and boto3's sessions may fail when several build clients at once (a KeyError in its loaders), which
    ``_open_uploads`` would take for "cannot list" and leave a failed upload open. So it is built under a lock,
    from a session of its own."""
    options = _boto3_options(query)
    key = tuple(sorted(options.items()))
    with _S3_CLIENT_LOCK:
        if key not in _S3_CLIENTS:
            import boto3

            _S3_CLIENTS[key] = boto3.session.Session().client("s3", **options)
        return _S3_CLIENTS[key]


def _boto3_options(query: str) -> dict[str, Any]:
    """boto3's ``client("s3", ...)`` arguments for the pyarrow S3 options in ``query`` that say where the store
    is; {} when it names none (boto3 then reads the environment, as pyarrow did)."""
    given: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        given.setdefault(key, value)  # a repeated option: pyarrow takes its first value
    scheme, options = given.get("scheme") or "https", {}
    endpoint = given.get("endpoint_override")
    if endpoint:  # pyarrow's endpoint is host:port, its scheme apart (or a whole URL, which it takes as it is)
        options["endpoint_url"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    elif scheme == "http":
        options["use_ssl"] = False
    if given.get("region"):
        options["region_name"] = given["region"]
    if given.get("tls_ca_file_path"):
        options["verify"] = given["tls_ca_file_path"]
    if given.get("tls_verify_certificates", "").lower() in ("false", "0", "no"):  # a self-signed MinIO
        options["verify"] = False
    return options


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
    """The whole JSON file, atomically (``write_bytes``). ``sort_keys=False`` keeps the dict's order where a reader
    shows it (``dataset.json``'s label sets are listed in the order its writer gave)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def list_files(path: str) -> list[str]:
    """Every file under a folder (any depth), as full paths or URIs like ``path``, sorted; [] when absent.

    One listing (on S3 a paged LIST, 1000 keys per request), no per-file request."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return sorted(join(path, posixpath.relpath(i.path, inner)) for i in infos if i.type == pafs.FileType.File)


def delete_file(path: str) -> None:
    """Remove a file if it is there."""
    fs, inner = filesystem(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        pass
    except OSError:
        if fs.get_file_info(inner).type != pafs.FileType.NotFound:
            raise


def delete_dir(path: str) -> None:
    """Remove a folder (every object under the prefix) if it is there."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(inner)


def upload_dir(local_dir: str, target: str, keep: Collection[str] = ()) -> None:
    """Copy a local folder to ``target`` (local or URI), replacing what was there.

    Locally the copy is staged beside the target and swapped into place (``atomic_dir.replace_dir``), so a reader
    never sees half a folder. An object store has no rename: the files are written one by one over the old ones,
    each whole, then the old files the new folder lacks are removed (and the folders they leave empty), except those
    named in ``keep`` (paths relative to ``target``). A reader during the upload finds a mix of old and new files
    (and not yet the files only the new folder has); ``folders.upload_folder`` adds the manifest that lets a reader
    tell. A file whose upload fails raises, and leaves its old object (or none), never a part of the new one
    (``_upload_files``). Cost: one PUT per file under 10 MB, 3 requests and one more per 10 MB above (plus one LIST
    of the key's open uploads with boto3); one LIST of the folder, one DELETE per old file it no longer has.
    """
    local_target = local_path(target)
    if local_target is not None:
        atomic_dir.replace_dir(local_target, lambda staging: shutil.copytree(local_dir, staging, dirs_exist_ok=True))
        return
    fs, inner = filesystem(target)
    files = sorted(os.path.relpath(os.path.join(folder, f), local_dir).replace(os.sep, "/")
                   for folder, _, names in os.walk(local_dir) for f in names)
    if str(target).split("://", 1)[0] not in OBJECT_STORES:  # a filesystem with folders (HDFS): made first
        for folder in sorted({posixpath.dirname(name) for name in files}):
            fs.create_dir(posixpath.join(inner, folder).rstrip("/"), recursive=True)
    _upload_files(fs, local_dir, target, inner, files)
    new = set(files) | set(keep)
    new_dirs = {posixpath.dirname(name) for name in new}
    new_dirs |= {d for name in new_dirs for d in _ancestors(name)}
    old = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    for info in old:
        relative = posixpath.relpath(info.path, inner)
        if info.type == pafs.FileType.File and relative not in new:
            delete_file(join(target, relative))
    for info in old:  # after the files: deleting a folder's last file leaves a marker of it (pyarrow keeps parents)
        relative = posixpath.relpath(info.path, inner)
        if info.type == pafs.FileType.Directory and relative not in new_dirs:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_dir(info.path)


UPLOAD_THREADS = 8  # files uploaded at once: a small file is one PUT, mostly waiting (a big one's parts go in parallel)


def _upload_files(fs: pafs.FileSystem, local_dir: str, target: str, inner: str, files: list[str]) -> None:
    """Each of ``files`` (relative to ``local_dir``) to ``inner/file`` on ``fs``, whole or not at all
    (``_put_object``), ``UPLOAD_THREADS`` at once. The first failure stops the files not yet begun and is raised
    once those begun are done (each of them whole, or nothing new).

    Why not ``pyarrow.fs.copy_files``: it copies a file as a stream of 1 MB writes and never closes the stream, its
    destructor does, so with pyarrow 25 a refused part was only an "Error ignored when destroying file" on stderr:
    the upload returned, the old object stayed, the upload stayed open; and, with delayed open, a refused
    CreateMultipartUpload of a file over 10 MB left its first 10 MB part as the object (both seen on the moto
    server). Here a file is written by ``_put_object`` and closed, and no folder markers are made (copy_files PUT
    one per folder level, some twice).

    Memory: a large file is mapped, and the pages of each part are dropped from this process once pyarrow copied
    them (``madvise``; the page cache keeps them): a mapped file counts in resident memory as it is read, and a 400 MB
    one added its 400 MB to the peak. With ``_put_object``'s bound, a file adds ~100 MB at most, whatever its size
    (``UPLOAD_THREADS`` of them at once)."""
    import mmap

    def upload(name: str) -> None:
        local = os.path.join(local_dir, name)
        if os.path.getsize(local) < SINGLE_PUT_BYTES:  # one PUT; mmap refuses an empty file
            with open(local, "rb") as f:
                data = f.read()
            _put_object(fs, join(target, name), posixpath.join(inner, name), data)
            return
        with open(local, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            def drop(start: int, end: int) -> None:
                with contextlib.suppress(AttributeError, OSError, ValueError):  # no madvise: pages stay until unmapped
                    mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

            _put_object(fs, join(target, name), posixpath.join(inner, name), mapped, sent=drop)

    pool = ThreadPoolExecutor(max_workers=max(1, min(UPLOAD_THREADS, len(files))))
    try:
        for future in [pool.submit(upload, name) for name in files]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ancestors(folder: str) -> list[str]:
    """``a/b/c`` -> [``a``, ``a/b``]."""
    parts = folder.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def download_dir(source: str, local_dir: str) -> str:
    """Copy a folder (local or URI) into ``local_dir``; returns ``local_dir``."""
    fs, inner = filesystem(source)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(source)
    copy_to_local(fs, inner, local_dir)
    return local_dir


PART_BYTES = 16 << 20  # one ranged GET
COPY_THREADS = 16  # GETs in flight: 256 MB of buffers at most


def _read_exact(src: Any, size: int, offset: int, name: str) -> bytes:
    """``size`` bytes at ``offset`` of an open random-access file (one ranged GET on an object store)."""
    data = src.read_at(size, offset)
    if len(data) != size:
        raise OSError(f"{name}: {len(data)} bytes at offset {offset}, expected {size}")
    return data


def read_all(src: Any, name: str, part_bytes: int | None = None, threads: int = COPY_THREADS) -> bytes:
    """All of the open random-access file ``name`` (a ``pyarrow.NativeFile``): one read up to ``part_bytes``
    (default ``PART_BYTES``), else ``threads`` ranged reads of ``part_bytes`` at once."""
    part_bytes = part_bytes or PART_BYTES
    size = src.size()
    if size <= part_bytes:
        return _read_exact(src, size, 0, name)
    out = bytearray(size)
    view = memoryview(out)

    def read_part(offset: int) -> None:
        n = min(part_bytes, size - offset)
        view[offset:offset + n] = _read_exact(src, n, offset, name)

    offsets = range(0, size, part_bytes)
    with ThreadPoolExecutor(max_workers=min(threads, len(offsets))) as pool:
        list(pool.map(read_part, offsets))
    return bytes(out)


def copy_to_local(fs: pafs.FileSystem, path: str, local_dir: str, part_bytes: int = PART_BYTES,
                  threads: int = COPY_THREADS, only: Collection[str] | None = None) -> None:
    """Copy the folder ``path`` on ``fs`` into ``local_dir``, each file in ``part_bytes`` ranged reads, ``threads``
    of them at once across all files.

    Why not ``pyarrow.fs.copy_files``: it reads a file as one sequence of 1 MB GETs, each waiting for the one before,
    so a file costs a request round trip per MB: a 1.8 GB vit-b-16 checkpoint is 1,800 GETs in a row, which a
    restart waits for (``benchmarks/restore_download.py`` measures both against a modelled first-byte latency).
    Ranged reads in parallel are what object stores are built for (S3's guidance: 8-16 MB parts).
    """
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    folders = [posixpath.relpath(i.path, path) for i in infos if i.type == pafs.FileType.Directory]
    if only is not None:  # some of the files (paths relative to ``path``); those not there are not copied
        wanted = set(only)
        files = [i for i in files if posixpath.relpath(i.path, path) in wanted]
        folders = sorted({posixpath.dirname(posixpath.relpath(i.path, path)) for i in files} - {""})
    os.makedirs(local_dir, exist_ok=True)
    for folder in folders:
        os.makedirs(os.path.join(local_dir, folder), exist_ok=True)
    per_round = 4 * threads  # files open at once: a dataset folder may hold thousands
    for first in range(0, len(files), per_round):
        _copy_files_in_parts(fs, [(i, os.path.join(local_dir, posixpath.relpath(i.path, path)))
                                  for i in files[first:first + per_round]], part_bytes, threads)


def download_file(source: str, local_file: str) -> str:
    """Copy one file (local or URI) to ``local_file`` in parallel ranged reads written straight to disk; returns
    ``local_file``. ``read_bytes`` would hold it in memory twice (its buffer and the bytes made of it): 3.4 GB for
    the 1.7 GB ViT-L checkpoint a ``model.init_from`` names, in every worker at once.

    An object replaced while it is copied is copied again, as ``_read_object`` reads one again: its size and time
    are looked up before and after (a HEAD each)."""
    fs, inner = filesystem(source)
    deadline, wait = time.monotonic() + REPLACED_WAIT_S, 0.01
    while True:
        before, failure = fs.get_file_info(inner), None
        if before.type == pafs.FileType.NotFound:
            raise FileNotFoundError(source)
        if before.type != pafs.FileType.File:
            raise OSError(f"{source}: not a file")
        try:
            _copy_files_in_parts(fs, [(before, local_file)], PART_BYTES, COPY_THREADS)
        except OSError as exc:
            if exc.errno is not None:  # this machine's (a full disk): copying again will not mend it
                raise
            failure = exc  # the store's: a ranged GET past the end of a shorter new version
        after = fs.get_file_info(inner)
        if after.type == pafs.FileType.NotFound:
            raise FileNotFoundError(source) from failure
        held = (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
        if held and failure is not None:
            raise failure
        if held:
            return local_file
        if time.monotonic() > deadline:
            raise OSError(f"{source}: replaced while being read, again and again for {REPLACED_WAIT_S:.0f} s")
        time.sleep(wait * (0.5 + random.random()))
        wait = min(wait * 2, 1.0)


def _copy_files_in_parts(fs: pafs.FileSystem, files: list[tuple[pafs.FileInfo, str]], part_bytes: int,
                         threads: int) -> None:
    """Each (file on ``fs``, local path) copied in ranged reads of ``part_bytes``, ``threads`` at once."""
    parts: list[tuple[Any, int, int, int, str]] = []  # (source, destination fd, offset, bytes, path)
    opened: list[Any] = []
    try:
        for info, destination in files:
            src = fs.open_input_file(info.path)
            opened.append(src)
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            opened.append(fd)
            parts += [(src, fd, offset, min(part_bytes, info.size - offset), info.path)
                      for offset in range(0, info.size, part_bytes)]

        def copy_part(part: tuple[Any, int, int, int, str]) -> None:
            src, fd, offset, size, name = part
            view = memoryview(_read_exact(src, size, offset, name))
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written

        if parts:
            with ThreadPoolExecutor(max_workers=min(threads, len(parts))) as pool:
                list(pool.map(copy_part, parts))
    finally:
        for handle in opened:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()


def ordered_prefetch(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed by ``threads`` threads at most ``2 * threads`` items ahead;
    closing the generator early cancels what has not started. For reading many files from an object store, where
    each read mostly waits (``data ingest``'s remote images, the tokenizer's caption columns)."""
    from collections import deque

    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    pending: deque = deque()
    todo = iter(items)
    try:
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * max(1, threads):
                break
        while pending:
            result = pending.popleft().result()
            for item in todo:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
