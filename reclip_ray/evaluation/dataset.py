"""``evaluate_dataset``: one eval set scored by one model, on one rank or sharded over a training run's ranks.

The steps, in order: find the label sets; read, decode and encode the rows grouped by image (``grouping.py``),
all of them on one rank or one contiguous slice per rank, gathered; check that there is something to score; build
one zero-shot classifier per label set; compute the metrics (``metrics.py``), once.

Cost at scale (64 ranks, a 50k-image eval set): each rank decodes and encodes 1/64 of the rows and of the class
prompts; the gather moves 50k x D floats (100 MB at D=512) plus one small record per row to every rank, and the
metrics run on rank 0 only, in ``chunk x N`` memory.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from reclip_ray.errors import ReclipError
from reclip_ray.evaluation.eval_set import (DEFAULT_TEMPLATES, find_label_sets, outside_classes,
                                             warn_duplicate_classes)
from reclip_ray.evaluation.gather import agree, block, from_rank0, one_step, run_steps
from reclip_ray.evaluation.grouping import Gathered, Grouped, Slice, gather_slices
from reclip_ray.evaluation.metrics import retrieval_metrics, towers_autocast, zero_shot_classifier, zero_shot_metrics

if TYPE_CHECKING:
    from reclip_ray.data.images import EvalResize


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
    autocast_dtype: torch.dtype | None = None,
    resize: EvalResize | None = None,
) -> dict[str, float]:
    """Flat metrics dict: ``rows`` (usable rows), ``images`` (unique images), ``captions``, ``absent_rows``,
    ``bad_rows``, ``<label set>/top1|top5|mean_per_class_recall|chance_top1`` for every label set, and, when the
    set has captions, ``image_to_text_r@k`` / ``text_to_image_r@k`` over unique images (see ``grouping.py``).

    ``classes`` ({"classes": [...], "templates": [...]}) replaces dataset.json's label sets with one set on the
    label column (the CLI's ``--classes``). A set that names a class twice is a warning on rank 0, once per eval set
    (``eval_set.warn_duplicate_classes``): this is where ``reclip-ray eval`` and a run's evaluations meet.

    ``world_size`` > 1: every rank of the initialised default ``torch.distributed`` group calls this with the same
    arguments (and its own ``rank``), so that no GPU idles while one rank evaluates. Each rank decodes and encodes
    one contiguous slice of the rows (and of the class-prompt batches); the features and per-row records are
    gathered, put back in row order and grouped exactly as one rank would (``grouping.assemble``); the metrics are
    computed once, on rank 0, and broadcast: every rank returns the dict single-rank evaluation returns. An error on
    any rank is raised on every rank, so the ranks' collectives stay paired.

    ``autocast_dtype``: the towers run under that autocast (``metrics.towers_autocast``; a training run's
    evaluations pass ``train.precision``'s), else in fp32.

    ``resize`` (``images.EvalResize``): how each image is made square; None: the shorter side resized and
    centre-cropped, bicubic (reclip-ray's models; an open_clip folder's ``preprocess_cfg`` may say otherwise).
    """
    from reclip_ray.data.images import EVAL_RESIZE
    from reclip_ray.data.schema import ColumnMap

    columns = columns or ColumnMap()
    core = getattr(model, "module", model)
    find = functools.partial(_find_label_sets, data_path, columns, classes)
    files, sets = find() if world_size == 1 else agree(one_step(find), world_size, device)
    if rank == 0:
        warn_duplicate_classes(str(data_path), sets)
    label_cols = sorted({spec["column"] for spec in sets.values()})
    read = functools.partial(_encode_rows, core, device, path=str(data_path), image_size=image_size,
                             text_length=text_length, tokenizer=tokenizer, batch_size=batch_size, columns=columns,
                             extra_columns=label_cols, autocast_dtype=autocast_dtype, resize=resize or EVAL_RESIZE)
    if world_size == 1:
        got = _read_all(read, label_cols)
    else:
        got = _read_sharded(read, files, label_cols, rank, world_size, device)
    _check_gathered(data_path, sets, got)
    classifiers = {name: zero_shot_classifier(core, tokenizer, spec["classes"], spec.get("templates") or
                                              DEFAULT_TEMPLATES, text_length=text_length, device=device,
                                              batch_size=batch_size, rank=rank, world_size=world_size,
                                              autocast_dtype=autocast_dtype).cpu()
                   for name, spec in sets.items()}
    if world_size == 1:
        return _scores(sets, got, classifiers)
    return from_rank0(lambda: _scores(sets, got, classifiers), rank, world_size)


def _find_label_sets(data_path: str, columns: Any, classes: dict | None) -> tuple[list[str], dict[str, dict]]:
    """(the eval set's Parquet files, its label sets: ``eval_set.find_label_sets``)."""
    from reclip_ray.data.shards import list_parquet_files

    files = list_parquet_files(str(data_path))
    return files, find_label_sets(str(data_path), files, columns, classes)


def _encode_rows(core: torch.nn.Module, device: str | torch.device, collector: Grouped | Slice,
                 row_range: tuple[int, int] | None, autocast_dtype: torch.dtype | None = None,
                 **read: Any) -> Iterator[None]:
    """Decode and encode the rows (all, or ``row_range``) into ``collector``, one batch per step (see
    ``gather.agree``), and return the bad-row counts; the model is in eval mode meanwhile. ``read``: the
    arguments of ``iter_local_batches`` that say which rows and how to decode them."""
    from reclip_ray.data.local import BadRowCount, iter_local_batches
    from reclip_ray.pixels import normalize_images

    def encode_image(images: np.ndarray) -> torch.Tensor:
        with towers_autocast(device, autocast_dtype):
            return core.encode_image(normalize_images(torch.from_numpy(images).to(device))).float().cpu()

    def encode_text(tokens: np.ndarray) -> torch.Tensor:
        with towers_autocast(device, autocast_dtype):
            return core.encode_text(torch.from_numpy(tokens).to(device)).float().cpu()

    counts = BadRowCount()
    was_training = core.training
    core.eval()
    try:
        for batch in iter_local_batches(**read, train=False, bad_rows=counts, require_caption=False,
                                        group_images=True, row_range=row_range):
            collector.add(batch, encode_image, encode_text)
            yield
    finally:
        if was_training:
            core.train()
    return counts


Read = Callable[[Grouped | Slice, tuple[int, int] | None], Iterator[None]]  # _encode_rows with its arguments


def _read_all(read: Read, label_cols: Sequence[str]) -> Gathered:
    """Every row read by this one rank, grouped as it goes."""
    grouped = Grouped(label_cols)
    counts = run_steps(read(grouped, None))
    return grouped.gathered(counts)


def _read_sharded(read: Read, files: Sequence[str], label_cols: Sequence[str], rank: int, world_size: int,
                  device: str | torch.device) -> Gathered:
    """This rank's contiguous slice of the rows read in lockstep with the other ranks, then every slice gathered.
    The row count comes from the Parquet footers (cached: read once per process)."""
    from reclip_ray.data.shards import footers

    def read_slice() -> Iterator[None]:
        part = Slice(label_cols)
        counts = yield from read(part, block(sum(f.rows for f in footers(files)), rank, world_size))
        return part, counts

    part, counts = agree(read_slice(), world_size, device)
    return gather_slices(part, counts, label_cols, world_size, device)


def _check_gathered(data_path: str, sets: dict[str, dict], got: Gathered) -> None:
    """The user-facing errors that need every row: nothing readable, nothing to score, a label outside its set."""
    if got.image_features is None:
        raise ReclipError(f"{data_path}: no readable rows to evaluate ({got.absent} rows without an image, "
                          f"{got.bad} bad rows)")
    if not sets and got.text_features is None:
        raise ReclipError(f"{data_path}: nothing to evaluate: no captions and no label set (dataset.json "
                          "'classes'/'label_sets', --classes, or ClassLabel columns of Hugging Face datasets)")
    for name, spec in sets.items():
        y = torch.tensor(got.labels[spec["column"]], dtype=torch.long)
        bad = y[(y < 0) | (y >= len(spec["classes"]))]
        if bad.numel():
            raise ReclipError(outside_classes(str(data_path), int(bad[0]), spec["column"], name, spec))


def _scores(sets: dict[str, dict], got: Gathered, classifiers: dict[str, torch.Tensor]) -> dict[str, float]:
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
