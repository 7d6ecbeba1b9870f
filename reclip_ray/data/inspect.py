"""``reclip-ray data inspect``: what is in a dataset folder, and which rows would the pipeline skip."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reclip_ray.data.images import BadImage, decode_image, image_size
from reclip_ray.data.local import read_shard
from reclip_ray.data.schema import (STATUS_COLUMN, ColumnMap, absent_mask, check_schema, class_label_sets, count_rows,
                                    has_captions, image_bytes, parquet_schema, read_dataset_json)
from reclip_ray.data.shards import list_parquet_files, read_footers

MAX_EXAMPLES = 10


def _copies(files: list[str], image_column: str) -> dict[str, Any]:
    """Per copy size (``data shrink``), the shards whose footer vouches for it and those where it is stale; the
    pipeline reads the full image in both of the latter cases, so this is what a phase will cost before it runs.
    From the footers ``count_rows`` already read (``shards.footers`` caches them): no second read per shard."""
    valid: Counter[int] = Counter()
    stale: Counter[int] = Counter()
    without = 0
    for shard in read_footers(files, image_column):
        valid.update(shard.copies)
        stale.update(shard.stale_copies)
        without += not shard.copies and not shard.stale_copies
    return {"sizes": {str(size): {"shards": valid[size], "stale": stale[size]} for size in sorted(valid | stale)},
            "shards_without_copies": without}


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def _summarise_meta(meta: dict) -> dict[str, Any]:
    if not meta:
        return {}
    out: dict[str, Any] = {k: v for k, v in meta.items() if k not in ("classes", "templates", "label_sets", "attributes")}
    if "classes" in meta:
        out["classes"] = len(meta["classes"])
        out["class_examples"] = list(meta["classes"])[:5]
    if "templates" in meta:
        out["templates"] = len(meta["templates"])
    if "label_sets" in meta:
        out["label_sets"] = {name: {"column": s.get("column"), "classes": len(s.get("classes", []))}
                             for name, s in meta["label_sets"].items()}
    return out


def inspect_dataset(path: str, image_column: str = "image", caption_column: str = "caption", limit: int = 0) -> dict:
    """Rows, shards, columns, absent and bad rows (fully decoded, like the pipeline would) and image size stats.

    Absent rows (null image, or an img2dataset failure "failed_to_..." in ``status``) are counted in
    ``rows_absent`` and never as bad: they are not samples, and ``bad_fraction`` is a share of the samples, the
    same share ``data.max_bad_fraction`` limits. ``rows_bad`` (also ``bad_rows``) counts only present rows whose
    image does not decode or whose caption is empty. With ``limit`` both count among the rows checked.
    ``class_labels`` lists the ClassLabel columns of Parquet written by Hugging Face ``datasets`` (the label sets
    evaluation scores when ``dataset.json`` names none).
    """
    path = str(path)
    files = list_parquet_files(path)
    captions = has_captions(files, caption_column)
    check_schema(files, ColumnMap(image=image_column, caption=caption_column), require_caption=captions)
    schema = parquet_schema(files[0])
    total_rows = count_rows(files)
    rows = _RowCheck(limit)
    for file in files:
        if rows.full():
            break
        rows.check_file(file, image_column, caption_column if captions else None)
    samples = rows.checked - rows.absent
    return {
        "path": path,
        **({} if captions else {"captions": f"none: no {caption_column!r} or other caption column in any shard; an "
                                            "eval set scored zero-shot on its label sets, not training data "
                                            "(captions under another name? --caption-column NAME)"}),
        "rows": total_rows,
        "rows_absent": rows.absent,
        "rows_bad": rows.bad,
        "shards": len(files),
        "columns": {f.name: str(f.type) for f in schema},
        "checked_rows": rows.checked,
        "bad_rows": rows.bad,  # the name this report had before rows_absent/rows_bad; kept for scripts that read it
        "bad_fraction": round(rows.bad / samples, 6) if samples else 0.0,
        "bad_reasons": dict(rows.reasons),
        "bad_examples": rows.examples,
        "image_size": {"width": _stats(rows.widths), "height": _stats(rows.heights)},
        "copies": _copies(files, image_column),
        "dataset_json": _summarise_meta(read_dataset_json(path)),
        "class_labels": {column: {"classes": len(names), "class_examples": names[:5]}
                         for column, names in class_label_sets(files).items()},
    }


@dataclass
class _RowCheck:
    """The rows checked so far (at most ``limit``; 0: all), with what was wrong with the bad ones."""

    limit: int
    checked: int = 0
    absent: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)

    def full(self) -> bool:
        return bool(self.limit) and self.checked >= self.limit

    def check_file(self, file: str, image_column: str, caption_column: str | None) -> None:
        """Decode every row of one shard (until the limit) as the pipeline would, and count what fails. Without a
        caption column (a class-only eval set) only the images are checked."""
        names = parquet_schema(file).names
        own = [c for c in (image_column, caption_column) if c is not None]
        wanted = own + [c for c in ("key", STATUS_COLUMN) if c in names and c not in own]
        table = read_shard(file, wanted)
        absent = absent_mask(table, image_column, STATUS_COLUMN)
        images = image_bytes(table.column(image_column)).to_pylist()
        captions = table.column(caption_column).to_pylist() if caption_column else [""] * len(images)
        keys = table.column("key").to_pylist() if "key" in names else [None] * len(images)
        for row, (data, caption, key) in enumerate(zip(images, captions, keys)):
            if self.full():
                break
            self.checked += 1
            if absent[row]:
                self.absent += 1
                continue
            reason = self._problem(data, caption, caption_column is not None)
            if reason is not None:
                self.bad += 1
                self.reasons[reason.split(":")[0]] += 1
                if len(self.examples) < MAX_EXAMPLES:
                    self.examples.append({"file": os.path.basename(file), "row": row, "key": key, "reason": reason})

    def _problem(self, data: bytes | None, caption: Any, captioned: bool = True) -> str | None:
        """Why the row would be skipped as bad (None: it is fine); a good image's size goes into the stats."""
        try:
            if data is None:
                raise BadImage("missing image bytes")
            w, h = image_size(data)
            decode_image(data, 16, train=False)  # full entropy decode (cheap via draft): catches truncation
            self.widths.append(w)
            self.heights.append(h)
        except BadImage as exc:
            return str(exc)
        if captioned and (caption is None or not str(caption).strip()):
            return "empty caption"
        return None
