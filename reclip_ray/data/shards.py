"""Parquet shards on any filesystem (a local folder or a URI): the floor every data module stands on.

What a shard file is, without decoding a row: where the shards of a dataset are (``list_parquet_files``), what
each footer says (``footers``: row counts, row groups, the schema, null counts of the image columns, the copy
metadata and Hugging Face ClassLabels, read once per process), which shrunk copies a footer vouches for
(``footer_copies``), and how a shard is written so that no reader ever sees half of one (``write_parquet_atomic``).
Paths stay strings and go through ``reclip_ray.storage``; nothing here imports another data module, so the
modules above (``schema``, ``stream``, ``copies``, ``ingest``, ``tokenizer``, ``local``, ``pipeline``) share
one footer cache without importing each other.

Cost at scale: the footers are read once per run on the driver (a thread pool; 140k shards is a few minutes of
small reads on object storage, once). ``footers`` keeps what each footer says for the life of the process, keyed
by (path, size, mtime), so the launch's schema check, eval-set checks, tokenizer and phase streams share that one
read; a listing records each file's (size, mtime), so a cache lookup needs no request of its own. The footers of
listed files are also kept on the local disk (``footer_cache_file``: one file per listing), so the next launch on
the same data (a resume, a rerun, a sweep's next trial) reads only the shards that changed since.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reclip_ray import storage
from reclip_ray.errors import DataError

# ------------------------------------------------------------------------------------------------ column types

HF_IMAGE_FIELD = "bytes"  # Hugging Face ``datasets`` stores an Image feature as struct<bytes: binary, path: string>


# The view layouts came with pyarrow 16; an older pyarrow reads no file that holds them.
_is_binary_view = getattr(pa.types, "is_binary_view", lambda type_: False)
_is_string_view = getattr(pa.types, "is_string_view", lambda type_: False)


def is_binary(type_: pa.DataType) -> bool:
    """Any Arrow binary layout: Polars writes ``binary_view`` (its ``Binary``), Spark and pandas ``binary``."""
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or _is_binary_view(type_)


def is_string(type_: pa.DataType) -> bool:
    """Any Arrow string layout, and strings behind a dictionary (a pandas ``Categorical`` column)."""
    if pa.types.is_dictionary(type_):
        return is_string(type_.value_type)
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or _is_string_view(type_)


def is_image_type(type_: pa.DataType) -> bool:
    """Encoded image bytes: a binary column, or Hugging Face ``datasets``' Image feature (``HF_IMAGE_FIELD``)."""
    return is_binary(type_) or hf_image_bytes_type(type_) is not None


def hf_image_bytes_type(type_: pa.DataType) -> pa.DataType | None:
    """The type of the ``bytes`` child when ``type_`` is a struct with a binary ``bytes`` child, else None."""
    if not pa.types.is_struct(type_):
        return None
    index = type_.get_field_index(HF_IMAGE_FIELD)
    return type_.field(index).type if index >= 0 and is_binary(type_.field(index).type) else None


def hf_class_labels(raw: bytes | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``((column, class names), ...)`` of the top-level ClassLabel features in the ``huggingface`` entry that
    ``datasets`` writes into a Parquet footer (``{"info": {"features": {col: {"_type": "ClassLabel", "names":
    [...]}}}}``). Optional metadata: an entry that does not parse gives no class labels, not an error."""
    if not raw:
        return ()
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
        return tuple((str(col), tuple(str(n) for n in spec["names"])) for col, spec in features.items()
                     if isinstance(spec, dict) and spec.get("_type") == "ClassLabel" and spec.get("names"))
    except (ValueError, AttributeError, TypeError):
        return ()


# ------------------------------------------------------------------------------------------------ copy metadata

COPIES_KEY = b"reclip.copies"  # the footer entry that vouches for a shard's shrunk copies (``copies``)


def copy_column(image_column: str, size: int) -> str:
    """The column holding the ``size`` px copies of ``image_column`` (``image_40``)."""
    return f"{image_column}_{int(size)}"


def footer_copies(meta: Any, image_column: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(valid sizes, stale sizes) of a shard's copies, from its footer (``pyarrow.parquet.FileMetaData``) alone."""
    pattern = re.compile(re.escape(image_column) + r"_(\d+)$")
    present = {int(m.group(1)) for name in meta.schema.names if (m := pattern.match(name))}
    if not present:
        return (), ()
    try:
        info = json.loads((meta.metadata or {}).get(COPIES_KEY, b"{}"))
    except ValueError:
        info = {}
    vouched = info.get("column") == image_column and info.get("rows") == meta.num_rows
    valid = {s for s in present if vouched and s in info.get("sizes", ())}
    return tuple(sorted(valid)), tuple(sorted(present - valid))


# ------------------------------------------------------------------------------------------------ listing


def _file_info(fs: pafs.FileSystem, inner: str, unreadable: Callable[[Exception], str], missing: str) -> pafs.FileInfo:
    """``fs.get_file_info(inner)`` of a path that must exist: a one-line DataError, ``unreadable(exc)`` when the
    filesystem cannot answer (credentials, network), ``missing`` when nothing is there."""
    try:
        info = fs.get_file_info(inner)
    except Exception as exc:
        raise DataError(unreadable(exc)) from exc
    if info.type == pafs.FileType.NotFound:
        raise DataError(missing)
    return info


GLOB_CHARS = "*?["
# A Hugging Face Hub export's shard names: SPLIT-00000-of-00004.parquet (older exports add -HASH before .parquet).
HF_SPLIT_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]{8,})?\.parquet$")


