"""Where the shards are and which columns hold what. Every reader goes through here so errors read the same."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from reclip_ray.errors import DataError

CANONICAL = ("key", "image", "caption", "label")


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

    def renames(self) -> dict[str, str]:
        """{user name: canonical name} for the columns whose names differ."""
        pairs = {self.image: "image", self.caption: "caption", self.label: "label", self.key: "key"}
        return {src: dst for src, dst in pairs.items() if src != dst}


def _is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it). Local paths get the local filesystem without URI parsing."""
    import pyarrow.fs as pafs

    if _is_uri(path) and not path.startswith("file://"):
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown schemes or missing creds
            raise DataError(f"cannot open {path}: {exc}") from exc
    local = path[len("file://") :] if path.startswith("file://") else path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def list_parquet_files(path: str | os.PathLike) -> list[str]:
    """Sorted Parquet files under a folder (any nesting), a single file, or a URI.

    URIs come back as URIs (scheme kept) so Ray Data / pyarrow can open them again without the caller keeping the
    filesystem object around. Hidden files and ``*.tmp`` leftovers of an interrupted writer are ignored.
    """
    import pyarrow.fs as pafs

    path = str(path)
    fs, inner = _filesystem(path)
    try:
        info = fs.get_file_info(inner)
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"no Parquet files under {path} (path does not exist)")
    if info.type == pafs.FileType.File:
        files = [inner] if inner.endswith(".parquet") else []
    else:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        files = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not os.path.basename(i.path).startswith((".", "_"))
        )
    if not files:
        raise DataError(f"no Parquet files under {path}")
    if _is_uri(path) and not path.startswith("file://"):
        scheme = path.split("://", 1)[0]
        files = [f"{scheme}://{f}" for f in files]
    return files


def parquet_schema(file: str):
    """The Arrow schema of one file (footer only, no data read)."""
    import pyarrow.parquet as pq

    fs, inner = _filesystem(file)
    try:
        return pq.read_schema(inner, filesystem=fs)
    except Exception as exc:
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from exc


def count_rows(files: Iterable[str]) -> int:
    """Rows in the given shards, from their Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        fs, inner = _filesystem(file)
        with fs.open_input_file(inner) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def check_schema(files: Iterable[str], columns: ColumnMap, require_label: bool = False) -> None:
    """Fail before any work starts when a shard lacks a column, naming the file and the column."""
    import pyarrow as pa

    required = [("image", columns.image), ("caption", columns.caption)]
    if require_label:
        required.append(("label", columns.label))
    for file in files:
        schema = parquet_schema(file)
        names = set(schema.names)
        for role, name in required:
            if name not in names:
                hint = f" (set data.{role}_column)" if role != "label" else " (set data.label_column)"
                raise DataError(
                    f"{file}: missing {role} column {name!r}; columns are {sorted(names)}{hint}"
                )
        image_type = schema.field(columns.image).type
        if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
            raise DataError(f"{file}: image column {columns.image!r} has type {image_type}, expected binary")
        caption_type = schema.field(columns.caption).type
        if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type)):
            raise DataError(f"{file}: caption column {columns.caption!r} has type {caption_type}, expected string")


def read_dataset_json(path: str | os.PathLike) -> dict:
    """``dataset.json`` beside the shards ({} when absent). ``path`` may be the folder or a file inside it."""
    path = str(path)
    fs, inner = _filesystem(path)
    import pyarrow.fs as pafs

    info = fs.get_file_info(inner)
    folder = inner if info.type == pafs.FileType.Directory else os.path.dirname(inner)
    meta = folder.rstrip("/") + "/dataset.json"
    if fs.get_file_info(meta).type != pafs.FileType.File:
        return {}
    try:
        with fs.open_input_stream(meta) as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta}: not valid JSON ({exc})") from exc


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
