"""Batches without Ray: evaluation, the single-process training loop and benchmarks read shards through here.

Same decode (``images.decode_image``) and tokenizer as the Ray pipeline's ``decode_batch``, so a model evaluated
locally sees exactly what it was trained on.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from reclip_ray.data.images import BadImage, decode_image
from reclip_ray.data.schema import ColumnMap, _filesystem, check_schema, list_parquet_files, parquet_schema
from reclip_ray.data.tokenizer import CaptionTokenizer
from reclip_ray.errors import DataError

MAX_EXAMPLES = 10


@dataclass
class BadRowCount:
    """Rows seen and rows skipped, with a few examples ({file, row, key, reason}) for the error message."""

    seen: int = 0
    bad: int = 0
    examples: list = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def add(self, seen: int, bad: int, examples: Sequence[dict] = ()) -> None:
        self.seen += int(seen)
        self.bad += int(bad)
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


def row_rng(seed: int, key: Any, epoch: int = 0) -> np.random.Generator:
    """Per-sample augmentation stream: the same crop for a (seed, key, epoch) wherever the row is decoded."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(key).encode()), int(epoch)])


def _read_shard(file: str, columns: list[str]):
    import pyarrow.parquet as pq

    fs, inner = _filesystem(file)
    try:
        return pq.read_table(inner, columns=columns, filesystem=fs)
    except Exception as exc:
        raise DataError(f"{file}: cannot read Parquet ({exc})") from exc


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
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches in file order (train: files and rows shuffled per epoch). Bad rows skipped and counted."""
    files = list_parquet_files(str(path))
    check_schema(files, columns)
    user_names = {"label": columns.label, "key": columns.key}
    extra = list(extra_columns)
    for name in extra:
        source = user_names.get(name, name)
        for file in files:
            if source not in parquet_schema(file).names:
                raise DataError(f"{file}: missing column {source!r} (asked for {name!r})")
    bad_rows = bad_rows if bad_rows is not None else BadRowCount()
    pending: dict[str, list] = {"image": [], "_text": [], "key": [], **{c: [] for c in extra if c != "key"}}

    def emit() -> dict[str, np.ndarray]:
        out = {
            "image": np.stack(pending["image"]) if pending["image"] else np.zeros((0, image_size, image_size, 3), np.uint8),
            "tokens": tokenizer.encode(pending["_text"], text_length),
            "key": np.array(pending["key"], dtype=object),
        }
        for c in extra:
            if c == "key":
                continue
            out[c] = np.array(pending[c], dtype=object if c in ("caption", "key") else None)
        for v in pending.values():
            v.clear()
        return out

    for epoch in range(epochs):
        order = list(range(len(files)))
        rng = np.random.default_rng([seed, epoch])
        if train:
            rng.shuffle(order)
        for fi in order:
            file = files[fi]
            names = parquet_schema(file).names
            wanted = [columns.image, columns.caption] + [n for n in (columns.key,) if n in names]
            wanted += [user_names.get(c, c) for c in extra if user_names.get(c, c) not in wanted]
            table = _read_shard(file, wanted)
            images = table.column(columns.image).to_pylist()
            captions = table.column(columns.caption).to_pylist()
            keys = table.column(columns.key).to_pylist() if columns.key in names else [f"{os.path.basename(file)}#{i}" for i in range(len(images))]
            extras = {c: table.column(user_names.get(c, c)).to_pylist() for c in extra}
            rows = np.arange(len(images))
            if train:
                rng.shuffle(rows)
            for r in rows.tolist():
                bad_rows.seen += 1
                caption = captions[r]
                try:
                    if caption is None or not str(caption).strip():
                        raise BadImage("empty caption")
                    if images[r] is None:
                        raise BadImage("missing image bytes")
                    arr = decode_image(images[r], image_size, train=train,
                                       rng=row_rng(seed, keys[r], epoch) if train else None)
                except BadImage as exc:
                    bad_rows.add(0, 1, [{"file": file, "row": r, "key": keys[r], "reason": str(exc)}])
                    continue
                pending["image"].append(arr)
                pending["_text"].append(str(caption))
                pending["key"].append(keys[r])
                for c in extra:
                    if c != "key":
                        pending[c].append(extras[c][r])
                if len(pending["image"]) == batch_size:
                    yield emit()
    if pending["image"]:
        yield emit()