def is_hidden(relative: str) -> bool:
    """A path below a dataset's folder that is not the dataset's, as ``pyarrow.dataset`` reads it: one of its names
    starts with ``.`` or ``_`` (Spark's ``_temporary/``, Delta's ``_delta_log/``, ``.ipynb_checkpoints/``)."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def split_pattern(path: str) -> tuple[str, str]:
    """(folder, pattern): ``hub/data/train-*.parquet`` -> (``hub/data``, ``train-*.parquet``); a path without
    wildcards -> (path, ""). A URI's query (its store's options, ``storage.split_query``) stays with the folder: in
    a URI ``?`` is no wildcard, ``[...]`` matches one character instead."""
    base, query = storage.split_query(str(path))
    parts = base.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), len(parts))
    folder = "/".join(parts[:first])
    return (f"{folder}?{query}" if query else folder), "/".join(parts[first:])


def list_parquet_files(path: str | os.PathLike) -> list[str]:
    """Sorted Parquet files under a folder (any nesting), a single file, a URI, or a wildcard pattern
    (``hub/data/train-*.parquet``, ``s3://b/laion/part-*/*.parquet``: ``*``, ``?`` and ``[...]`` match within one
    folder level, but in a URI ``?`` starts the store's options; a path that exists as written is never read as a
    pattern, whatever its characters).

    URIs come back as URIs (scheme and host kept) so Ray Data / pyarrow can open them again without the caller
    keeping the filesystem object around. Skipped, as ``pyarrow.dataset`` skips them: files and folders whose
    names start with ``.`` or ``_`` below the folder (a Spark job's ``_temporary/``, a Delta table's
    ``_delta_log/``, ``.ipynb_checkpoints/``), and ``*.tmp`` leftovers of an interrupted writer. A folder that
    holds several splits of a Hugging Face export side by side (``train-00000-of-00002.parquet`` beside
    ``test-00000-of-00001.parquet``) is refused: a pattern names one split (or all of them). Each file's (size,
    mtime) is noted for the footer cache, so a later ``footers`` call needs no stat.

    Cost: one recursive LIST of a folder (on S3 1,000 keys a request); a pattern lists only the folders its
    levels match, one LIST each, so ``s3://bucket/*.parquet`` does not list the whole bucket.
    """
    path = str(path)
    root, pattern = split_pattern(path)
    if pattern and storage.exists(path):  # a folder literally named run[1] or a?b
        root, pattern = path, ""
    if "**" in pattern:
        raise DataError(f"{path}: '**' is not a pattern here; '*' matches one folder level (a folder is listed "
                        f"with all its subfolders: name the folder)")
    root = root or "."  # a pattern relative to the working directory: "*.parquet"
    fs, inner = storage.filesystem(root)
    info = _file_info(fs, inner, lambda exc: f"cannot read {path}: {exc}",
                      f"no Parquet files under {path} (path does not exist)")
    if info.type == pafs.FileType.File:
        found = [(path if storage.is_uri(root) else info.path, info)] if inner.endswith(".parquet") and not pattern \
            else []
    else:
        top = inner.rstrip("/")
        listed = (_glob(fs, top, pattern.split("/")) if pattern
                  else fs.get_file_info(pafs.FileSelector(top, recursive=True)))
        found = []
        for i in listed:
            relative = i.path[len(top) + 1:]
            if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not is_hidden(relative):
                found.append((storage.join(root, relative) if storage.is_uri(root) else i.path, i))
        found.sort()
        if not pattern:
            _refuse_mixed_splits([f for f, _ in found])
    if not found:
        raise DataError(f"no Parquet files under {path}" if not pattern else f"no Parquet files match {path}")
    for f, i in found:  # the footer cache's key: a cached footer is reused while these are unchanged
        note_listing(f, i.size, i.mtime_ns)
    files = [f for f, _ in found]
    _note_listing_root(storage.normalize(path), files)
    return files


def _glob(fs: pafs.FileSystem, folder: str, levels: list[str]) -> Iterator[pafs.FileInfo]:
    """The entries under ``folder`` whose path below it matches ``levels`` one folder level each (shell-style),
    listing only the folders that match on the way down."""
    head, rest = levels[0], levels[1:]
    for entry in fs.get_file_info(pafs.FileSelector(folder)):
        name = entry.path.rstrip("/").rsplit("/", 1)[-1]
        if not fnmatch.fnmatchcase(name, head):
            continue
        if not rest:
            yield entry
        elif entry.type == pafs.FileType.Directory:
            yield from _glob(fs, entry.path.rstrip("/"), rest)


def _refuse_mixed_splits(files: list[str]) -> None:
    """One line when a folder holds shards of several Hugging Face splits: training on it would train on the
    test split too, and evaluating on it would score the training rows."""
    splits: dict[str, set[str]] = {}
    for f in files:
        folder, name = storage.parent(f), storage.name(f)  # a URI's query stays with the folder
        match = HF_SPLIT_SHARD.match(name)
        if match:
            splits.setdefault(folder, set()).add(match["split"])
    for folder, names in splits.items():
        if len(names) > 1:
            ordered = sorted(names, key=lambda n: (n != "train", n))
            raise DataError(f"{folder} holds the splits {', '.join(ordered)} of a Hugging Face export side by "
                            f"side: using them all would mix them; name one, e.g. "
                            f"{storage.join(folder, ordered[0] + '-*.parquet')} "
                            f"(or all of them: {storage.join(folder, '*.parquet')})")


# ------------------------------------------------------------------------------------------------ footers

FOOTER_THREADS = 32
FOOTER_PROBE = 32  # footers read one by one and timed before deciding whether threads help (``footers``)
FOOTER_IO_BOUND_S = 0.0005  # a local-disk footer parses in ~0.1 ms; object storage takes 10-50 ms per read
MAX_SCHEMAS = 64  # distinct Parquet schemas kept for reuse (``_schema_of``); more are converted per file


@dataclass(frozen=True)
class Shard:
    """What the footer says about one Parquet file (no data read)."""

    path: str
    rows: int
    row_groups: tuple[int, ...]  # rows per row group, in file order
    absent: int = 0  # null cells in the image column (footer statistics; 0 when the writer kept none)
    copies: tuple[int, ...] = ()  # sizes of the shrunk copies the footer vouches for (``footer_copies``)
    stale_copies: tuple[int, ...] = ()  # copy columns present but not vouched for: never read


def read_footers(files: Sequence[str], image_column: str = "image", threads: int = FOOTER_THREADS) -> list[Shard]:
    """Every file's footer as a ``Shard``: read at most once per process, in parallel (see ``footers``)."""
    return [f.shard(image_column) for f in footers(files, threads)]


