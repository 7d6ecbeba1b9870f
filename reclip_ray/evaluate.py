"""Zero-shot classification and image-text retrieval, in bounded memory.

Features are accumulated (N x D floats: 100 MB for 50k images at D=512) and every similarity matrix is computed
in row chunks, so memory stays at ``chunk x N`` instead of ``N x N``.

Ranking rule, used by every metric here: the rank of the correct answer is the number of *wrong* candidates that
score greater than **or equal to** it, and a top-k hit means rank < k. Ties count against the model, which makes
the metrics independent of the order of candidates and gives a collapsed model (all scores equal) zero, not chance
or full credit. For image -> text with several captions per image, an image's score is that of its best
caption (a hit if any of its captions ranks high enough); images with no caption are left out of that direction.

Real eval layouts (as CLIP_benchmark scores them): COCO / Flickr30k have one row per caption and five rows per
image. Rows that show the same image (same ``image_id`` column value, else identical image bytes) are grouped and
each unique image is decoded and encoded once, so a caption's own image never ties with a copy of itself; text ->
image then ranks the unique images, image -> text ranks every caption. Zero-shot scores each unique image once
(its rows must agree on the label). Sets without captions (ImageNet-style) get zero-shot only; the retrieval keys
are then absent from the result.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from reclip_ray.errors import ReclipError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
CHUNK = 1024


# --------------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    text_length: int,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """[C, D] class embeddings: each class's normalised template embeddings averaged, then re-normalised.

    With ``world_size`` > 1 (every rank calls it) each rank encodes a contiguous block of the same batches that one
    rank would encode, and the features are gathered: ImageNet's 1000 classes x 80 templates are 80k captions,
    and a batch encodes to the same numbers whichever rank runs it.
    """
    model = getattr(model, "module", model)
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    texts = [t.format(c) if "{}" in t else f"{t} {c}" for c in classnames for t in templates]
    starts = list(range(0, len(texts), batch_size))
    lo, hi = _block(len(starts), rank, world_size)

    def encode() -> Iterator[None]:  # one prompt batch per step (see _agree)
        feats = []
        for i in starts[lo:hi]:
            tokens = torch.from_numpy(tokenizer.encode(texts[i : i + batch_size], text_length)).to(device)
            feats.append(model.encode_text(tokens, normalize=True).float())
            yield
        return feats

    if world_size == 1:
        feats = _finish(encode())
    else:
        mine = _agree(encode(), world_size, device)
        feats = [t.to(device) for t in gather_rows(torch.cat(mine) if mine else None, world_size, device)]
    per_template = torch.cat(feats).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)


def _rank_of(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Number of candidates other than the correct one scoring >= it (ties count against the model)."""
    target = scores.gather(1, correct[:, None])
    return (scores >= target).sum(dim=1) - 1


