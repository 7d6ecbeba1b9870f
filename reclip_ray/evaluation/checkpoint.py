"""``evaluate_checkpoint``: an exported model folder (reclip-ray's or open_clip's) scored on an eval set; what
``reclip-ray eval`` runs. No Ray: the model loads from the folder alone."""

from __future__ import annotations

from typing import Any

import torch

from reclip_ray.config import full_image_size, full_text_length
from reclip_ray.errors import ReclipError
from reclip_ray.evaluation.dataset import evaluate_dataset
from reclip_ray.evaluation.eval_set import check_label_values, eval_columns, find_label_sets, read_classes


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    classes_path: str | None = None,
    image_size: int = 0,
    batch_size: int = 256,
    device: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, Any]:
    """The CLI's ``reclip-ray eval``: load an exported model, evaluate ``data``, return a JSON-able dict.

    ``image_size`` 0 means the model's full resolution (``eval.full_image_size`` or the last phase's size); the
    text length is the run's full one (``eval.full_text_length`` or the last phase's). ``checkpoint`` may also be an
    open_clip folder: open_clip builds the model and (for the CLIP tokenizer) tokenizes, so the numbers are
    open_clip's on the same images, decoded as its ``preprocess_cfg`` says (squashed, centre-cropped or fitted by
    the longer side and padded with its ``fill_color``; bicubic or bilinear; transparent images converted as
    open_clip converts them, not composited onto white: ``openclip.eval_resize``). The eval set is read with the
    training run's column names (``data.*_column`` in the export's config), each falling back to the canonical name
    when the eval shards lack it; ``caption_column``, ``image_column`` and ``label_column`` name those columns
    outright (``label_column``: the column dataset.json's ``classes`` are for, as ``data.label_column``
    names it in training: CLIP_benchmark's webdataset sets keep it in ``cls``).
    """
    from reclip_ray import storage
    from reclip_ray.data.schema import read_dataset_json
    from reclip_ray.data.shards import list_parquet_files, split_pattern

    if not storage.exists(checkpoint):
        raise ReclipError(f"checkpoint not found: {checkpoint}")
    if not storage.exists(split_pattern(data)[0]):  # a pattern (hub/data/test-*.parquet): its folder
        raise ReclipError(f"eval data not found: {data}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, cfg = _load(checkpoint, device, image_size)
    size = image_size or full_image_size(cfg)
    text_length = full_text_length(cfg)
    patch = cfg.model.vision.patch_size
    if size % patch:
        raise ReclipError(f"--image-size {size} is not a multiple of the model's patch size {patch}")
    classes = read_classes(classes_path, read_dataset_json(data)) if classes_path else None
    columns = _columns(data, cfg, caption=caption_column, image=image_column, label=label_column)
    files = list_parquet_files(data)
    check_label_values(files, find_label_sets(data, files, columns, classes), columns)  # before any encoding
    metrics = evaluate_dataset(
        model, tokenizer, data, image_size=size, text_length=text_length,
        batch_size=batch_size, columns=columns, device=device, classes=classes,
        resize=getattr(model, "eval_resize", None),  # an open_clip folder's resize mode and interpolation
    )
    return {"checkpoint": str(checkpoint), "data": str(data), "image_size": size,
            "text_length": text_length, "metrics": metrics}


def _columns(data: str, cfg: Any, **named: str | None) -> Any:
    """The eval set's columns (``eval_set.eval_columns``), with the ones ``named`` (``caption=``, ``image=``,
    ``label=``) when given: a set whose captions are in neither the run's caption column nor ``caption`` would
    otherwise be scored as captionless, with no retrieval, one whose images are in neither could not be read, and
    one whose labels are in neither would fail (its dataset.json classes name a column it lacks). A named column
    the shards lack is an error naming the flag, not a silent zero-shot-only evaluation."""
    import dataclasses

    from reclip_ray.data.schema import ColumnMap, parquet_schema
    from reclip_ray.data.shards import list_parquet_files

    columns = eval_columns(data, ColumnMap.from_config(cfg.data))
    named = {role: column for role, column in named.items() if column}
    if not named:
        return columns
    file = list_parquet_files(data)[0]
    names = parquet_schema(file).names
    for role, column in named.items():
        if column not in names:
            raise ReclipError(f"--{role}-column {column!r}: no such column in {file}; columns are {sorted(names)}")
    return dataclasses.replace(columns, **named)


def _load(checkpoint: str, device: str, image_size: int) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, Config) of a reclip-ray export or an open_clip folder (open_clip builds the model);
    both loaders download a URI to a temp folder first."""
    from reclip_ray.export import load_export
    from reclip_ray.openclip import is_open_clip_dir, load_open_clip_export

    if is_open_clip_dir(checkpoint):  # e.g. `reclip-ray export --format open_clip`
        return load_open_clip_export(checkpoint, device, image_size=image_size)
    return load_export(checkpoint, device)