@dataclass(frozen=True)
class Footer:
    """What one Parquet footer says, kept by ``footers`` so that no launch step reads it a second time.

    Compact on purpose: pyarrow's ``FileMetaData`` costs ~9 KiB per small file (over 1 GB for 140k shards); this
    keeps the row counts, one shared ``pyarrow.Schema`` per distinct schema, the non-zero null counts, the
    footer's ``reclip.*`` key-value entries (what ``footer_copies`` reads) and the ClassLabel names of a
    Hugging Face ``datasets`` footer (one shared tuple per distinct ``huggingface`` entry: ``_class_labels``).
    """

    path: str
    rows: int
    row_groups: tuple[int, ...]  # rows per row group, in file order
    schema: Any  # pyarrow.Schema without metadata, interned: files with equal schemas share one object
    null_counts: tuple[tuple[str, int], ...] = ()  # (image-like column, nulls) from row-group statistics, nulls > 0
    reclip_metadata: tuple[tuple[bytes, bytes], ...] = ()  # the footer's key-value entries named reclip.*
    class_labels: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, class names): ``hf_class_labels``

    def shard(self, image_column: str = "image") -> Shard:
        """The phase stream's view: rows, row groups, the image column's nulls (absent samples), shrunk copies."""
        view = SimpleNamespace(schema=self.schema, metadata=dict(self.reclip_metadata), num_rows=self.rows)
        copies, stale = footer_copies(view, image_column)
        return Shard(self.path, self.rows, self.row_groups, dict(self.null_counts).get(image_column, 0), copies, stale)


