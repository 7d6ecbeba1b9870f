"""Everything the driver checks and makes before Ray starts: paths, the synthetic data if asked, the shards' schema,
the eval set, the tokenizer and the MLflow store.

Everything that can fail because of a user mistake (config, paths, schema) is checked here *before* Ray starts, so
the user sees one line instead of a worker traceback three minutes later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from reclip_ray import storage
from reclip_ray.config import Config, absolute
from reclip_ray.errors import DataError, ReclipError
from reclip_ray.job_dir import output_base, output_note
from reclip_ray.train.handover import latest_checkpoint_state


@dataclass
class Prepared:
    """The checked job: its config (paths made absolute, tokenizer and MLflow store resolved) and where it lives."""

    cfg: Config
    run_name: str
    run_dir: str
    tokenizer_path: str
    tracking_uri: str
    experiment: str
    eval_set: dict | None = None  # check_eval_set's summary of data.eval (its label sets, whether it has captions)


def prepare(cfg: Config) -> Prepared:
    """Resolve paths, make the synthetic data if asked, check shards and schema, get a tokenizer. No Ray yet."""
    from reclip_ray import tracking
    from reclip_ray.data.schema import ColumnMap, check_schema
    from reclip_ray.data.shards import list_parquet_files, split_pattern

    data = cfg.data
    data.train = absolute(data.train)
    data.eval = absolute(data.eval) if data.eval else ""
    # not a ray job's temporary copy; one spelling for this module and Ray's URI parser (storage.normalize)
    cfg.run.storage_path = storage.normalize(absolute(cfg.run.storage_path, output_base()))
    if storage.split_query(cfg.run.storage_path)[1]:  # its store's options: one line here if refused, not in Ray
        storage.filesystem(cfg.run.storage_path)
    note = output_note()
    if note:
        print(f"[reclip] {note}", flush=True)
    run_name = cfg.run.name or cfg.name
    cfg.run.name = run_name
    run_dir = storage.join(cfg.run.storage_path, run_name)  # a local folder or a URI
    if cfg.model.init_from and not latest_checkpoint_state(run_dir)[0]:
        from reclip_ray.init_weights import check_init_from  # a resumed run ignores it: the checkpoint wins

        cfg.model.init_from = check_init_from(cfg.model.init_from)

    if not storage.is_uri(data.train) and not os.path.exists(split_pattern(data.train)[0]):
        if not data.synth_if_missing:
            raise DataError(f"data.train not found: {data.train}")
        _make_synthetic(cfg)

    columns = ColumnMap.from_config(data)
    check_schema(list_parquet_files(data.train), columns)
    summary = None
    if data.eval:
        if not storage.is_uri(data.eval) and not os.path.exists(split_pattern(data.eval)[0]):
            raise DataError(f"data.eval not found: {data.eval} (set data.eval='' to train without evaluation)")
        from reclip_ray.evaluation.eval_set import check_eval_set, eval_columns

        sizes = [p.image_size for p in cfg.phases] + ([cfg.eval.full_image_size] if cfg.eval.full_image_size else [])
        summary = check_eval_set(data.eval, eval_columns(data.eval, columns), sizes, cfg.model.vision.patch_size)
        sets = ", ".join(f"{name} ({n} classes)" for name, n in summary["label_sets"].items()) or "none"
        print(f"[reclip] eval set: {summary['rows']} rows; zero-shot label sets: {sets}; "
              f"retrieval: {'yes' if summary['has_captions'] else 'no captions'}", flush=True)

    tokenizer_path = ensure_tokenizer(cfg, run_dir)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    cfg.tracking.uri = tracking_uri
    return Prepared(cfg, run_name, run_dir, tokenizer_path, tracking_uri, cfg.tracking.experiment or cfg.name,
                    summary)


def _make_synthetic(cfg: Config) -> None:
    from reclip_ray.data.copies import shrink_dataset, sizes_for_phases
    from reclip_ray.data.synth import IMAGE_SIZE as SYNTH_IMAGE_SIZE, make_synthetic

    train, evald = cfg.data.train, cfg.data.eval or None
    root = storage.parent(train)
    eval_beside = storage.normalize(storage.join(root, "eval"))
    if storage.name(train) != "train" or (evald is not None and storage.normalize(evald) != eval_beside):
        raise DataError(
            f"data.synth_if_missing needs data.train=DIR/train and data.eval=DIR/eval, got {train} and {evald}"
        )
    print(f"[reclip] making the synthetic captioned-shapes dataset under {root} ...", flush=True)
    make_synthetic(root, train=cfg.data.synth_train, eval=cfg.data.synth_eval, seed=cfg.train.seed)
    # Shrunk copies for the config's phases (e.g. 40 px for 32, 72 px for 64), as `data synth --shrink` makes.
    sizes = sizes_for_phases([p.image_size for p in cfg.phases], source_side=SYNTH_IMAGE_SIZE)
    if sizes and cfg.data.use_copies:
        shrink_dataset(train, sizes, image_column=cfg.data.image_column, log=None)


def ensure_tokenizer(cfg: Config, run_dir: str) -> str:
    """The config's tokenizer (a file or a URI), else one trained on data.train and kept in the run folder (reused
    on resume; the run folder may be a URI too)."""
    from reclip_ray.data.clip_bpe import clip_tokenizer_file, selects_clip_bpe
    from reclip_ray.data.tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer

    if selects_clip_bpe(cfg.data.tokenizer):  # OpenAI's BPE, converted once from open_clip's vocabulary
        path = str(clip_tokenizer_file())
        load_tokenizer(path)  # fail now (e.g. no ftfy)
        return path
    if cfg.data.tokenizer:
        path = absolute(cfg.data.tokenizer)
        if storage.is_uri(path):
            try:
                CaptionTokenizer.from_json(storage.read_text(path))  # fail now on a bad file
            except FileNotFoundError:
                raise ReclipError(f"data.tokenizer not found: {path}") from None
        else:
            if not os.path.isfile(path):
                raise ReclipError(f"data.tokenizer not found: {path}")
            load_tokenizer(path)  # fail now on a bad file
        cfg.data.tokenizer = path
        return path
    path = storage.join(run_dir, "tokenizer.json")
    if not storage.is_file(path):
        bound = cfg.data.tokenizer_sample_captions
        sample = f"the first {bound:,} captions of" if bound else "every caption of"
        print(f"[reclip] training a {cfg.data.vocab_size}-token BPE tokenizer on {sample} {cfg.data.train} "
              "(data.tokenizer_sample_captions) ...", flush=True)
        tokenizer = train_tokenizer(cfg.data.train, vocab_size=cfg.data.vocab_size,
                                    caption_column=cfg.data.caption_column, max_captions=bound)
        storage.write_text(path, tokenizer.to_json())
    cfg.data.tokenizer = path
    return path
