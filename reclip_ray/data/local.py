"""Batches without Ray: evaluation, the single-process training loop and benchmarks read shards through here.

Same decode (``images.decode_image``) and tokenizer as the Ray pipeline's ``decode_batch``, so a model evaluated
locally sees exactly what it was trained on.
"""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from reclip_ray import storage
from reclip_ray.data.images import EVAL_RESIZE, BadImage, EvalResize, decode_image
from reclip_ray.data.schema import (STATUS_COLUMN, ColumnMap, absent_mask, check_images_embedded, check_schema,
                                    image_bytes, missing_column_message, parquet_schema, wrong_image_type_message)
from reclip_ray.data.shards import footers, is_image_type, is_string, list_parquet_files
from reclip_ray.data.stream import rows_to_skip
from reclip_ray.data.tokenizer import CaptionTokenizer
from reclip_ray.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

MAX_EXAMPLES = 10
IMAGE_ID_COLUMN = "image_id"  # COCO/Flickr-style eval sets: the rows that share an image share this id


@dataclass
class BadRowCount:
    """Rows seen and rows skipped, with a few examples ({file, row, key, reason}) for the error message.

    ``absent`` counts rows that carry no image at all (img2dataset keeps failed downloads as rows with a null image
    and a ``status`` of "failed_to_download" or "failed_to_resize"). They are samples that were never there, not
    broken data, so they are counted apart and left out of ``seen`` and of the bad-row fraction: a crawl that lost
    30% of its URLs is not 30% bad.
    """

    seen: int = 0
    bad: int = 0
    examples: list = field(default_factory=list)
    absent: int = 0

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def add(self, seen: int, bad: int, examples: Sequence[dict] = (), absent: int = 0) -> None:
        self.seen += int(seen)
        self.bad += int(bad)
        self.absent += int(absent)
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(list(examples)[:room])

    def check(self, threshold: float) -> None:
        check_bad_fraction(self.seen, self.bad, threshold, self.examples[0] if self.examples else None)


def describe_example(example: dict | str | None) -> str:
    if not example:
        return ""
    if isinstance(example, str):
        return example
    parts = [os.path.basename(str(example.get("file", ""))) or "?"]
    if example.get("row") is not None:
        parts.append(f"row {example['row']}")
    if example.get("key") is not None:
        parts.append(f"key={example['key']}")
    return " ".join(parts) + f": {example.get('reason', 'bad row')}"


def check_bad_fraction(seen: int, bad: int, threshold: float, example: dict | str | None = None) -> None:
    """Raise DataError when more than ``threshold`` (a fraction, 0.01 = 1%) of the rows seen were unusable."""
    if seen <= 0 or bad <= 0:
        return
    fraction = bad / seen
    if fraction > threshold:
        detail = describe_example(example)
        raise DataError(
            f"{bad} of {seen} rows ({fraction:.1%}) bad rows (> {threshold:.1%}, data.max_bad_fraction)"
            + (f" e.g. {detail}" if detail else "")
        )


def row_rng(seed: int, key: Any, epoch: int = 0) -> random.Random:
    """Per-sample augmentation stream: the same crop for a (seed, key, epoch) wherever the row is decoded.

    A ``random.Random`` rather than a numpy Generator: it is made once per decoded row, and numpy's seeding plus
    per-call overhead cost ~100 us a row, a tenth of a 64 px decode from a shrunk copy."""
    return random.Random((int(seed) & 0xFFFFFFFF) << 80 | zlib.crc32(str(key).encode()) << 40 | (int(epoch) & 0xFFFFFFFFFF))


