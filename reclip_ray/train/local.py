"""Single-process RECLIP training, nanoGPT style: one function that reads top to bottom.

Same model, schedule, step and data decoding as the Ray job, minus Ray: used by tests, benchmarks and for
debugging a config on a laptop. Phases run in order, each reading the training shards at its own image size and
text length; the LR comes from ``Schedule.lr_at(samples_seen)`` and the last step of a phase is cut short so each
phase sees exactly its sample budget, and the short last batch of an epoch is dropped, so the step count is
``Schedule.total_steps``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from reclip_ray.config import Config
from reclip_ray.errors import DataError


def _tokenizer_for(cfg: Config, tokenizer: Any):
    from reclip_ray.data.tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer

    if isinstance(tokenizer, CaptionTokenizer):
        return tokenizer
    if tokenizer:
        return load_tokenizer(tokenizer)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    return train_tokenizer(cfg.data.train, vocab_size=cfg.data.vocab_size, caption_column=cfg.data.caption_column,
                           max_captions=cfg.data.tokenizer_sample_captions)


def train_local(
    cfg: Config,
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    max_steps: int | None = None,
    log: Callable[[str], None] | None = print,
    data_root: str | None = None,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train ``cfg`` in this process; returns (model, per-step history).

    ``tokenizer``: a CaptionTokenizer, a tokenizer.json path, or None (``data.tokenizer``, else trained on
    ``data.train``). ``data_root`` overrides ``data.train``. ``max_steps`` stops early (tests, benchmarks).
    """
    from reclip_ray.data.local import BadRowCount, iter_local_batches
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.model import build_model
    from reclip_ray.schedule import Schedule, build_optimizer
    from reclip_ray.train.step import autocast_dtype_for, compile_model, train_step

    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    tok = _tokenizer_for(cfg, tokenizer)
    train_path = data_root or cfg.data.train
    columns = ColumnMap.from_config(cfg.data)

    model = build_model(cfg.model, tokenizer=tok).to(device)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing or cfg.model.grad_checkpointing)
    if cfg.model.init_from:
        from reclip_ray.init_weights import check_init_from, init_from

        line = init_from(model, check_init_from(cfg.model.init_from))
        if log:
            log(line)
    if cfg.train.compile:
        compile_model(model)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule.from_config(cfg)
    autocast = autocast_dtype_for(cfg.train.precision, device)
    bad = BadRowCount()

    history: list[dict[str, float]] = []
    samples, step = 0, 0
    t0 = time.perf_counter()
    for plan in schedule.phases:
        model.set_patch_dropout(cfg.phases[plan.index].patch_dropout)
        if log:
            log(f"phase {plan.index} '{plan.name}': {plan.image_size}px, {plan.text_length} tokens, "
                f"{plan.samples} samples, batch {plan.batch_size}")
        epoch = 0
        while samples < plan.end_sample:
            batches = iter_local_batches(
                train_path, image_size=plan.image_size, text_length=plan.text_length, tokenizer=tok,
                batch_size=plan.batch_size, columns=columns, train=True,
                seed=cfg.train.seed + 1000 * plan.index + epoch, bad_rows=bad,
            )
            got_any = False
            for batch in batches:
                n = plan.batch_at(samples)
                if n > len(batch["tokens"]):  # a remainder too small for its own step joined this one (batch_at)
                    more = next(batches, None)
                    if more is not None:
                        batch = {k: np.concatenate([batch[k], more[k]]) for k in ("image", "tokens")}
                if len(batch["tokens"]) < n:
                    continue  # drop the short end of an epoch (as the Ray loop does): steps == schedule.total_steps
                got_any = True
                lr = schedule.lr_at(samples)
                out = train_step(
                    model, optimizer,
                    torch.from_numpy(batch["image"][:n]), torch.from_numpy(batch["tokens"][:n]),
                    lr=lr, grad_clip=cfg.optim.grad_clip, autocast_dtype=autocast,
                    micro_batch=cfg.train.micro_batch_size,  # one process: local_loss has nothing to split
                )
                samples += n
                step += 1
                history.append({"step": step, "samples": samples, "phase": plan.index,
                                "image_size": plan.image_size, "time": time.perf_counter() - t0, **out})
                if log and (step % cfg.train.log_every_steps == 0 or samples >= plan.end_sample):
                    log(f"step {step}/{schedule.total_steps} {plan.name} samples {samples} loss {out['loss']:.4f} "
                        f"lr {lr:.2e} scale {out['logit_scale']:.1f} {samples / (time.perf_counter() - t0):.0f} samples/s")
                if samples >= plan.end_sample or (max_steps is not None and step >= max_steps):
                    break
            bad.check(cfg.data.max_bad_fraction)
            if not got_any:
                raise DataError(f"{train_path}: fewer usable rows than one batch of {plan.batch_size}")
            if max_steps is not None and step >= max_steps:
                return model.eval(), history
            epoch += 1
    return model.eval(), history