# path -> ((size, mtime_ns), Footer). Process-wide on purpose: the driver's launch steps (prepare's schema check,
# the eval-set checks, the tokenizer, build_datasets) each take a file list, and this is how they share one read.
_FOOTERS: dict[str, tuple[tuple[int, int], Footer]] = {}
_LISTED: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) as the latest ``list_parquet_files`` saw it
_SCHEMAS: dict[str, list] = {}  # "entries": the distinct Parquet schemas seen (``_schema_of``); "arrow": their
# Arrow schemas, one object each, which footers loaded from the disk cache share too (``_intern_schema``)
_CLASS_LABELS: dict[bytes, tuple] = {}  # a footer's ``huggingface`` entry -> its parsed ClassLabels (``_class_labels``)
FOOTER_READS = [0]  # footers read from storage by this process (the tests count them)


def note_listing(path: str, size: int | None, mtime_ns: int | None) -> None:
    """Record a file's (size, mtime) as a listing saw it, so a cache lookup needs no stat of its own (on object
    storage a stat is a HEAD request, as slow as reading the footer)."""
    _LISTED[path] = (int(size or 0), int(mtime_ns or 0))


def clear_footer_cache() -> None:
    """Forget every footer and listing this process holds (the cache on disk stays, and is read again)."""
    _FOOTERS.clear()
    _LISTED.clear()
    _SCHEMAS.clear()
    _CLASS_LABELS.clear()
    _ROOT_OF.clear()
    _ROOTS.clear()
    _DISK_STALE.clear()
    _DISK_FAILED.clear()


def footers(files: Sequence[str], threads: int = FOOTER_THREADS) -> list[Footer]:
    """Every file's ``Footer``, in order: each read at most once per process; many in parallel when reads wait on
    storage.

    The first ``FOOTER_PROBE`` footers not cached are read one by one and timed. Slower than
    ``FOOTER_IO_BOUND_S`` each, the reads wait on storage (object storage, NFS: one small read at a time, ms
    each) and the rest go ``threads`` at a time. Faster, they are parsing on a local disk, where Python threads only
    contend for the GIL (measured here: 20,000 footers took twice as long with 32 threads as with one), so the
    rest are read in this thread too.

    A cached footer is reused while the file's (size, mtime) is unchanged: taken from the latest listing when
    ``list_parquet_files`` saw the file, else from a stat. For a listed file, a footer an earlier process read is
    taken from the listing's cache file on disk (``_load_footer_cache``) under the same rule, and the file is
    rewritten after this call read what it lacked (``_save_footer_cache``). A file rewritten in place with the same
    size within the filesystem's mtime resolution (on S3 a second) would be missed; shard writers here write a temp
    file and rename it.
    """
    files = list(files)
    out: list[Footer | None] = [None] * len(files)
    todo: list[int] = []
    for i, f in enumerate(files):
        out[i] = _fresh(f)
        if out[i] is None:
            todo.append(i)
    roots = {root for i in todo if (root := _ROOT_OF.get(files[i])) is not None}
    if roots:  # files of a listing: what an earlier process read of it may be on disk
        for root in roots:
            _load_footer_cache(root)
        for i in todo:
            out[i] = _fresh(files[i])
        todo = [i for i in todo if out[i] is None]
    t0 = time.perf_counter()
    for i in todo[:FOOTER_PROBE]:
        out[i] = _cached_footer(files[i])
    rest = todo[FOOTER_PROBE:]
    io_bound = (time.perf_counter() - t0) / max(1, min(FOOTER_PROBE, len(todo))) > FOOTER_IO_BOUND_S
    if rest and io_bound and threads > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(rest))) as pool:
            for i, footer in zip(rest, pool.map(lambda i: _cached_footer(files[i]), rest)):
                out[i] = footer
    else:
        for i in rest:
            out[i] = _cached_footer(files[i])
    for root in roots:  # rewritten after reading what it lacked, or when it holds files no longer listed
        if _DISK_STALE.get(root) or any(_ROOT_OF.get(files[i]) == root for i in todo):
            _save_footer_cache(root)
    return out  # type: ignore[return-value]