def check_columns(files: Sequence[str], columns: ColumnMap, *, require_caption: bool = True) -> None:
    """Fail before reading when a shard lacks a column the read needs, naming the file and the column.

    Training needs a string caption column (``schema.check_schema``). Evaluation (``require_caption=False``) also
    accepts shards without one, or with an all-null one (Arrow type ``null``), because classification-only sets
    such as ImageNet have labels and images but no captions.
    """
    if require_caption:
        check_schema(files, columns)
        return
    import pyarrow as pa

    footers(files)  # in parallel, once: parquet_schema below (and the caller's later reads) hit the cache
    for file in files:
        schema = parquet_schema(file)
        if columns.image not in schema.names:  # the hint names the command's flag (``schema.column_flag``)
            raise DataError(missing_column_message(file, schema, [("image", columns.image)]))
        image_type = schema.field(columns.image).type
        if not (is_image_type(image_type) or pa.types.is_null(image_type)):
            raise DataError(wrong_image_type_message(file, schema, columns.image))
        if columns.caption in schema.names:
            caption_type = schema.field(columns.caption).type
            if not (is_string(caption_type) or pa.types.is_null(caption_type)):
                raise DataError(f"{file}: caption column {columns.caption!r} has type {caption_type}, expected string")
    check_images_embedded(files, columns.image)


def image_identity(image_id: Any, image: bytes) -> str:
    """The key that groups rows showing the same image: the ``image_id`` column when the row has one, else a
    digest of the encoded bytes (COCO/Flickr rows repeat the identical file once per caption)."""
    if image_id is not None:
        return f"id:{image_id}"
    return "blake2b:" + hashlib.blake2b(image, digest_size=16).hexdigest()


def read_shard(file: str, columns: list[str]) -> "pa.Table":
    """The given columns of one whole shard (local path or URI); a DataError naming the file if it cannot be read."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(file)
    try:
        return pq.read_table(inner, columns=columns, filesystem=fs)
    except Exception as exc:
        raise DataError(f"{file}: cannot read Parquet ({exc})") from exc


def _read_rows(file: str, columns: list[str], start: int, stop: int) -> "pa.Table":
    """Rows [start, stop) of one file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    groups = footers([file])[0].row_groups
    wanted, skip = rows_to_skip(groups, start)
    keep = []
    end = sum(groups[: wanted[0]]) if wanted else 0
    for g in wanted:
        if end >= stop:
            break
        keep.append(g)
        end += groups[g]
    fs, inner = storage.filesystem(file)
    try:
        with fs.open_input_file(inner) as fh:
            table = pq.ParquetFile(fh).read_row_groups(keep, columns=columns, use_threads=False)
    except Exception as exc:
        raise DataError(f"{file}: cannot read Parquet ({exc})") from exc
    return table.slice(skip, stop - start)


