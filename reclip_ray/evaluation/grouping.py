"""Eval rows grouped by the image they show: one feature row per unique image, one per caption.

Real eval layouts (as CLIP_benchmark scores them): COCO / Flickr30k have one row per caption and five rows per
image. Rows that show the same image (same ``image_id`` column value, else identical image bytes) are grouped and
each unique image is decoded and encoded once, so a caption's own image never ties with a copy of itself; text ->
image then ranks the unique images, image -> text ranks every caption. Zero-shot scores each unique image once
(its rows must agree on the label). Sets without captions (ImageNet-style) get zero-shot only.

One rank groups its stream of rows as it reads them (``Grouped``). Several ranks each read a contiguous slice
(``Slice``), and the slices are gathered and grouped as one rank would have grouped them (``assemble``). Both end
in a ``Gathered``: what the metrics need, in single-rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from reclip_ray.errors import ReclipError
from reclip_ray.evaluation.eval_set import class_index, not_an_index
from reclip_ray.evaluation.gather import gather_rows

Encode = Callable[[np.ndarray], torch.Tensor]


@dataclass
class Gathered:
    """Everything the metrics need, in single-rank order: one feature row per unique image, one per caption."""

    image_features: torch.Tensor | None
    text_features: torch.Tensor | None
    labels: dict[str, list[int]]  # label column -> one label per unique image
    text_to_image: list[int]  # caption j -> its unique image
    rows: int
    absent: int  # rows without an image (failed downloads)
    bad: int  # rows whose image did not decode


def _encode_batch(batch: dict[str, np.ndarray], encode_image: Encode, encode_text: Encode,
                  image_features: list[torch.Tensor], text_features: list[torch.Tensor]) -> None:
    """Append the features of a batch's first-seen images and of its captions (a batch of grouped eval rows)."""
    if batch["image_new"].any():
        image_features.append(encode_image(batch["image"][batch["image_new"]]))
    if batch["has_caption"].any():
        text_features.append(encode_text(batch["tokens"][batch["has_caption"]]))


