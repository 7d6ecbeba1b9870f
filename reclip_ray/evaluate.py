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
import os
from pathlib import Path
from typing import Any, Sequence

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
) -> torch.Tensor:
    """[C, D] class embeddings: each class's normalised template embeddings averaged, then re-normalised."""
    model = getattr(model, "module", model)
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    texts = [t.format(c) if "{}" in t else f"{t} {c}" for c in classnames for t in templates]
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = torch.from_numpy(tokenizer.encode(texts[i : i + batch_size], text_length)).to(device)
        feats.append(model.encode_text(tokens, normalize=True).float())
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


def _label_sets(meta: dict, names: Sequence[str], label_column: str, classes_override: dict | None) -> dict[str, dict]:
    """{set name: {column, classes, templates}} from dataset.json (or a --classes file for the main label)."""
    if classes_override is not None:
        return {"label": {"column": "label", **classes_override}}
    sets: dict[str, dict] = {}
    if isinstance(meta.get("label_sets"), dict):
        for name, spec in meta["label_sets"].items():
            column = spec.get("column", "label")
            source = label_column if column == "label" else column
            if source in names and spec.get("classes"):
                sets[name] = {"column": column, "classes": spec["classes"], "templates": spec.get("templates", [])}
    elif meta.get("classes") and label_column in names:
        sets["label"] = {"column": "label", "classes": meta["classes"], "templates": meta.get("templates", [])}
    return sets


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
        if new.any():
            self.image_features.append(encode_image(batch["image"][new]))
        if has_caption.any():
            self.text_features.append(encode_text(batch["tokens"][has_caption]))
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
                    raise ReclipError(
                        f"{batch['file'][r]}: rows showing image {ident} disagree on {c!r} ({values[g]} vs {y} at "
                        f"key={batch['key'][r]}); zero-shot needs one label per image"
                    )


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
) -> dict[str, float]:
    """Flat metrics dict: ``rows`` (usable rows), ``images`` (unique images), ``captions``, ``absent_rows``,
    ``bad_rows``, ``<label set>/top1|top5|mean_per_class_recall`` for every label set, and, when the set has
    captions, ``image_to_text_r@k`` / ``text_to_image_r@k`` over unique images (see the module docstring).

    ``classes`` ({"classes": [...], "templates": [...]}) replaces dataset.json's label sets with one set on the
    label column (the CLI's ``--classes``).
    """
    from reclip_ray.data.local import BadRowCount, iter_local_batches
    from reclip_ray.data.schema import ColumnMap, list_parquet_files, parquet_schema, read_dataset_json
    from reclip_ray.model import normalize_images

    columns = columns or ColumnMap()
    core = getattr(model, "module", model)
    files = list_parquet_files(str(data_path))
    names = parquet_schema(files[0]).names
    meta = read_dataset_json(data_path)
    if classes is not None and columns.label not in names:
        raise ReclipError(f"{data_path}: --classes given but the dataset has no label column {columns.label!r}")
    sets = _label_sets(meta, names, columns.label, classes)
    label_cols = sorted({spec["column"] for spec in sets.values()})

    def encode_image(images: np.ndarray) -> torch.Tensor:
        return core.encode_image(normalize_images(torch.from_numpy(images).to(device))).float().cpu()

    def encode_text(tokens: np.ndarray) -> torch.Tensor:
        return core.encode_text(torch.from_numpy(tokens).to(device)).float().cpu()

    grouped, counts = _Grouped(label_cols), BadRowCount()
    was_training = core.training
    core.eval()
    try:
        for batch in iter_local_batches(
            str(data_path), image_size=image_size, text_length=text_length, tokenizer=tokenizer,
            batch_size=batch_size, columns=columns, train=False, extra_columns=label_cols, bad_rows=counts,
            require_caption=False, group_images=True,
        ):
            grouped.add(batch, encode_image, encode_text)
    finally:
        if was_training:
            core.train()
    if not grouped.image_features:
        raise ReclipError(f"{data_path}: no readable rows to evaluate ({counts.absent} rows without an image, "
                          f"{counts.bad} bad rows)")
    if not sets and not grouped.text_features:
        raise ReclipError(f"{data_path}: nothing to evaluate: no captions and no label set (dataset.json "
                          "'classes'/'label_sets', or --classes)")
    image_features = torch.cat(grouped.image_features)

    out: dict[str, float] = {"rows": grouped.rows, "images": int(image_features.shape[0]),
                             "captions": len(grouped.text_to_image), "absent_rows": counts.absent,
                             "bad_rows": counts.bad}
    for name, spec in sets.items():
        y = torch.tensor(grouped.labels[spec["column"]], dtype=torch.long)
        n_cls = len(spec["classes"])
        bad = y[(y < 0) | (y >= n_cls)]
        if bad.numel():
            raise ReclipError(
                f"{data_path}: label {int(bad[0])} in column {spec['column']!r} is outside the {n_cls} classes "
                f"of label set {name!r} (classes file does not match the dataset?)"
            )
        classifier = zero_shot_classifier(
            core, tokenizer, spec["classes"], spec.get("templates") or DEFAULT_TEMPLATES,
            text_length=text_length, device=device, batch_size=batch_size,
        ).cpu()
        for k, v in zero_shot_metrics(image_features, y, classifier).items():
            out[f"{name}/{k}"] = v
        out[f"{name}/chance_top1"] = 1.0 / n_cls
    if grouped.text_features:
        out.update(retrieval_metrics(image_features, torch.cat(grouped.text_features),
                                     torch.tensor(grouped.text_to_image, dtype=torch.long)))
    return out