def zero_shot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    *,
    chunk: int = CHUNK,
) -> dict[str, float]:
    """top-1, top-5 (k clipped to the number of classes) and mean per-class recall (top-1, classes present)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    num_classes = classifier.shape[0]
    k5 = min(5, num_classes)
    ranks = torch.cat([
        _rank_of(image_features[i : i + chunk].float() @ classifier.float().T, labels[i : i + chunk])
        for i in range(0, image_features.shape[0], chunk)
    ]).cpu()
    labels = labels.cpu()
    hit1 = (ranks < 1).float()
    present = torch.unique(labels)
    per_class = torch.stack([hit1[labels == c].mean() for c in present])
    return {
        "top1": hit1.mean().item(),
        "top5": (ranks < k5).float().mean().item(),
        "mean_per_class_recall": per_class.mean().item(),
    }


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = CHUNK,
) -> dict[str, float]:
    """Recall@k both ways; ``text_to_image[j]`` is the image of caption j (default: caption j <-> image j)."""
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError("text_to_image is required when there are not exactly one caption per image")
        text_to_image = torch.arange(n_txt)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=image_features.device)
    img, txt = image_features.float(), text_features.float()

    text_ranks = torch.cat([
        _rank_of(txt[j : j + chunk] @ img.T, t2i[j : j + chunk]) for j in range(0, n_txt, chunk)
    ]).cpu()

    image_ranks = []
    for i in range(0, n_img, chunk):
        sims = img[i : i + chunk] @ txt.T  # [c, n_txt]
        ids = torch.arange(i, min(i + chunk, n_img), device=sims.device)
        mine = t2i[None, :] == ids[:, None]
        best = torch.where(mine, sims, torch.full_like(sims, -torch.inf)).amax(dim=1)
        rank = ((sims >= best[:, None]) & ~mine).sum(dim=1)
        image_ranks.append(rank[mine.any(dim=1)])
    image_ranks = torch.cat(image_ranks).cpu()

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_r@{k}"] = (image_ranks < k).float().mean().item()
    for k in ks:
        out[f"text_to_image_r@{k}"] = (text_ranks < k).float().mean().item()
    return out


# --------------------------------------------------------------------------------------------------- datasets


def _label_sets(meta: dict, names: Sequence[str], label_column: str, classes_override: dict | None,
                class_labels: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """{set name: {column, classes, templates, source}} from, first found: a --classes file (the main label),
    dataset.json's ``label_sets`` or ``classes``, the ClassLabel columns of a Hugging Face ``datasets`` export
    (``class_labels``, ``schema.class_label_sets``).

    A ClassLabel column is named as dataset.json would name it: the label column (``data.label_column``) is the set
    ``label``; any other is a set named after its column (CIFAR-100's ``fine_label`` and ``coarse_label``). A column
    literally named ``label`` that is not the label column is left out: ``label`` stands for the label column."""
    if classes_override is not None:
        return {"label": {"column": "label", **classes_override, "source": "the classes file"}}
    sets: dict[str, dict] = {}
    if not isinstance(meta.get("label_sets"), dict) and not meta.get("classes"):
        for column, classes in (class_labels or {}).items():
            main = column == label_column
            if column in names and (main or column != "label"):
                sets["label" if main else column] = {"column": "label" if main else column, "classes": classes,
                                                     "templates": meta.get("templates", []),
                                                     "source": "the 'huggingface' metadata"}
        return dict(sorted(sets.items(), key=lambda kv: kv[0] != "label"))
    if isinstance(meta.get("label_sets"), dict):
        for name, spec in meta["label_sets"].items():
            column = spec.get("column", "label")
            source = label_column if column == "label" else column
            if source in names and spec.get("classes"):
                sets[name] = {"column": column, "classes": spec["classes"], "templates": spec.get("templates", []),
                              "source": "dataset.json"}
    elif meta.get("classes") and label_column in names:
        sets["label"] = {"column": "label", "classes": meta["classes"], "templates": meta.get("templates", []),
                         "source": "dataset.json"}
    return sets


def _encode_batch(batch: dict[str, np.ndarray], encode_image: Any, encode_text: Any,
                  image_features: list[torch.Tensor], text_features: list[torch.Tensor]) -> None:
    """Append the features of a batch's first-seen images and of its captions (a batch of grouped eval rows)."""
    if batch["image_new"].any():
        image_features.append(encode_image(batch["image"][batch["image_new"]]))
    if batch["has_caption"].any():
        text_features.append(encode_text(batch["tokens"][batch["has_caption"]]))


class _Grouped:
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

    def add(self, batch: dict[str, np.ndarray], encode_image: Any, encode_text: Any) -> None:
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


def _disagree(file: str, ident: str, column: str, first: int, other: int, key: Any) -> str:
    return (f"{file}: rows showing image {ident} disagree on {column!r} ({first} vs {other} at key={key}); "
            "zero-shot needs one label per image")


def _label_value(value: Any, column: str, file: str, key: Any) -> int:
    """A label cell as an int; a null label is a data mistake named by file and key, not a numpy TypeError."""
    if value is None:
        raise ReclipError(f"{file}: null label in column {column!r} at key={key}")
    return int(value)


@torch.no_grad()
def evaluate_dataset(
    model: torch.nn.Module,
    tokenizer: Any,
    data_path: str,
    *,
    image_size: int,
    text_length: int,
    batch_size: int = 256,
    columns: Any = None,
    device: str | torch.device = "cpu",
    classes: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Flat metrics dict: ``rows`` (usable rows), ``images`` (unique images), ``captions``, ``absent_rows``,
    ``bad_rows``, ``<label set>/top1|top5|mean_per_class_recall`` for every label set, and, when the set has
    captions, ``image_to_text_r@k`` / ``text_to_image_r@k`` over unique images (see the module docstring).

    ``classes`` ({"classes": [...], "templates": [...]}) replaces dataset.json's label sets with one set on the
    label column (the CLI's ``--classes``).

    ``world_size`` > 1: every rank of the initialised default ``torch.distributed`` group calls this with the same
    arguments (and its own ``rank``), so that no GPU idles while one rank evaluates. Each rank decodes and encodes
    one contiguous slice of the rows (and of the class-prompt batches); the features and per-row records are
    gathered, put back in row order and grouped exactly as one rank would (``_assemble``); the metrics are computed
    once, on rank 0, and broadcast: every rank returns the dict single-rank evaluation returns. An error on any
    rank is raised on every rank, so the ranks' collectives stay paired.
    """
    from reclip_ray.data.local import BadRowCount, iter_local_batches
    from reclip_ray.data.schema import ColumnMap, class_label_sets, parquet_schema, read_dataset_json
    from reclip_ray.data.shards import list_parquet_files

    columns = columns or ColumnMap()
    core = getattr(model, "module", model)

    def setup() -> tuple[list[str], dict[str, dict]]:
        files = list_parquet_files(str(data_path))
        names = parquet_schema(files[0]).names
        if classes is not None and columns.label not in names:
            raise ReclipError(f"{data_path}: --classes given but the dataset has no label column {columns.label!r}")
        return files, _label_sets(read_dataset_json(data_path), names, columns.label, classes,
                                  class_label_sets(files))

    files, sets = setup() if world_size == 1 else _agree(_one_step(setup), world_size, device)
    label_cols = sorted({spec["column"] for spec in sets.values()})

    def read(collector: Any, row_range: tuple[int, int] | None) -> Iterator[None]:
        """Decode and encode the rows (all, or ``row_range``) into ``collector``, one batch per step (see
        ``_agree``), and return the row counts; the model is in eval mode meanwhile."""
        from reclip_ray.model import normalize_images

        def encode_image(images: np.ndarray) -> torch.Tensor:
            return core.encode_image(normalize_images(torch.from_numpy(images).to(device))).float().cpu()

        def encode_text(tokens: np.ndarray) -> torch.Tensor:
            return core.encode_text(torch.from_numpy(tokens).to(device)).float().cpu()

        counts = BadRowCount()
        was_training = core.training
        core.eval()
        try:
            for batch in iter_local_batches(
                str(data_path), image_size=image_size, text_length=text_length, tokenizer=tokenizer,
                batch_size=batch_size, columns=columns, train=False, extra_columns=label_cols, bad_rows=counts,
                require_caption=False, group_images=True, row_range=row_range,
            ):
                collector.add(batch, encode_image, encode_text)
                yield
        finally:
            if was_training:
                core.train()
        return counts

    if world_size == 1:
        grouped = _Grouped(label_cols)
        counts = _finish(read(grouped, None))
        got = _Gathered(torch.cat(grouped.image_features) if grouped.image_features else None,
                        torch.cat(grouped.text_features) if grouped.text_features else None,
                        grouped.labels, grouped.text_to_image, grouped.rows, counts.absent, counts.bad)
    else:
        from reclip_ray.data.shards import footers

        def read_slice() -> Iterator[None]:
            part = _Slice(label_cols)
            counts = yield from read(part, _block(sum(f.rows for f in footers(files)), rank, world_size))
            return part, counts

        part, counts = _agree(read_slice(), world_size, device)
        got = _gather_slices(part, counts, label_cols, world_size, device)
    _check_gathered(data_path, sets, got)
    classifiers = {
        name: zero_shot_classifier(
            core, tokenizer, spec["classes"], spec.get("templates") or DEFAULT_TEMPLATES, text_length=text_length,
            device=device, batch_size=batch_size, rank=rank, world_size=world_size,
        ).cpu()
        for name, spec in sets.items()
    }
    if world_size == 1:
        return _scores(sets, got, classifiers)
    return _from_rank0(lambda: _scores(sets, got, classifiers), rank, world_size)


# --------------------------------------------------------------------------------------------------- scoring


class _Gathered:
    """Everything the metrics need, in single-rank order: one feature row per unique image, one per caption."""

    def __init__(self, image_features: torch.Tensor | None, text_features: torch.Tensor | None,
                 labels: dict[str, list[int]], text_to_image: list[int], rows: int, absent: int, bad: int) -> None:
        self.image_features, self.text_features = image_features, text_features
        self.labels, self.text_to_image = labels, text_to_image
        self.rows, self.absent, self.bad = rows, absent, bad


def _check_gathered(data_path: str, sets: dict[str, dict], got: _Gathered) -> None:
    """The user-facing errors that need every row: nothing readable, nothing to score, a label outside its set."""
    if got.image_features is None:
        raise ReclipError(f"{data_path}: no readable rows to evaluate ({got.absent} rows without an image, "
                          f"{got.bad} bad rows)")
    if not sets and got.text_features is None:
        raise ReclipError(f"{data_path}: nothing to evaluate: no captions and no label set (dataset.json "
                          "'classes'/'label_sets', --classes, or ClassLabel columns of Hugging Face datasets)")
    for name, spec in sets.items():
        y = torch.tensor(got.labels[spec["column"]], dtype=torch.long)
        n_cls = len(spec["classes"])
        bad = y[(y < 0) | (y >= n_cls)]
        if bad.numel():
            raise ReclipError(
                f"{data_path}: label {int(bad[0])} in column {spec['column']!r} is outside the {n_cls} classes "
                f"of label set {name!r} (classes file does not match the dataset?)"
            )


def _scores(sets: dict[str, dict], got: _Gathered, classifiers: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, float] = {"rows": got.rows, "images": int(got.image_features.shape[0]),
                             "captions": len(got.text_to_image), "absent_rows": got.absent, "bad_rows": got.bad}
    for name, spec in sets.items():
        y = torch.tensor(got.labels[spec["column"]], dtype=torch.long)
        for k, v in zero_shot_metrics(got.image_features, y, classifiers[name]).items():
            out[f"{name}/{k}"] = v
        out[f"{name}/chance_top1"] = 1.0 / len(spec["classes"])
    if got.text_features is not None:
        out.update(retrieval_metrics(got.image_features, got.text_features,
                                     torch.tensor(got.text_to_image, dtype=torch.long)))
    return out


# --------------------------------------------------------------------------------------------------- sharded


def _block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of ``n`` items (sizes differ by at most one)."""
    return n * rank // world_size, n * (rank + 1) // world_size


class _Slice:
    """One rank's rows in order: each row's image identity, whether this rank encoded its image (the first row of
    that image in the slice), caption flag, label cells, file and key; plus the features it encoded. Grouping
    across slices, and every label check, wait for ``_assemble``: a rank cannot know which rows of its images
    other ranks hold."""

    def __init__(self, label_columns: Sequence[str]) -> None:
        self.rows: dict[str, list] = {"ids": [], "new": [], "has_caption": [], "files": [], "keys": [],
                                      **{f"label:{c}": [] for c in label_columns}}
        self.image_features: list[torch.Tensor] = []
        self.text_features: list[torch.Tensor] = []

    def add(self, batch: dict[str, np.ndarray], encode_image: Any, encode_text: Any) -> None:
        _encode_batch(batch, encode_image, encode_text, self.image_features, self.text_features)
        for name, source in (("ids", "image_id"), ("new", "image_new"), ("has_caption", "has_caption"),
                             ("files", "file"), ("keys", "key")):
            self.rows[name] += batch[source].tolist()
        for name in self.rows:
            if name.startswith("label:"):
                self.rows[name] += batch[name[len("label:"):]].tolist()


def _gather_slices(part: _Slice, counts: Any, label_cols: Sequence[str], world_size: int,
                   device: str | torch.device) -> _Gathered:
    """Every rank's slice on every rank (records as objects, features as padded tensors), then ``_assemble``."""
    import torch.distributed as dist

    records: list[Any] = [None] * world_size
    dist.all_gather_object(records, {**part.rows, "absent": counts.absent, "bad": counts.bad})
    images = gather_rows(torch.cat(part.image_features) if part.image_features else None, world_size, device)
    texts = gather_rows(torch.cat(part.text_features) if part.text_features else None, world_size, device)
    return _assemble(records, images, texts, label_cols)


def _assemble(records: list[dict], images: list[torch.Tensor], texts: list[torch.Tensor],
              label_cols: Sequence[str]) -> _Gathered:
    """The slices, in rank order (= row order), grouped as ``_Grouped`` groups one stream of rows.

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
    return _Gathered(image_features, text_features, labels, t2i, rows, absent, bad)


def gather_rows(local: torch.Tensor | None, world_size: int, device: str | torch.device) -> list[torch.Tensor]:
    """Every rank's ``[n_r, ...]`` tensor (n_r may differ, or be None = no rows), on CPU, in rank order.

    ``dist.all_gather`` needs equal shapes, so the row counts (and the trailing shape, which a rank without rows
    does not know) are exchanged first and each tensor is padded to the largest. The tensors travel on ``device``
    (NCCL gathers GPU tensors only).
    """
    import torch.distributed as dist

    shape = None if local is None else (int(local.shape[0]), tuple(local.shape[1:]), str(local.dtype))
    shapes: list[Any] = [None] * world_size
    dist.all_gather_object(shapes, shape)
    known = [s for s in shapes if s is not None]
    if not known:
        return [torch.zeros(0) for _ in range(world_size)]
    _, tail, dtype_name = known[0]
    dtype = getattr(torch, dtype_name.split(".")[-1])
    counts = [s[0] if s is not None else 0 for s in shapes]
    buf = torch.zeros((max(counts), *tail), dtype=dtype, device=device)
    if local is not None and local.shape[0]:
        buf[: local.shape[0]] = local.to(device)
    out = [torch.empty_like(buf) for _ in range(world_size)]
    dist.all_gather(out, buf)
    return [o[:n].cpu() for o, n in zip(out, counts)]


def _agree(steps: Iterator[Any], world_size: int, device: str | torch.device) -> Any:
    """Run the generator ``steps`` (one unit of work per ``next``; its return value is the result) on every rank
    in lockstep, so that an error on one rank stops every rank within one unit of work.

    After each unit the ranks all-reduce two flags (failed here, still working), one tiny collective per unit
    (an eval batch): a rank whose slice failed (an unreadable shard, say) would otherwise leave the others waiting
    in the next collective until they finished their own slices, or until the collective timeout when that takes
    longer. A rank that is done keeps answering until every rank is. The failing rank raises its own error; the
    others raise a ReclipError that names it.
    """
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    working = True
    while True:
        if working:
            try:
                next(steps)
            except StopIteration as stop:
                result, working = stop.value, False
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error, working = exc, False
        flags = torch.tensor([error is not None, working], dtype=torch.int64, device=device)
        dist.all_reduce(flags)
        failed, busy = flags.tolist()
        if failed or not busy:
            break
    if not failed:
        return result
    steps.close()  # a rank stopped early: its generator's ``finally`` (the model's train mode) runs now
    errors: list[Any] = [None] * world_size
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    r, message = next((r, e) for r, e in enumerate(errors) if e is not None)
    raise ReclipError(f"evaluation failed on rank {r}: {message}")


def _one_step(fn: Callable[[], Any]) -> Iterator[None]:
    """``fn`` as a one-step generator for ``_agree``: the first ``next`` runs it and stops with its result."""
    return fn()
    yield  # unreachable: makes this a generator


def _finish(steps: Iterator[Any]) -> Any:
    """Run a step generator to its end on one rank; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def _from_rank0(fn: Any, rank: int, world_size: int) -> dict[str, float]:
    """``fn()`` on rank 0 only (the metrics: once, not once per rank), its result or error broadcast to all."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value if isinstance(value, Exception) else ReclipError(str(value))
    return value


def check_eval_set(path: str, columns: Any, image_sizes: list[int], patch_size: int) -> dict[str, Any]:
    """Checks of an eval set that need no model and no Ray, so ``train`` fails in seconds, not after a phase.

    Fails (one-line ReclipError / DataError) on: an eval image size that is not a multiple of the patch size, a
    shard without an image column (captions are optional: classification-only sets), no rows at all, a null
    label or one outside the classes of a label set in dataset.json, and a set with neither captions nor labels. Reads Parquet footers, the label columns
    and at most the caption column, never the images. Returns ``{"rows", "files", "label_sets": {name: classes},
    "has_captions"}``.
    """
    from reclip_ray.data.local import check_columns, read_shard
    from reclip_ray.data.schema import ColumnMap, class_label_sets, count_rows, parquet_schema, read_dataset_json
    from reclip_ray.data.shards import list_parquet_files
    from reclip_ray.errors import DataError

    columns = columns or ColumnMap()
    for size in image_sizes:
        if int(size) % int(patch_size):
            raise ReclipError(f"eval image size {size} is not a multiple of the model's patch size {patch_size}")
    files = list_parquet_files(str(path))
    check_columns(files, columns, require_caption=False)
    rows = count_rows(files)
    if rows == 0:
        raise DataError(f"{path}: no rows to evaluate in its {len(files)} Parquet file(s)")

    sets = _label_sets(read_dataset_json(path), parquet_schema(files[0]).names, columns.label, None,
                       class_label_sets(files))
    source = {name: columns.label if spec["column"] == "label" else spec["column"] for name, spec in sets.items()}
    has_captions = False
    for file in files:
        names = parquet_schema(file).names
        for column in sorted(set(source.values())):
            if column not in names:
                raise DataError(f"{file}: missing label column {column!r}; columns are {sorted(names)}")
        if sets:
            table = read_shard(file, sorted(set(source.values())))
            for name, spec in sets.items():
                _check_labels(file, source[name], name, spec, table.column(source[name]))
        if not has_captions and columns.caption in names:
            captions = read_shard(file, [columns.caption]).column(columns.caption).to_pylist()
            has_captions = any(c is not None and str(c).strip() for c in captions)
    if not sets and not has_captions:
        raise DataError(f"{path}: nothing to evaluate: no captions and no label set (dataset.json 'classes' or "
                        "'label_sets', or ClassLabel columns of Hugging Face datasets)")
    return {"rows": rows, "files": len(files), "label_sets": {n: len(s["classes"]) for n, s in sets.items()},
            "has_captions": has_captions}


def _check_labels(file: str, column: str, set_name: str, spec: dict, values: Any) -> None:
    """Raise naming the file, column and label set when a label is null or outside ``range(n_classes)``."""
    from reclip_ray.errors import DataError

    n_classes = len(spec["classes"])
    if values.null_count:
        raise DataError(f"{file}: null label in column {column!r} (label set {set_name!r})")
    y = np.asarray(values.to_numpy(), dtype=np.int64)
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise DataError(f"{file}: label {int(bad[0])} in column {column!r} is outside the {n_classes} classes of "
                        f"label set {set_name!r} in {spec['source']}"
                        + (" (-1 is how datasets marks a missing label: an unlabelled split?)"
                           if int(bad[0]) == -1 and "huggingface" in spec["source"] else ""))


def eval_columns(data: str, configured: Any) -> Any:
    """The training config's column names, falling back to the canonical ones the eval shards actually have.

    Training shards are often img2dataset's (``jpg``/``txt``) while the eval set is a canonical one (``image``/
    ``caption``); the CLI, the pre-Ray check and the phase-end evaluation should all read it with these columns.
    """
    from reclip_ray.data.schema import ColumnMap, parquet_schema
    from reclip_ray.data.shards import list_parquet_files

    names = parquet_schema(list_parquet_files(data)[0]).names
    canonical = ColumnMap()
    picked = {}
    for field in ("image", "caption", "label", "key"):
        mine = getattr(configured, field)
        picked[field] = mine if mine in names or getattr(canonical, field) not in names else getattr(canonical, field)
    return ColumnMap(**picked)


def _read_classes(path: str, meta: dict) -> dict:
    from reclip_ray import storage

    p = str(path)
    try:
        raw = json.loads(storage.read_text(p))
    except FileNotFoundError:
        raise ReclipError(f"classes file not found: {p}") from None
    except ValueError as exc:
        raise ReclipError(f"{p}: not valid JSON ({exc})") from None
    if isinstance(raw, list):
        raw = {"classes": raw, "templates": meta.get("templates") or list(DEFAULT_TEMPLATES)}
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not raw["classes"]:
        raise ReclipError(f"{p}: expected a JSON list of class names or {{\"classes\": [...], \"templates\": [...]}}")
    templates = raw.get("templates") or meta.get("templates") or list(DEFAULT_TEMPLATES)
    return {"classes": [str(c) for c in raw["classes"]], "templates": [str(t) for t in templates]}


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    classes_path: str | None = None,
    image_size: int = 0,
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, Any]:
    """The CLI's ``reclip-ray eval``: load an exported model, evaluate ``data``, return a JSON-able dict.

    ``image_size`` 0 means the model's full resolution (``eval.full_image_size`` or the last phase's size); the
    text length is the last phase's. ``checkpoint`` may also be an open_clip folder: open_clip builds the model
    and (for the CLIP tokenizer) tokenizes, so the numbers are open_clip's on the same images.
    """
    from reclip_ray import storage
    from reclip_ray.data.schema import ColumnMap, read_dataset_json
    from reclip_ray.export import load_export
    from reclip_ray.openclip import is_open_clip_dir, load_open_clip_export

    if not storage.exists(checkpoint):
        raise ReclipError(f"checkpoint not found: {checkpoint}")
    if not storage.exists(data):
        raise ReclipError(f"eval data not found: {data}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_open_clip_dir(checkpoint):  # e.g. `reclip-ray export --format open_clip`: open_clip builds the model
        model, tokenizer, cfg = load_open_clip_export(checkpoint, device, image_size=image_size)
    else:  # both loaders download a URI to a temp folder first
        model, tokenizer, cfg = load_export(checkpoint, device)
    last = cfg.phases[-1]
    size = image_size or cfg.eval.full_image_size or last.image_size
    patch = cfg.model.vision.patch_size
    if size % patch:
        raise ReclipError(f"--image-size {size} is not a multiple of the model's patch size {patch}")
    classes = _read_classes(classes_path, read_dataset_json(data)) if classes_path else None
    columns = eval_columns(data, ColumnMap.from_config(cfg.data))
    metrics = evaluate_dataset(
        model, tokenizer, data, image_size=size, text_length=last.text_length,
        batch_size=batch_size, columns=columns, device=device, classes=classes,
    )
    return {"checkpoint": str(checkpoint), "data": str(data), "image_size": size,
            "text_length": last.text_length, "metrics": metrics}