def _cat(features: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(features) if features else None


def _label_value(value: Any, column: str, file: str, key: Any) -> int:
    """A label cell as a class index; a null one, or one that is no index (a class name, 2.5), is a data mistake
    named by file and key, not a ValueError from ``int`` or a label silently truncated to another class."""
    if value is None:
        raise ReclipError(f"{file}: null label in column {column!r} at key={key}")
    y = class_index(value)
    if y is None:
        raise ReclipError(not_an_index(value, file, f"in column {column!r} at key={key}"))
    return y


def _disagree(file: str, ident: str, column: str, first: int, other: int, key: Any) -> str:
    return (f"{file}: rows showing image {ident} disagree on {column!r} ({first} vs {other} at key={key}); "
            "zero-shot needs one label per image")


class Grouped:
    """Features and labels of a stream of rows, one entry per unique image, and each caption's image index.

    Built batch by batch from ``iter_local_batches(group_images=True, require_caption=False)``, so memory is one
    feature row per unique image plus one per caption, never one decoded image per row.
    """

    def __init__(self, label_columns: Sequence[str]) -> None:
        self.index: dict[str, int] = {}  # image identity -> position among the unique images
        self.labels: dict[str, list[int]] = {c: [] for c in label_columns}
        self.image_features: list[torch.Tensor] = []
        self.text_features: list[torch.Tensor] = []
        self.text_to_image: list[int] = []
        self.rows = 0

    def add(self, batch: dict[str, np.ndarray], encode_image: Encode, encode_text: Encode) -> None:
        """Encode the batch's new images and its captions; map every row to its image; check shared labels."""
        new, has_caption = batch["image_new"], batch["has_caption"]
        _encode_batch(batch, encode_image, encode_text, self.image_features, self.text_features)
        self.rows += len(new)
        for r, ident in enumerate(batch["image_id"]):
            if new[r]:
                self.index[ident] = len(self.index)
            g = self.index[ident]
            if has_caption[r]:
                self.text_to_image.append(g)
            for c, values in self.labels.items():
                y = _label_value(batch[c][r], c, batch["file"][r], batch["key"][r])
                if new[r]:
                    values.append(y)
                elif values[g] != y:
                    raise ReclipError(_disagree(batch["file"][r], ident, c, values[g], y, batch["key"][r]))

    def gathered(self, counts: Any) -> Gathered:
        """The stream read to its end; ``counts`` is its ``BadRowCount``."""
        return Gathered(_cat(self.image_features), _cat(self.text_features), self.labels, self.text_to_image,
                        self.rows, counts.absent, counts.bad)


class Slice:
    """One rank's rows in order: each row's image identity, whether this rank encoded its image (the first row of
    that image in the slice), caption flag, label cells, file and key; plus the features it encoded. Grouping
    across slices, and every label check, wait for ``assemble``: a rank cannot know which rows of its images
    other ranks hold."""

    def __init__(self, label_columns: Sequence[str]) -> None:
        self.rows: dict[str, list] = {"ids": [], "new": [], "has_caption": [], "files": [], "keys": [],
                                      **{f"label:{c}": [] for c in label_columns}}
        self.image_features: list[torch.Tensor] = []
        self.text_features: list[torch.Tensor] = []

    def add(self, batch: dict[str, np.ndarray], encode_image: Encode, encode_text: Encode) -> None:
        _encode_batch(batch, encode_image, encode_text, self.image_features, self.text_features)
        for name, source in (("ids", "image_id"), ("new", "image_new"), ("has_caption", "has_caption"),
                             ("files", "file"), ("keys", "key")):
            self.rows[name] += batch[source].tolist()
        for name in self.rows:
            if name.startswith("label:"):
                self.rows[name] += batch[name[len("label:"):]].tolist()


def gather_slices(part: Slice, counts: Any, label_cols: Sequence[str], world_size: int,
                  device: str | torch.device) -> Gathered:
    """Every rank's slice on every rank (records as objects, features as padded tensors), then ``assemble``."""
    import torch.distributed as dist

    records: list[Any] = [None] * world_size
    dist.all_gather_object(records, {**part.rows, "absent": counts.absent, "bad": counts.bad})
    images = gather_rows(_cat(part.image_features), world_size, device)
    texts = gather_rows(_cat(part.text_features), world_size, device)
    return assemble(records, images, texts, label_cols)


def assemble(records: list[dict], images: list[torch.Tensor], texts: list[torch.Tensor],
             label_cols: Sequence[str]) -> Gathered:
    """The slices, in rank order (= row order), grouped as ``Grouped`` groups one stream of rows.

    A row starts a unique image when no earlier row, in any slice, showed it; its features are those its own rank
    encoded (that rank had not seen the image before in its slice either). Later rows of the image, in any slice,
    map to it and must agree on its labels. So images, captions, labels, row and bad-row counts are those of one
    rank reading every row, with one exception: rows sharing an ``image_id`` but not their bytes, where the first
    such row in a later slice fails to decode although an earlier slice decoded the image (one rank never
    decodes a repeat, so it would keep that row; the slice's rank counts it bad).
    """
    index: dict[str, int] = {}
    pick: list[int] = []  # row of the concatenated image features for each unique image
    labels: dict[str, list[int]] = {c: [] for c in label_cols}
    t2i: list[int] = []
    rows = absent = bad = 0
    base = 0
    for rec, feats in zip(records, images):
        local = 0
        for i, ident in enumerate(rec["ids"]):
            slot = None
            if rec["new"][i]:
                slot, local = base + local, local + 1
            first = ident not in index
            if first:
                if slot is None:  # cannot happen: a slice encodes the first row of each of its images
                    raise RuntimeError(f"sharded evaluation: no features for image {ident}")
                index[ident] = len(index)
                pick.append(slot)
            g = index[ident]
            if rec["has_caption"][i]:
                t2i.append(g)
            for c in label_cols:
                y = _label_value(rec[f"label:{c}"][i], c, rec["files"][i], rec["keys"][i])
                if first:
                    labels[c].append(y)
                elif labels[c][g] != y:
                    raise ReclipError(_disagree(rec["files"][i], ident, c, labels[c][g], y, rec["keys"][i]))
        rows += len(rec["ids"])
        absent += rec["absent"]
        bad += rec["bad"]
        base += int(feats.shape[0])
    image_features = torch.cat(images)[pick] if pick else None
    text_features = torch.cat(texts) if t2i else None
    return Gathered(image_features, text_features, labels, t2i, rows, absent, bad)