def _fresh(file: str) -> Footer | None:
    """The cached footer of ``file`` if the latest listing saw the file as it was when the footer was read."""
    hit = _FOOTERS.get(file)
    return hit[1] if hit is not None and _LISTED.get(file) == hit[0] else None


def _cached_footer(file: str) -> Footer:
    stamp = _LISTED.get(file)
    if stamp is None:
        fs, inner = storage.filesystem(file)
        info = _file_info(fs, inner, lambda exc: f"{file}: cannot read ({exc})", f"{file}: shard not found")
        stamp = (int(info.size or 0), int(info.mtime_ns or 0))
    hit = _FOOTERS.get(file)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    footer = _footer(file)
    _FOOTERS[file] = (stamp, footer)
    return footer


def _footer(file: str) -> Footer:
    fs, inner = storage.filesystem(file)
    try:
        with fs.open_input_file(inner) as fh:
            meta = pq.ParquetFile(fh).metadata
            kv = meta.metadata or {}
            schema, binary_leaves = _schema_of(meta)
    except FileNotFoundError:
        raise DataError(f"{file}: shard not found") from None
    except Exception as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from exc
    FOOTER_READS[0] += 1
    nulls = dict.fromkeys(binary_leaves, 0)
    groups = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        groups.append(rg.num_rows)
        for c, path in binary_leaves.items():
            stats = rg.column(c).statistics
            if stats is not None and stats.has_null_count:
                nulls[c] += stats.null_count
    for c, name in binary_leaves.items():
        if pa.types.is_null(schema.field(name).type):  # no statistics: every row is null
            nulls[c] = meta.num_rows
    ours = tuple(sorted((k, v) for k, v in kv.items() if k.startswith(b"reclip.")))
    return Footer(file, meta.num_rows, tuple(groups), schema,
                  tuple((binary_leaves[c], n) for c, n in nulls.items() if n), ours,
                  _class_labels(kv.get(b"huggingface")))


def _class_labels(raw: bytes | None) -> tuple:
    """The ClassLabels of a ``huggingface`` footer entry, parsed once per distinct entry: the shards of one dataset
    share the entry, so 140k footers keep one tuple between them (a pointer each), not 140k copies of the JSON."""
    if not raw:
        return ()
    hit = _CLASS_LABELS.get(raw)
    if hit is None:
        hit = hf_class_labels(raw)
        if len(_CLASS_LABELS) < MAX_SCHEMAS:
            _CLASS_LABELS[raw] = hit
    return hit


