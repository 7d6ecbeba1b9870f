"""Turn a folder of images + a captions file, or webdataset/img2dataset tars, into Parquet shards.

Image bytes are stored exactly as given (no re-encode, no resize): the pipeline decodes to whatever size the
current phase needs, and re-encoding would lose quality for every later resolution. Only the header is read here,
for width/height; rows whose header is unreadable are skipped and counted (with examples) rather than stopping a
long ingest, while structural mistakes (a missing file, column or caption) stop it at once with the file and row.

Any input or output may be a URI (``s3://bucket/prefix``). Cost on S3: one PUT per shard of up to 10 MB (above
that a multipart upload: 2 + size/10 MB requests) plus one for ``dataset.json``, and nothing else under the output
(no temp object, no copy-and-delete rename). Remote images cost one GET each (fetched 16 at a time); remote tars
one LIST per folder up front, then one ranged GET per 8 MB streamed. A shard is held in memory until its PUT
(``shard_rows`` images: ~50 MB for 1000 web images).
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import itertools
import json
import os
import re
import tarfile
from typing import IO, Any, Iterator

import pyarrow as pa

from reclip_ray import storage
from reclip_ray.data.images import BadImage, image_size
from reclip_ray.data.shards import write_parquet_atomic
from reclip_ray.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_EXAMPLES = 10

_TYPES = {
    "key": pa.string(),
    "image": pa.binary(),
    "caption": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "label": pa.int32(),
}


def _column_type(name: str) -> pa.DataType | None:
    return pa.int32() if name.startswith("label_") else _TYPES.get(name)


class ShardWriter:
    """Buffers rows and writes ``{prefix}-{index:05d}.parquet`` shards of ``shard_rows`` rows, each atomically.

    On an exception inside ``with`` the buffered rows are dropped: shards already written are complete, and no
    truncated or partial shard is left behind.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_rows: int, prefix: str = "shard") -> None:
        if shard_rows <= 0:
            raise DataError(f"shard_rows must be positive, got {shard_rows}")
        self.out_dir = storage.normalize(str(out_dir))
        if storage.local_path(self.out_dir):  # an object store has no folders (a marker object would cost 3 requests)
            os.makedirs(self.out_dir, exist_ok=True)
        self.shard_rows = shard_rows
        self.prefix = prefix
        self.rows = 0
        self.files: list[str] = []
        self._buffer: list[dict[str, Any]] = []
        self._columns: list[str] | None = None

    def add(self, row: dict[str, Any]) -> None:
        if self._columns is None:
            self._columns = list(row)
        elif list(row) != self._columns:
            raise DataError(f"row {self.rows} has columns {sorted(row)}, earlier rows {sorted(self._columns)}")
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        assert self._columns is not None
        arrays = {c: pa.array([r[c] for r in self._buffer], type=_column_type(c)) for c in self._columns}
        path = storage.join(self.out_dir, f"{self.prefix}-{len(self.files):05d}.parquet")
        write_parquet_atomic(pa.table(arrays), path)
        self.files.append(path)
        self._buffer = []

    def close(self) -> None:
        self.flush()

    def abort(self) -> None:
        self.rows -= len(self._buffer)
        self._buffer = []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Skipped:
    def __init__(self) -> None:
        self.count = 0
        self.examples: list[dict[str, Any]] = []

    def add(self, file: str, row: Any, key: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"file": file, "row": row, "key": key, "reason": reason})


def _image_row(key: str, data: bytes, caption: str, label: int | None,
               extra_labels: dict[str, int] | None = None) -> dict[str, Any]:
    w, h = image_size(data)
    row: dict[str, Any] = {"key": key, "image": data, "caption": caption, "width": w, "height": h}
    if label is not None:
        row["label"] = label
    row.update(extra_labels or {})
    return row


# -------------------------------------------------------------------------------------------------- folder


def _not_utf8(captions: str, raw: IO[bytes]) -> DataError:
    """The one-line error for a captions file that is not UTF-8 (Latin-1, Windows-1252, UTF-16 exports), naming
    the first bad line and its byte offset.

    Why a second pass over the bytes: the text reader decodes ahead in 8 KB chunks, so its error knows neither the
    line nor the offset in the file. A newline is the one byte 0x0a in UTF-8 and in the 8-bit codepages, so the raw
    lines are the lines an editor shows."""
    offset = 0
    with raw:
        for line_no, line in enumerate(raw, start=1):
            bom = len(codecs.BOM_UTF8) if line_no == 1 and line.startswith(codecs.BOM_UTF8) else 0
            try:
                line[bom:].decode("utf-8")
            except UnicodeDecodeError as exc:
                at = bom + exc.start
                return DataError(f"{captions} line {line_no} (byte {offset + at}, 0x{line[at]:02x}): not UTF-8 text; "
                                 f"save it as UTF-8")
            offset += len(line)
    return DataError(f"{captions}: not UTF-8 text; save it as UTF-8")


