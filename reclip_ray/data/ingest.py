"""Turn a folder of images + a captions file, or webdataset/img2dataset tars, into Parquet shards.

Image bytes are stored exactly as given (no re-encode, no resize): the pipeline decodes to whatever size the
current phase needs, and re-encoding would lose quality for every later resolution. Only the header is read here,
for width/height; rows whose header is unreadable are skipped and counted (with examples) rather than stopping a
long ingest, while structural mistakes (a missing file, column or caption) stop it at once with the file and row.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from reclip_ray.data.images import BadImage, image_size
from reclip_ray.data.schema import write_json_atomic
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


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, row_group_rows: int | None = None) -> None:
    """Write to ``path.tmp`` and rename, so a reader never sees a half-written shard.

    Layout for bounded reads: row groups of about ``copies.ROW_GROUP_BYTES``, pages of ``copies.WRITE_BATCH_ROWS``
    rows, and no dictionary on binary columns (image bytes never repeat; the dictionary page would only add a MB
    that every reader holds), so a reader streaming the shard page by page holds a few MB, not the shard."""
    from reclip_ray.data.copies import WRITE_BATCH_ROWS, row_group_rows as rows_for

    path = str(path)
    tmp = path + ".tmp"
    binary = [f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows or rows_for(table.nbytes, table.num_rows),
                       compression="none" if _mostly_binary(table) else "snappy", write_batch_size=WRITE_BATCH_ROWS,
                       use_dictionary=[f.name for f in table.schema if f.name not in binary])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _mostly_binary(table: pa.Table) -> bool:
    # JPEG/PNG bytes do not compress; skipping the codec saves CPU on write and on every read.
    return "image" in table.column_names and table.num_rows > 0


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
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
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
        path = self.out_dir / f"{self.prefix}-{len(self.files):05d}.parquet"
        write_parquet_atomic(pa.table(arrays), path)
        self.files.append(str(path))
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


def _read_caption_rows(captions: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) from CSV (header row) or JSONL; row numbers are 1-based data rows."""
    suffix = captions.suffix.lower()
    try:
        f = open(captions, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"captions file not found: {captions}") from None
    with f:
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


def ingest_folder(images: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike,
                  shard_rows: int = 1000) -> dict:
    """Folder of images + captions CSV/JSONL (columns ``file``, ``caption``, optional ``label``/``key``).

    Further integer columns named ``label_<set>`` (e.g. ``label_colour``) are kept as int32 columns of that name:
    the extra label sets an eval set's dataset.json ``label_sets`` points at. The first row decides which of them
    the set has; every later row must have them too."""
    images, captions, out = Path(images), Path(captions), Path(out)
    if not images.is_dir():
        raise DataError(f"image folder not found: {images}")
    skipped = _Skipped()
    has_label: bool | None = None
    label_sets: list[str] | None = None
    with ShardWriter(out, shard_rows) as writer:
        for i, record in _read_caption_rows(captions):
            where = f"{captions} row {i}"
            for column in ("file", "caption"):
                if record.get(column) is None:
                    raise DataError(f"{where}: missing {column!r}")
            rel = str(record["file"])
            label = _parse_label(record.get("label"), where)
            if has_label is None:
                has_label = "label" in record
            if has_label and label is None:
                raise DataError(f"{where}: missing 'label' (earlier rows have one)")
            if label_sets is None:
                label_sets = sorted(c for c in record if re.fullmatch(r"label_\w+", c))
            extra = {c: _parse_label(record.get(c), where) for c in label_sets}
            missing = [c for c, v in extra.items() if v is None]
            if missing:
                raise DataError(f"{where}: missing {missing[0]!r} (earlier rows have one)")
            key = str(record.get("key") or f"{Path(rel).stem}-{i:08d}")
            path = images / rel
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DataError(f"{where}: image file not found: {path}") from None
            except OSError as exc:
                raise DataError(f"{where}: cannot read {path}: {exc}") from None
            caption = str(record["caption"]).strip()
            if not caption:
                skipped.add(str(captions), i, key, "empty caption")
                continue
            try:
                writer.add(_image_row(key, data, caption, label if has_label else None, extra))
            except BadImage as exc:
                skipped.add(str(path), i, key, str(exc))
    return _finish(out, writer, skipped, source=f"folder:{images} captions:{captions}")


def _finish(out: Path, writer: ShardWriter, skipped: _Skipped, source: str) -> dict:
    if writer.rows == 0:
        raise DataError(f"no usable rows for {out} ({skipped.count} skipped, e.g. {skipped.examples[:1]})")
    meta = {"rows": writer.rows, "source": source, "shards": len(writer.files), "skipped": skipped.count}
    write_json_atomic(out / "dataset.json", meta)
    return {"out": str(out), "rows": writer.rows, "shards": len(writer.files), "skipped": skipped.count,
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


def _iter_tar_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    try:
        tar = tarfile.open(tar_path, "r:*")
    except FileNotFoundError:
        raise DataError(f"webdataset shard not found: {tar_path}") from None
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


def ingest_webdataset(pattern: str, out: str | os.PathLike, shard_rows: int = 1000) -> dict:
    """webdataset / img2dataset tars (``NNNNN.jpg`` + ``NNNNN.txt``, also png/webp; ``.json``/``.cls`` optional)."""
    out = Path(out)
    tars = expand_braces(str(pattern))
    missing = [t for t in tars if not os.path.exists(t)]
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