def _schema_of(meta: Any) -> tuple[Any, dict[int, str]]:
    """(Arrow schema without metadata, {leaf index: column} of the image-like columns) of a footer, computed once
    per distinct Parquet schema: most datasets have one, and converting it for each of 140k footers is a fifth of
    the read. Null counts are kept for the candidate image columns only (absent samples): binary columns, and the
    ``bytes`` leaf of a Hugging Face Image struct, counted under the struct's name (a Parquet leaf's null count
    includes the rows where its parent struct is null, so it counts both ways ``datasets`` leaves an image out).

    Files with equal Parquet schemas share the first one's Arrow schema. Their own ``ARROW:schema`` metadata could
    differ in detail (string vs large_string, say), which no reader here distinguishes; it is not part of the
    key because img2dataset's pandas metadata (in it) differs in every file. Parquet's schema equality compares
    leaf names only (``img.bytes`` equals ``image.bytes``), so the paths of nested leaves are compared too (~2 us
    a leaf: 4 us for a Hugging Face Image struct; flat schemas, whose leaf names are their paths, have none).
    """
    entries = _SCHEMAS.setdefault("entries", [])
    for parquet_schema, nested, arrow, leaves in entries:
        if parquet_schema.equals(meta.schema) and all(meta.schema.column(c).path == p for c, p in nested):
            return arrow, leaves
    arrow = _intern_schema(meta.schema.to_arrow_schema().remove_metadata())
    images = {f.name for f in arrow if is_image_type(f.type)}
    # A column of nulls only (pandas writes an all-None or empty image column so) counts its rows absent, as nulls.
    binary = {f.name for f in arrow if is_binary(f.type) or pa.types.is_null(f.type)}
    leaf_of = {name: name for name in binary} | {f"{name}.{HF_IMAGE_FIELD}": name for name in images - binary}
    leaves = {c: leaf_of[meta.schema.column(c).path] for c in range(meta.num_columns)
              if meta.schema.column(c).path in leaf_of}
    if len(entries) < MAX_SCHEMAS:
        nested = tuple((c, meta.schema.column(c).path) for c in range(meta.num_columns)
                       if "." in meta.schema.column(c).path)
        entries.append((meta.schema, nested, arrow, leaves))
    return arrow, leaves


def _intern_schema(schema: pa.Schema) -> pa.Schema:
    """The first schema seen that equals ``schema`` (field metadata included), so footers read from a shard and
    footers loaded from the disk cache share one object per distinct schema."""
    known = _SCHEMAS.setdefault("arrow", [])
    for other in known:
        if other.equals(schema, check_metadata=True):
            return other
    if len(known) < MAX_SCHEMAS:
        known.append(schema)
    return schema


# ------------------------------------------------------------------------------------------------ footer cache on disk
#
# Every launch on the same data used to read every footer again: at 140k shards on S3, 140k HEADs and 140k ranged GETs
# (minutes of the driver) before any worker starts, at each resume, rerun and sweep trial. The footers of each listing
# are kept in one Arrow IPC file on the driver's disk; a later process that lists the same path takes each entry whose
# (size, mtime_ns) equals the listing's (the in-process rule of ``footers``) and reads only the rest. Never fatal: an
# unreadable, corrupt or other-version file is ignored (and rewritten), an unwritable folder means no cache.

FOOTER_CACHE_VERSION = 1
CACHE_ENV = "RECLIP_CACHE_DIR"  # the cache folder; set to the empty string, no cache
_CACHE_META = b"reclip.footer_cache"  # the IPC schema's metadata: version, listing, the distinct schemas and labels
_CACHE_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("rows", pa.int64()),
    ("row_groups", pa.list_(pa.int64())), ("schema", pa.int32()),  # an index into the metadata's schemas
    ("null_columns", pa.list_(pa.string())), ("null_counts", pa.list_(pa.int64())),
    ("reclip_keys", pa.list_(pa.binary())), ("reclip_values", pa.list_(pa.binary())),
    ("class_labels", pa.int32()),  # an index into the metadata's class labels (one entry per distinct tuple)
])
_TEMP_AGE_S = 3600  # a temp file this old beside a cache file is a killed writer's: removed by the next writer
_ROOT_OF: dict[str, str] = {}  # listed file -> the listing it came from (``storage.normalize`` of the listed path)
_ROOTS: dict[str, tuple[str, ...]] = {}  # listing -> its files, as the latest ``list_parquet_files`` saw them
_DISK_STALE: dict[str, bool] = {}  # listing -> its cache file holds entries to drop (only listings loaded)
_DISK_FAILED: list[str] = []  # cache files that could not be written: the first logged, none tried again
log = logging.getLogger(__name__)


def cache_dir() -> str | None:
    """reclip-ray's cache folder on this machine: ``$RECLIP_CACHE_DIR`` (set but empty: None, no cache), else
    ``$XDG_CACHE_HOME/reclip-ray``, else ``~/.cache/reclip-ray``. Read at each use, so a test can move it."""
    if CACHE_ENV in os.environ:
        chosen = os.environ[CACHE_ENV]
        return os.path.abspath(os.path.expanduser(chosen)) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "reclip-ray")