def iter_local_batches(
    path: str,
    *,
    image_size: int,
    text_length: int,
    tokenizer: CaptionTokenizer,
    batch_size: int,
    columns: ColumnMap = ColumnMap(),
    train: bool = False,
    seed: int = 0,
    epochs: int = 1,
    extra_columns: Sequence[str] = (),
    bad_rows: BadRowCount | None = None,
    require_caption: bool = True,
    group_images: bool = False,
    row_range: tuple[int, int] | None = None,
    resize: EvalResize = EVAL_RESIZE,
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches in file order (train: files and rows shuffled per epoch). Bad rows skipped and counted;
    rows without an image (failed downloads) skipped before decoding and counted in ``bad_rows.absent``.

    Evaluation options (the defaults are what training wants):

    - ``require_caption=False``: a missing, null or blank caption is not a bad row; the row keeps its image, its
      text is "" and the batch's ``has_caption`` (bool) says which rows have a real caption.
    - ``group_images=True``: batches carry ``image_id`` (``image_identity``: the ``image_id`` column, else a bytes
      digest), ``image_new`` (bool) and ``file``. Only the first row of each image in the stream is decoded;
      a repeat gets an all-zero placeholder image and ``image_new`` False, so the caller encodes each image once.
    - ``row_range=(lo, hi)``: only the rows whose index in the files' concatenation (listing order, every row
      counted, absent ones too) is in [lo, hi); only the row groups holding them are read. How evaluation splits
      a set over ranks (``evaluate.evaluate_dataset``); keys and bad-row examples keep their rows' file positions.
    - ``resize``: how an image is made square when ``train`` is False (``images.EvalResize``: an open_clip
      folder's resize mode and interpolation, and open_clip's colour conversion).
    """
    files = list_parquet_files(str(path))
    check_columns(files, columns, require_caption=require_caption)
    _check_extra_columns(files, columns, extra_columns)
    spans = _file_spans(files, row_range)
    reader = _RowReader(columns, image_size=image_size, train=train, seed=seed, extra=list(extra_columns),
                        bad_rows=bad_rows if bad_rows is not None else BadRowCount(),
                        require_caption=require_caption, group_images=group_images, resize=resize)
    batch = _PendingBatch(image_size, text_length, tokenizer, reader.extra, reader.flags)
    for epoch in range(epochs):
        order = list(range(len(files)))
        rng = np.random.default_rng([seed, epoch])
        if train:
            rng.shuffle(order)
        for fi in order:
            if spans[fi] is None:
                continue
            for row in reader.rows(files[fi], *spans[fi], epoch, rng):
                batch.add(row)
                if len(batch) == batch_size:
                    yield batch.emit()
    if len(batch):
        yield batch.emit()


def _check_extra_columns(files: Sequence[str], columns: ColumnMap, extra: Sequence[str]) -> None:
    """Every shard has the source column of each ``extra_columns`` name (``ColumnMap.source``)."""
    for name in extra:
        source = columns.source(name)
        for file in files:
            if source not in parquet_schema(file).names:
                raise DataError(f"{file}: missing column {source!r} (asked for {name!r})")


def _file_spans(files: Sequence[str], row_range: tuple[int, int] | None) -> list[tuple[int, int | None] | None]:
    """Per file, the rows to read as (first, stop): all of them (0, None), those inside ``row_range``, or None
    when the range holds none of its rows."""
    if row_range is None:
        return [(0, None)] * len(files)
    starts = np.cumsum([0] + [f.rows for f in footers(files)]).tolist()
    spans: list[tuple[int, int | None] | None] = []
    for fi in range(len(files)):
        first = max(0, row_range[0] - starts[fi])
        stop = min(starts[fi + 1], row_range[1]) - starts[fi]
        spans.append((first, stop) if first < stop else None)
    return spans


class _RowReader:
    """One file's rows, decoded, as the batch takes them: absent rows skipped, bad rows counted in ``bad_rows``."""

    def __init__(self, columns: ColumnMap, *, image_size: int, train: bool, seed: int, extra: list[str],
                 bad_rows: BadRowCount, require_caption: bool, group_images: bool,
                 resize: EvalResize = EVAL_RESIZE) -> None:
        self.columns, self.image_size, self.train, self.seed = columns, image_size, train, seed
        self.resize = resize
        self.extra, self.bad_rows = extra, bad_rows
        self.require_caption, self.group_images = require_caption, group_images
        self.flags = ([] if require_caption else ["has_caption"]) + (
            ["image_id", "image_new", "file"] if group_images else [])
        self.decoded: set[str] = set()  # group_images: identities already decoded successfully
        self.placeholder = np.zeros((image_size, image_size, 3), np.uint8)

    def rows(self, file: str, first: int, stop: int | None, epoch: int, rng: np.random.Generator) -> Iterator[dict]:
        """The file's rows [first, stop) (train: shuffled by ``rng``), each a dict of the batch's fields."""
        table = self._read(file, first, stop)
        n_rows = table.num_rows

        def col(name: str) -> list:
            """The column's values, or Nones when it was not read (this shard lacks it, or not asked for)."""
            return table.column(name).to_pylist() if name in table.column_names else [None] * n_rows

        columns = self.columns
        images = image_bytes(table.column(columns.image)).to_pylist()
        captions, image_ids = col(columns.caption), col(IMAGE_ID_COLUMN)
        absent = absent_mask(table, columns.image, STATUS_COLUMN)
        keys = (table.column(columns.key).to_pylist() if columns.key in parquet_schema(file).names
                else [f"{os.path.basename(file)}#{first + i}" for i in range(n_rows)])
        extras = {c: table.column(columns.source(c)).to_pylist() for c in self.extra}
        order = np.arange(n_rows)
        if self.train:
            rng.shuffle(order)
        for r in order.tolist():
            if absent[r]:
                self.bad_rows.absent += 1
                continue
            self.bad_rows.seen += 1
            row = self._decode(file, first + r, keys[r], images[r], captions[r], image_ids[r], epoch)
            if row is not None:
                row.update({c: extras[c][r] for c in self.extra if c != "key"})
                yield row

    def _read(self, file: str, first: int, stop: int | None) -> "pa.Table":
        """The columns the batch needs (and the optional ones the shard has) of rows [first, stop)."""
        names = parquet_schema(file).names
        optional = [self.columns.key, STATUS_COLUMN] + ([IMAGE_ID_COLUMN] if self.group_images else [])
        wanted = [self.columns.image] + [n for n in [self.columns.caption, *optional] if n in names]
        wanted += [c for c in map(self.columns.source, self.extra) if c not in wanted]
        return read_shard(file, wanted) if stop is None else _read_rows(file, wanted, first, stop)

    def _decode(self, file: str, row: int, key: Any, image: Any, caption: Any, image_id: Any,
                epoch: int) -> dict | None:
        """The row's image, text, key and flags; None (counted as bad) when it does not decode."""
        has_caption = caption is not None and bool(str(caption).strip())
        ident = image_identity(image_id, image) if self.group_images else ""
        new = ident not in self.decoded
        try:
            if self.require_caption and not has_caption:
                raise BadImage("empty caption")
            arr = decode_image(image, self.image_size, train=self.train, resize=self.resize,
                               rng=row_rng(self.seed, key, epoch) if self.train else None) if new else self.placeholder
        except BadImage as exc:
            self.bad_rows.add(0, 1, [{"file": file, "row": row, "key": key, "reason": str(exc)}])
            return None
        out = {"image": arr, "_text": str(caption) if has_caption else "", "key": key}
        if self.group_images:
            self.decoded.add(ident)
            out.update(image_id=ident, image_new=new, file=file)
        if not self.require_caption:
            out["has_caption"] = has_caption
        return out