def _open_captions(captions: str) -> IO[str]:
    """The captions file as text, decoded as ``utf-8-sig``: Excel's "CSV UTF-8" (and Notepad) start the file with a
    byte-order mark, which plain ``utf-8`` keeps as part of the first column's name or the first JSON line."""
    local = storage.local_path(captions)
    try:
        if local:
            return open(local, newline="", encoding="utf-8-sig")
        # A remote captions file is read whole: a million captions are ~100 MB, and one GET is the cheapest read.
        data = storage.read_bytes(captions)
    except FileNotFoundError:
        raise DataError(f"captions file not found: {captions}") from None
    try:
        return io.StringIO(data.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError:
        raise _not_utf8(captions, io.BytesIO(data)) from None


def _read_caption_rows(captions: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) from CSV (header row) or JSONL, local or a URI; row numbers are 1-based data rows."""
    with _open_captions(captions) as f:
        try:
            yield from _parse_caption_rows(captions, f)
        except UnicodeDecodeError:  # only a local file is decoded as it is read (a remote one was decoded whole)
            raise _not_utf8(captions, open(storage.local_path(captions) or captions, "rb")) from None


def _parse_caption_rows(captions: str, f: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = os.path.splitext(storage.name(captions))[1].lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{captions} row {i}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{captions} row {i}: expected a JSON object, got {type(record).__name__}")
            yield i, record
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        fields = reader.fieldnames or []
        for column in ("file", "caption"):
            if column not in fields:
                raise DataError(f"{captions}: missing column {column!r} (columns: {fields})")
        for i, record in enumerate(reader, start=1):
            yield i, record
    else:
        raise DataError(f"{captions}: captions file must be .csv, .tsv or .jsonl")


def _parse_label(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not an integer") from None


REMOTE_READ_THREADS = 16  # images fetched at once from an object store (one GET each, ~20 ms of waiting)


def ingest_folder(images: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike,
                  shard_rows: int = 1000) -> dict:
    """Folder of images + captions CSV/JSONL (columns ``file``, ``caption``, optional ``label``/``key``).

    Further integer columns named ``label_<set>`` (e.g. ``label_colour``) are kept as int32 columns of that name:
    the extra label sets an eval set's dataset.json ``label_sets`` points at. The first row decides which of them
    the set has; every later row must have them too.

    Any of the three may be a URI. Remote images are fetched ``REMOTE_READ_THREADS`` at a time, in order; local
    ones one by one (a local read is cheaper than a thread hand-off)."""
    images, captions, out = (storage.normalize(str(p)) for p in (images, captions, out))
    local_images = storage.local_path(images)
    if local_images is not None and not os.path.isdir(local_images):
        raise DataError(f"image folder not found: {images}")
    rows = _read_caption_rows(captions)
    first = next(rows, None)
    has_label = first is not None and "label" in first[1]  # the first row decides for all
    label_sets = sorted(c for c in first[1] if re.fullmatch(r"label_\w+", c)) if first is not None else []
    rows = itertools.chain([first] if first else [], rows)
    read = functools.partial(_folder_row, images=images, captions=captions, has_label=has_label,
                             label_sets=label_sets)
    skipped = _Skipped()
    threads = 1 if local_images is not None else REMOTE_READ_THREADS
    with ShardWriter(out, shard_rows) as writer:
        for i, key, row, skip in map(read, rows) if threads == 1 else storage.ordered_prefetch(read, rows, threads):
            if row is not None:
                writer.add(row)
            else:
                skipped.add(skip[0], i, key, skip[1])
    return _finish(out, writer, skipped, source=f"folder:{images} captions:{captions}")


def _folder_row(item: tuple[int, dict[str, Any]], *, images: str, captions: str, has_label: bool,
                label_sets: list[str]) -> tuple[int, str, dict[str, Any] | None, tuple[str, str] | None]:
    """(row, key, the shard row or None, (file, why) it was skipped) for one captions record. Runs in a reader
    thread for remote images; a DataError raised here reaches the caller in row order, after the rows before it."""
    i, record = item
    where = f"{captions} row {i}"
    for column in ("file", "caption"):
        if record.get(column) is None:
            raise DataError(f"{where}: missing {column!r}")
    rel = str(record["file"])
    label = _parse_label(record.get("label"), where)
    if has_label and label is None:
        raise DataError(f"{where}: missing 'label' (earlier rows have one)")
    extra = {c: _parse_label(record.get(c), where) for c in label_sets}
    missing = [c for c, v in extra.items() if v is None]
    if missing:
        raise DataError(f"{where}: missing {missing[0]!r} (earlier rows have one)")
    key = str(record.get("key") or f"{os.path.splitext(os.path.basename(rel))[0]}-{i:08d}")
    path = storage.join(images, rel)
    try:
        data = storage.read_bytes(path, may_change=False)  # an image to convert: one HEAD less per file
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"{where}: cannot read {path}: {exc}") from None
    caption = str(record["caption"]).strip()
    if not caption:
        return i, key, None, (captions, "empty caption")
    try:
        return i, key, _image_row(key, data, caption, label if has_label else None, extra), None
    except BadImage as exc:
        return i, key, None, (path, str(exc))


def _finish(out: str, writer: ShardWriter, skipped: _Skipped, source: str) -> dict:
    if writer.rows == 0:
        raise DataError(f"no usable rows for {out} ({skipped.count} skipped, e.g. {skipped.examples[:1]})")
    meta = {"rows": writer.rows, "source": source, "shards": len(writer.files), "skipped": skipped.count}
    storage.write_json(storage.join(out, "dataset.json"), meta, sort_keys=False)
    return {"out": out, "rows": writer.rows, "shards": len(writer.files), "skipped": skipped.count,
            "skipped_examples": skipped.examples}


# -------------------------------------------------------------------------------------------------- webdataset

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{00000..00002}.tar`` -> three paths (zero padding kept); ``{a,b}`` lists work too, and nest left to right."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, extension = the rest."""
    folder, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


TAR_READ_BUFFER = 8 << 20  # a remote tar is streamed in reads of this size (one ranged GET each)


def _iter_tar_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a tar's samples in order, read front to back (local or a URI: a remote tar is
    streamed, never downloaded whole or read at random)."""
    try:
        fs, inner = storage.filesystem(tar_path)
        stream = fs.open_input_stream(inner, compression=None, buffer_size=TAR_READ_BUFFER)
    except FileNotFoundError:
        raise DataError(f"webdataset shard not found: {tar_path}") from None
    with stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except tarfile.TarError as exc:
            raise DataError(f"{tar_path}: not a readable tar file ({exc})") from None
        with tar:
            key, files = None, {}
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_key(member.name)
                    if k != key:
                        if key is not None:
                            yield key, files
                        key, files = k, {}
                    f = tar.extractfile(member)
                    files[ext] = f.read() if f is not None else b""
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DataError(f"{tar_path}: corrupt tar after sample {key!r} ({exc})") from None
            if key is not None:
                yield key, files


def _missing_files(paths: list[str]) -> list[str]:
    """The paths that are not files, found before any work: one listing per folder (on S3 a LIST returns 1000
    keys, where a HEAD per tar would be 10,000 requests for a 10,000-tar crawl)."""
    import pyarrow.fs as pafs

    present: set[str] = set()
    for folder in dict.fromkeys(storage.parent(p) for p in paths):
        fs, inner = storage.filesystem(folder)
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
        present.update(storage.join(folder, storage.name(i.path)) for i in infos if i.type == pafs.FileType.File)
    return [p for p in paths if p not in present]


def ingest_webdataset(pattern: str, out: str | os.PathLike, shard_rows: int = 1000) -> dict:
    """webdataset / img2dataset tars (``NNNNN.jpg`` + ``NNNNN.txt``, also png/webp; ``.json``/``.cls`` optional);
    the pattern and ``out`` may be URIs."""
    out = storage.normalize(str(out))
    tars = [storage.normalize(t) for t in expand_braces(str(pattern))]
    missing = _missing_files(tars)
    if missing:
        raise DataError(f"webdataset shard not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    skipped = _Skipped()
    has_label: bool | None = None
    with ShardWriter(out, shard_rows) as writer:
        for tar_path in tars:
            for index, (key, files) in enumerate(_iter_tar_samples(tar_path)):
                where = f"{tar_path} sample {index} key={key}"
                image_ext = next((e for e in IMAGE_EXTS if e in files), None)
                if image_ext is None:
                    if set(files) <= {"json", "txt", "parquet"} and "txt" not in files:
                        continue  # img2dataset-style metadata-only entries (failed downloads)
                    raise DataError(f"{where}: no image ({'/'.join(IMAGE_EXTS)}) among {sorted(files)}")
                caption = None
                if "txt" in files:
                    caption = files["txt"].decode("utf-8", errors="replace")
                elif "json" in files:
                    try:
                        caption = json.loads(files["json"]).get("caption")
                    except (ValueError, AttributeError):
                        caption = None
                if caption is None:
                    raise DataError(f"{where}: missing caption (.txt)")
                label = None
                if "cls" in files:
                    label = _parse_label(files["cls"].decode("utf-8", errors="replace").strip(), where)
                if has_label is None:
                    has_label = label is not None
                caption = caption.strip()
                if not caption:
                    skipped.add(tar_path, index, key, "empty caption")
                    continue
                try:
                    writer.add(_image_row(key, files[image_ext], caption, label if has_label else None))
                except BadImage as exc:
                    skipped.add(tar_path, index, key, str(exc))
    return _finish(out, writer, skipped, source=f"webdataset:{pattern}")