def footer_cache_file(listing: str) -> str | None:
    """The cache file of a listing (``storage.normalize`` of a path given to ``list_parquet_files``; a URI's options
    are part of the key but kept out of the file, which may hold credentials), or None with the cache off."""
    top = cache_dir()
    if top is None:
        return None
    digest = hashlib.sha256(listing.encode()).hexdigest()[:24]
    return os.path.join(top, "footers", f"{digest}.v{FOOTER_CACHE_VERSION}.arrow")


def _note_listing_root(listing: str, files: list[str]) -> None:
    _ROOTS[listing] = tuple(files)
    for f in files:
        _ROOT_OF[f] = listing


def _load_footer_cache(listing: str) -> None:
    """Put the cached footers of ``listing`` whose (size, mtime_ns) match its latest listing into ``_FOOTERS``.
    Once per listing and process; anything wrong with the file is logged (debug) and it is read as empty."""
    if listing in _DISK_STALE:
        return
    _DISK_STALE[listing] = True  # rewritten after the next read, unless the file below holds just what is listed
    file = footer_cache_file(listing)
    if file is None or not os.path.isfile(file):
        return
    try:
        with pa.OSFile(file) as source:
            reader = pa.ipc.open_file(source)
            meta = json.loads(reader.schema.metadata[_CACHE_META])
            if meta["version"] != FOOTER_CACHE_VERSION or meta["listing"] != storage.split_query(listing)[0]:
                raise ValueError(f"version {meta['version']} of {meta['listing']}")
            table = reader.read_all()
        if not table.schema.remove_metadata().equals(_CACHE_SCHEMA):
            raise ValueError(f"columns {table.schema.names}")
        schemas = [_intern_schema(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s)))) for s in meta["schemas"]]
        labels = [tuple((str(c), tuple(names)) for c, names in entry) for entry in meta["class_labels"]]
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
    except Exception as exc:  # corrupt, truncated, another version: read the footers again, then rewrite the file
        log.debug("footer cache %s of %s ignored: %s", file, listing, exc)
        return
    listed = {storage.split_query(f)[0]: f for f in _ROOTS.get(listing, ())}
    used = 0
    for i, key in enumerate(cols["path"]):
        f = listed.get(key)
        stamp = (cols["size"][i], cols["mtime_ns"][i])
        if f is None or _LISTED.get(f) != stamp:
            continue
        used += 1
        if _fresh(f) is None:
            _FOOTERS[f] = (stamp, Footer(f, cols["rows"][i], tuple(cols["row_groups"][i]), schemas[cols["schema"][i]],
                                         tuple(zip(cols["null_columns"][i], cols["null_counts"][i])),
                                         tuple(zip(cols["reclip_keys"][i], cols["reclip_values"][i])),
                                         labels[cols["class_labels"][i]]))
    _DISK_STALE[listing] = used < len(cols["path"])  # shards deleted or rewritten since: drop them


def _save_footer_cache(listing: str) -> None:
    """Write the footers of ``listing``'s files (its latest listing only, so deleted shards drop out) to its cache
    file: a temp file beside it, then ``os.replace``, so a reader (another launch) sees the old file or the new one
    and two writers leave one of theirs whole. An unwritable folder is logged (debug) once and not tried again."""
    file = footer_cache_file(listing)
    if file is None or file in _DISK_FAILED:
        return
    entries = [(f, hit) for f in _ROOTS.get(listing, ()) if (hit := _FOOTERS.get(f)) is not None
               and hit[0] == _LISTED.get(f)]
    by_id: dict[int, int] = {}  # id(schema) -> index; the footers of a dataset share one schema object or a few
    by_bytes: dict[bytes, int] = {}
    labels: dict[tuple, int] = {}
    cols: dict[str, list] = {name: [] for name in _CACHE_SCHEMA.names}
    for f, ((size, mtime_ns), footer) in entries:
        if id(footer.schema) not in by_id:
            by_id[id(footer.schema)] = by_bytes.setdefault(footer.schema.serialize().to_pybytes(), len(by_bytes))
        for name, value in (("path", storage.split_query(f)[0]), ("size", size), ("mtime_ns", mtime_ns),
                            ("rows", footer.rows), ("row_groups", footer.row_groups),
                            ("schema", by_id[id(footer.schema)]),
                            ("null_columns", [c for c, _ in footer.null_counts]),
                            ("null_counts", [n for _, n in footer.null_counts]),
                            ("reclip_keys", [k for k, _ in footer.reclip_metadata]),
                            ("reclip_values", [v for _, v in footer.reclip_metadata]),
                            ("class_labels", labels.setdefault(footer.class_labels, len(labels)))):
            cols[name].append(value)
    meta = {"version": FOOTER_CACHE_VERSION, "listing": storage.split_query(listing)[0],
            "schemas": [base64.b64encode(b).decode() for b in by_bytes],
            "class_labels": [[[c, list(names)] for c, names in entry] for entry in labels]}
    folder = os.path.dirname(file)
    tmp = None
    try:
        table = pa.table(cols, schema=_CACHE_SCHEMA.with_metadata({_CACHE_META: json.dumps(meta)}))
        os.makedirs(folder, exist_ok=True)
        _remove_old_temps(folder, os.path.basename(file))
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(file) + ".tmp-", dir=folder)
        os.close(fd)
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, file)
        tmp = None
        _DISK_STALE[listing] = False
    except Exception as exc:  # an unwritable folder, a full disk: this launch works on without the cache
        _DISK_FAILED.append(file)
        if len(_DISK_FAILED) == 1:
            log.debug("footer cache not written (%s): %s", file, exc)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _remove_old_temps(folder: str, name: str) -> None:
    """Remove a killed writer's temp files of ``name`` (a live writer's are younger than ``_TEMP_AGE_S``)."""
    now = time.time()
    for entry in os.scandir(folder):
        if entry.name.startswith(name + ".tmp-"):
            try:
                if now - entry.stat().st_mtime > _TEMP_AGE_S:
                    os.remove(entry.path)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------ writing

