"""Which columns of the shards hold what: the column map, the checks that fail before any work starts (with the
file, the column and the flag to set), absent rows, and ``dataset.json``. Every reader goes through here so errors
read the same. The files themselves and their footers are ``shards``'.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import pyarrow as pa

from reclip_ray import storage
from reclip_ray.data.shards import (HF_IMAGE_FIELD, footers, hf_image_bytes_type, is_image_type, is_string,
                                    read_footers)
from reclip_ray.errors import DataError

if TYPE_CHECKING:
    import numpy as np

CANONICAL = ("key", "image", "caption", "label")
# How a column hint names the flag that sets a column: the config key, for the commands that take --set (train,
# sweep), or the command's own option (data inspect, eval). The command chooses (``column_flag``), since the checks
# that print the hint sit several calls below it.
CONFIG_FLAG = "--set data.{role}_column={name}"
OPTION_FLAG = "--{role}-column {name}"
_COLUMN_FLAG: ContextVar[str] = ContextVar("column_flag", default=CONFIG_FLAG)


@contextmanager
def column_flag(template: str) -> Iterator[None]:
    """Within the block, column hints name the flag as ``template`` (``CONFIG_FLAG`` or ``OPTION_FLAG``) does."""
    token = _COLUMN_FLAG.set(template)
    try:
        yield
    finally:
        _COLUMN_FLAG.reset(token)


def current_column_flag() -> str:
    """The template column hints use in this thread (``column_flag``). Code that checks columns on other threads
    (a thread does not inherit the block's ContextVar) reads it here first and passes it along explicitly."""
    return _COLUMN_FLAG.get()


def column_hint(role: str, candidates: Sequence[str], flag: str | None = None) -> str:
    """The flag to try for the first candidate column of ``role`` (image, caption), or how to name one; ``flag`` (a
    template as ``column_flag`` takes) overrides the block's, for checks that run on another thread."""
    flag = flag or _COLUMN_FLAG.get()
    if candidates:
        return f"try {flag.format(role=role, name=candidates[0])}"
    return f"name it with {flag.format(role=role, name='COLUMN')}"


@dataclass
class ColumnMap:
    """Names of the columns in the user's shards; the pipeline renames them to the canonical ones."""

    image: str = "image"
    caption: str = "caption"
    label: str = "label"
    key: str = "key"

    @classmethod
    def from_config(cls, data_cfg: Any) -> "ColumnMap":
        return cls(
            image=getattr(data_cfg, "image_column", "image"),
            caption=getattr(data_cfg, "caption_column", "caption"),
            label=getattr(data_cfg, "label_column", "label"),
            key=getattr(data_cfg, "key_column", "key"),
        )

    def source(self, name: str) -> str:
        """The shard column a name the readers ask for reads: ``label`` is the label column (``data.label_column``,
        ``--label-column``), ``key`` the key column, any other name itself (a label set's own column, dataset.json's
        ``label_sets``' ``column``). One rule for the checks and the reader, so that a check never passes on one
        column while the evaluation reads another."""
        return {"label": self.label, "key": self.key}.get(name, name)

    def renames(self) -> dict[str, str]:
        """{user name: canonical name} for the columns whose names differ."""
        pairs = {self.image: "image", self.caption: "caption", self.label: "label", self.key: "key"}
        return {src: dst for src, dst in pairs.items() if src != dst}


def parquet_schema(file: str):
    """The Arrow schema of one file (without its key-value metadata), from the footer cache: callers that loop
    over many files call ``shards.footers(files)`` first, so the footers are read in parallel and only once."""
    return footers([file])[0].schema


def count_rows(files: Iterable[str]) -> int:
    """Rows in the given shards, from their Parquet footers (no data read; the footers are read in parallel)."""
    return sum(shard.rows for shard in read_footers(list(files)))


def check_schema(files: Iterable[str], columns: ColumnMap, require_label: bool = False,
                 require_caption: bool = True) -> None:
    """Fail before any work starts when a shard lacks a column, naming the file and the column.

    A missing image/caption column is most often a naming difference (img2dataset writes ``jpg``), or shards that
    hold only metadata because the images are in webdataset tars beside them; the message says which, with the
    exact flag or command to run, so the user does not have to read the column list and guess.
    ``require_caption=False``: a class-only eval set (``has_captions``), checked for its images only.
    """
    required = [("image", columns.image)] + ([("caption", columns.caption)] if require_caption else [])
    if require_label:
        required.append(("label", columns.label))
    files = list(files)
    footers(files)  # all footers in parallel (and cached for the launch's later steps); the loop below reads none
    for file in files:
        schema = parquet_schema(file)
        names = set(schema.names)
        missing = [(role, name) for role, name in required if name not in names]
        if missing:
            raise DataError(missing_column_message(file, schema, missing))
        # A null-typed column is what pandas writes for an empty shard or an all-None column: rows absent (no
        # image) or bad (no caption), counted as such, never a reason to stop the launch.
        image_type = schema.field(columns.image).type
        if not (is_image_type(image_type) or pa.types.is_null(image_type)):
            raise DataError(wrong_image_type_message(file, schema, columns.image))
        if not require_caption:
            continue
        caption_type = schema.field(columns.caption).type
        if not (is_string(caption_type) or pa.types.is_null(caption_type)):
            raise DataError(f"{file}: caption column {columns.caption!r} has type {caption_type}, expected string")
    check_images_embedded(files, columns.image)


def check_images_embedded(files: list[str], image_column: str) -> None:
    """Fail when a Hugging Face Image column holds no bytes in any row: ``datasets``' ``to_parquet`` writes the
    images of a dataset loaded from local files as paths (``push_to_hub`` embeds them), and every row would be an
    absent sample. From the cached footers' null counts: nothing is read."""
    found = footers(files)
    if not any(image_column in f.schema.names and hf_image_bytes_type(f.schema.field(image_column).type) is not None
               for f in found):
        return
    shards = [f.shard(image_column) for f in found]
    rows = sum(s.rows for s in shards)
    if rows and sum(s.absent for s in shards) == rows:
        raise DataError(f"{files[0]}: no image bytes in any of the {rows} rows of {image_column!r}: Hugging Face "
                        "datasets stored paths only (to_parquet does not embed local image files; embed them "
                        "first with ds.with_format('arrow').map(datasets.table.embed_table_storage, batched=True))")


# Column names other tools use for the caption, most likely first; only these are suggested, so that img2dataset's
# many other string columns (url, status, exif, sha256...) are never offered as captions.
CAPTION_NAMES = ("caption", "txt", "text", "captions", "alt", "alt_text", "title", "description", "prompt")
IMAGE_NAMES = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")


def image_bytes(column: Any) -> Any:
    """The encoded bytes of an image column (pyarrow Array or ChunkedArray): the column itself, or the ``bytes`` child
    of a Hugging Face Image struct, null where the struct or its ``bytes`` is null (an image ``datasets`` stored by
    ``path`` only is not in the shard: an absent sample)."""
    import pyarrow.compute as pc

    if hf_image_bytes_type(column.type) is None:
        return column
    return pc.struct_field(column, HF_IMAGE_FIELD)  # combines the struct's validity with the child's


def class_label_sets(files: Sequence[str]) -> dict[str, list[str]]:
    """{column: class names} of the ClassLabel columns recorded in the shards' ``huggingface`` metadata (from the
    footer cache: no read when the footers are cached). Shards that disagree are a DataError naming two of them."""
    found = footers(files)
    for footer in found[1:]:
        if footer.class_labels != found[0].class_labels:
            raise DataError(f"{footer.path}: ClassLabel names in its 'huggingface' metadata differ from those of "
                            f"{found[0].path}; the shards must share one label set")
    return {col: list(names) for col, names in (found[0].class_labels if found else ())}


def _binary_columns(schema) -> list[str]:
    """Image-bytes columns, the usual image names first: the candidates for ``data.image_column``."""
    binary = [f.name for f in schema if is_image_type(f.type)]
    return sorted(binary, key=lambda n: (IMAGE_NAMES.index(n) if n in IMAGE_NAMES else len(IMAGE_NAMES)))


def has_captions(files: Iterable[str], caption_column: str) -> bool:
    """Whether any shard has ``caption_column`` or a caption-like string column (``_caption_columns``). A set with
    neither is a class-only eval set (labels, no captions: zero-shot only), not one whose captions are misnamed."""
    schemas = (parquet_schema(f) for f in files)
    return any(caption_column in schema.names or _caption_columns(schema) for schema in schemas)


def _caption_columns(schema) -> list[str]:
    """String columns with a caption-like name, the usual names first: the candidates for ``data.caption_column``."""
    present = {f.name for f in schema if is_string(f.type)}
    return [n for n in CAPTION_NAMES if n in present]


def wrong_image_type_message(file: str, schema, column: str) -> str:
    """One line for an image column that holds no image bytes, with the flag of a column that does."""
    others = _binary_columns(schema)
    hint = f" ({column_hint('image', others)})" if others else ""
    return f"{file}: image column {column!r} has type {schema.field(column).type}, expected binary{hint}"


def missing_column_message(file: str, schema, missing: list[tuple[str, str]], flag: str | None = None) -> str:
    """One line for the missing ``(role, name)`` columns: the webdataset command, the flags (``column_hint``, in
    ``flag``'s form when given) that name the shard's likely columns, or the flag to name one."""
    roles = [role for role, _ in missing]
    if "image" in roles and not _binary_columns(schema):
        pattern = _webdataset_pattern(file, schema)
        if pattern is not None:
            return (f"{file}: missing image column {missing[0][1]!r}: the images are in the webdataset tars beside "
                    f"this metadata-only shard (img2dataset --output_format webdataset); convert them with "
                    f"reclip-ray data ingest --webdataset '{pattern}' --out DIR")
    finders = {"image": _binary_columns, "caption": _caption_columns}
    hints = [column_hint(role, [n for n in finders.get(role, lambda _: [])(schema) if n != name], flag)
             for role, name in missing]
    role, name = missing[0]
    return f"{file}: missing {role} column {name!r}; columns are {sorted(schema.names)} ({'; '.join(hints)})"


def _webdataset_pattern(file: str, schema) -> str | None:
    """``DIR/{00000..NNNNN}.tar`` when ``file`` looks like img2dataset's webdataset sidecar, else None.

    Evidence: ``.tar`` files in the same folder, or img2dataset's metadata columns (status plus url or
    error_message). The brace range comes from the tars when present, else from the Parquet names (img2dataset
    names a shard's tar and Parquet alike).
    """
    import pyarrow.fs as pafs

    folder = storage.parent(file) if "/" in file else "."
    fs, inner = storage.filesystem(file)
    try:
        infos = fs.get_file_info(pafs.FileSelector(os.path.dirname(inner), recursive=False))
    except Exception:  # listing is best effort: the message falls back to the plain column error
        infos = []
    tars = sorted(os.path.basename(i.path)[: -len(".tar")] for i in infos if i.path.endswith(".tar"))
    names = set(schema.names)
    looks_meta = "status" in names and bool(names & {"url", "error_message"})
    if not tars and not looks_meta:
        return None
    stems = tars or sorted(os.path.basename(i.path)[: -len(".parquet")] for i in infos if i.path.endswith(".parquet"))
    return storage.join(folder, f"{_brace_range(stems)}.tar")


def _brace_range(stems: list[str]) -> str:
    """``{00000..00003}`` for numbered shards of one width (what ``expand_braces`` reads back), else a placeholder."""
    if stems and all(s.isdigit() and len(s) == len(stems[0]) for s in stems):
        return stems[0] if len(stems) == 1 else f"{{{stems[0]}..{stems[-1]}}}"
    return "{00000..NNNNN}"


# img2dataset's ``status`` column: "success", or "failed_to_download" / "failed_to_resize" (that row then has no
# image). Only its failures mark a row absent: a user's own ``status`` column ("published", "draft", 3) hides nothing.
STATUS_COLUMN = "status"
FAILED_STATUS_PREFIX = "failed_to_"


def failed_status(value: Any) -> bool:
    """Whether one ``status`` cell is an img2dataset failure. Decided per cell, never per batch or column, so a row
    is absent or not whatever rows share its batch and however the reader batched them."""
    return isinstance(value, str) and value.startswith(FAILED_STATUS_PREFIX)


def absent_mask(batch: Any, image_column: str = "image", status_column: str = STATUS_COLUMN) -> np.ndarray:
    """Boolean mask of the rows that are absent samples: null image cell (for a Hugging Face Image struct: a null
    struct or a null ``bytes``), or an img2dataset failure in ``status`` (``failed_status``: "failed_to_...").

    img2dataset keeps failed downloads as rows with a null image and ``status="failed_to_download"``. Those are not
    samples that went wrong, they are samples that never existed: they must not count towards
    ``data.max_bad_fraction`` (a 30% download failure rate is normal and would otherwise stop every run). Any other
    ``status`` value (img2dataset's "success", or a user's own column: "published", 3, None) leaves the row to its
    image, so a dataset that happens to have a ``status`` column of its own loses no rows.

    ``batch`` is a ``pyarrow.Table``/``RecordBatch`` or a mapping of column name to array (Ray's numpy batch format;
    a pandas DataFrame works too).
    """
    import numpy as np
    import pyarrow as pa

    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        n = batch.num_rows
        names = batch.schema.names
        absent = np.zeros(n, dtype=bool)
        if image_column in names:
            absent |= image_bytes(batch.column(image_column)).is_null().to_numpy(zero_copy_only=False)
        if status_column in names and is_string(batch.schema.field(status_column).type):
            status = batch.column(status_column).to_pylist()
            absent |= np.fromiter((failed_status(s) for s in status), dtype=bool, count=n)
        return absent
    images = batch[image_column] if image_column in batch else None
    first = next(iter(batch), None)  # a column name, for a dict and a DataFrame alike
    n = len(batch[first]) if first is not None else 0
    absent = np.zeros(n, dtype=bool)
    if images is not None:
        absent |= np.fromiter((_is_null(v) for v in images), dtype=bool, count=n)
    if status_column in batch:
        absent |= np.fromiter((failed_status(s) for s in batch[status_column]), dtype=bool, count=n)
    return absent


def _is_null(value: Any) -> bool:
    """None, pandas' NaN stand-in for a missing object cell, or a Hugging Face Image cell without bytes."""
    if isinstance(value, dict):
        value = value.get(HF_IMAGE_FIELD)
    return value is None or (isinstance(value, float) and value != value)


def dataset_json_path(path: str | os.PathLike) -> str:
    """Where ``read_dataset_json`` looks: ``dataset.json`` in the folder ``path`` names, or beside the file (or
    pattern) it names; errors about what it says name this file."""
    path = str(path)
    return storage.join(path if storage.is_dir(path) else storage.parent(path), "dataset.json")


def read_dataset_json(path: str | os.PathLike) -> dict:
    """``dataset.json`` beside the shards ({} when absent). ``path`` may be the folder or a file inside it."""
    meta = dataset_json_path(path)
    try:
        found = storage.read_json(meta, default={})
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta}: not valid JSON ({exc})") from exc
    return found