class _PendingBatch:
    """Rows gathered until a batch is full, then stacked into arrays (``emit``)."""

    def __init__(self, image_size: int, text_length: int, tokenizer: CaptionTokenizer, extra: list[str],
                 flags: list[str]) -> None:
        self.image_size, self.text_length, self.tokenizer = image_size, text_length, tokenizer
        self.extra, self.flags = extra, flags
        self.pending: dict[str, list] = {"image": [], "_text": [], "key": [],
                                         **{c: [] for c in extra + flags if c != "key"}}

    def __len__(self) -> int:
        return len(self.pending["image"])

    def add(self, row: dict[str, Any]) -> None:
        for name, value in row.items():
            self.pending[name].append(value)

    def emit(self) -> dict[str, np.ndarray]:
        pending, s = self.pending, self.image_size
        out = {
            "image": np.stack(pending["image"]) if pending["image"] else np.zeros((0, s, s, 3), np.uint8),
            "tokens": self.tokenizer.encode(pending["_text"], self.text_length),
            "key": np.array(pending["key"], dtype=object),
        }
        for c in self.extra:
            if c == "key":
                continue
            out[c] = np.array(pending[c], dtype=object if c in ("caption", "key") else None)
        for c in self.flags:
            out[c] = np.array(pending[c], dtype=bool if c in ("has_caption", "image_new") else object)
        for v in pending.values():
            v.clear()
        return out