ROW_GROUP_BYTES = 16 << 20  # target bytes of one row group (all columns), so a reader holds little per shard
WRITE_BATCH_ROWS = 64  # rows per Parquet page check: pages of ~64 images, streamed page by page on read
MAX_ROW_GROUP_ROWS = 4096


def row_group_rows(total_bytes: int, rows: int) -> int:
    """Rows per row group so one row group holds about ``ROW_GROUP_BYTES`` (64..4096 rows)."""
    if rows <= 0:
        return WRITE_BATCH_ROWS
    per_row = max(1, total_bytes // rows)
    return int(min(MAX_ROW_GROUP_ROWS, max(WRITE_BATCH_ROWS, ROW_GROUP_BYTES // per_row)))


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, rows_per_group: int | None = None) -> None:
    """Write a whole shard so that no reader ever sees half of one: locally a ``.tmp`` file renamed into place; on
    an object store the file is built in memory and sent as one object (a PUT, or a multipart upload that becomes
    visible only when it completes), so an exception or a kill mid-write leaves no object at all. A file written
    straight to the store would not do: pyarrow's writer closes it (footer and all) on an exception, leaving a
    valid-looking shard that holds only the rows before the error.

    Layout for bounded reads: row groups of about ``ROW_GROUP_BYTES``, pages of ``WRITE_BATCH_ROWS`` rows, and no
    dictionary on binary columns (image bytes never repeat; the dictionary page would only add a MB that every
    reader holds), so a reader streaming the shard page by page holds a few MB, not the shard."""
    binary = [f.name for f in table.schema if is_binary(f.type)]
    options = dict(row_group_size=rows_per_group or row_group_rows(table.nbytes, table.num_rows),
                   compression="none" if _mostly_binary(table) else "snappy", write_batch_size=WRITE_BATCH_ROWS,
                   use_dictionary=[f.name for f in table.schema if f.name not in binary])
    write_file_atomic(str(path), lambda sink: pq.write_table(table, sink, **options))


def _mostly_binary(table: pa.Table) -> bool:
    # JPEG/PNG bytes do not compress; skipping the codec saves CPU on write and on every read.
    return "image" in table.column_names and table.num_rows > 0


def write_file_atomic(path: str, write: Callable[[Any], None]) -> None:
    """``write(sink)`` fills a new file that appears at ``path`` whole or not at all (local path or URI).

    ``sink`` is a local temp path, or an in-memory buffer that becomes one object on a store (the file's size in
    memory: a shard of ~1000 web images is ~50 MB)."""
    local = storage.local_path(path)
    if local is None:
        sink = pa.BufferOutputStream()
        write(sink)
        storage.write_bytes(path, memoryview(sink.getvalue()))  # no copy of the file into a bytes object
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = local + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