def check_eval_set(path: str, columns: Any, image_sizes: list[int], patch_size: int) -> dict[str, Any]:
    """Checks of an eval set that need no model and no Ray, so ``train`` fails in seconds, not after a phase.

    Fails (one-line ReclipError / DataError) on: an eval image size that is not a multiple of the patch size, a
    shard without an image column (captions are optional: classification-only sets), no rows at all, a null
    label or one outside the classes of a label set in dataset.json, and a set with neither captions nor labels. Reads Parquet footers, the label columns
    and at most the caption column, never the images. Returns ``{"rows", "files", "label_sets": {name: classes},
    "has_captions"}``.
    """
    from reclip_ray.data.local import _read_shard, check_columns
    from reclip_ray.data.schema import ColumnMap, count_rows, list_parquet_files, parquet_schema, read_dataset_json
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

    sets = _label_sets(read_dataset_json(path), parquet_schema(files[0]).names, columns.label, None)
    source = {name: columns.label if spec["column"] == "label" else spec["column"] for name, spec in sets.items()}
    has_captions = False
    for file in files:
        names = parquet_schema(file).names
        for column in sorted(set(source.values())):
            if column not in names:
                raise DataError(f"{file}: missing label column {column!r}; columns are {sorted(names)}")
        if sets:
            table = _read_shard(file, sorted(set(source.values())))
            for name, spec in sets.items():
                _check_labels(file, source[name], name, len(spec["classes"]), table.column(source[name]))
        if not has_captions and columns.caption in names:
            captions = _read_shard(file, [columns.caption]).column(columns.caption).to_pylist()
            has_captions = any(c is not None and str(c).strip() for c in captions)
    if not sets and not has_captions:
        raise DataError(f"{path}: nothing to evaluate: no captions and no label set (dataset.json 'classes' or "
                        "'label_sets')")
    return {"rows": rows, "files": len(files), "label_sets": {n: len(s["classes"]) for n, s in sets.items()},
            "has_captions": has_captions}


def _check_labels(file: str, column: str, set_name: str, n_classes: int, values: Any) -> None:
    """Raise naming the file, column and label set when a label is null or outside ``range(n_classes)``."""
    from reclip_ray.errors import DataError

    if values.null_count:
        raise DataError(f"{file}: null label in column {column!r} (label set {set_name!r})")
    y = np.asarray(values.to_numpy(), dtype=np.int64)
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise DataError(f"{file}: label {int(bad[0])} in column {column!r} is outside the {n_classes} classes of "
                        f"label set {set_name!r} in dataset.json")


def eval_columns(data: str, configured: Any) -> Any:
    """The training config's column names, falling back to the canonical ones the eval shards actually have.

    Training shards are often img2dataset's (``jpg``/``txt``) while the eval set is a canonical one (``image``/
    ``caption``); the CLI, the pre-Ray check and the phase-end evaluation should all read it with these columns.
    """
    from reclip_ray.data.schema import ColumnMap, list_parquet_files, parquet_schema

    names = parquet_schema(list_parquet_files(data)[0]).names
    canonical = ColumnMap()
    picked = {}
    for field in ("image", "caption", "label", "key"):
        mine = getattr(configured, field)
        picked[field] = mine if mine in names or getattr(canonical, field) not in names else getattr(canonical, field)
    return ColumnMap(**picked)


def _read_classes(path: str, meta: dict) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ReclipError(f"classes file not found: {p}")
    try:
        raw = json.loads(p.read_text())
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
    text length is the last phase's.
    """
    from reclip_ray.data.schema import ColumnMap, read_dataset_json
    from reclip_ray.export import load_export

    if not os.path.exists(checkpoint):
        raise ReclipError(f"checkpoint not found: {checkpoint}")
    if not os.path.exists(data) and "://" not in data:
        raise ReclipError(f"eval data not found: {data}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
