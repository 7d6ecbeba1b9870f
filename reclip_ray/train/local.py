"""Single-process RECLIP training, nanoGPT style: ``train_local`` reads top to bottom (phases, epochs, steps).

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
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    tok = _tokenizer_for(cfg, tokenizer)
    model = _build_model(cfg, tok, device, log)
    run = _LocalRun(cfg, model, tok, data_root or cfg.data.train, device, max_steps, log)
    for plan in run.schedule.phases:
        model.set_patch_dropout(cfg.phases[plan.index].patch_dropout)
        if log:
            log(f"phase {plan.index} '{plan.name}': {plan.image_size}px, {plan.text_length} tokens, "
                f"{plan.samples} samples, batch {plan.batch_size}")
        epoch = 0
        while run.samples < plan.end_sample:
            run.train_epoch(plan, epoch)
            if run.stopped():
                return model.eval(), run.history
            epoch += 1
    return model.eval(), run.history


def _build_model(cfg: Config, tok: Any, device: torch.device, log: Callable[[str], None] | None) -> torch.nn.Module:
    from reclip_ray.model import build_model
    from reclip_ray.train.step import compile_model

    model = build_model(cfg.model, tokenizer=tok).to(device)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing or cfg.model.grad_checkpointing)
    if cfg.model.init_from:
        from reclip_ray.init_weights import check_init_from, init_from

        line = init_from(model, check_init_from(cfg.model.init_from))
        if log:
            log(line)
    if cfg.train.compile:
        compile_model(model)
    return model


class _LocalRun:
    """The loop's state: optimizer, schedule, position and history; its methods are the epoch and the step."""

    def __init__(self, cfg: Config, model: torch.nn.Module, tok: Any, train_path: str, device: torch.device,
                 max_steps: int | None, log: Callable[[str], None] | None) -> None:
        from reclip_ray.data.local import BadRowCount
        from reclip_ray.data.schema import ColumnMap
        from reclip_ray.schedule import Schedule, build_optimizer
        from reclip_ray.train.step import autocast_dtype_for

        self.cfg, self.model, self.tok, self.train_path = cfg, model, tok, train_path
        self.max_steps, self.log = max_steps, log
        self.columns = ColumnMap.from_config(cfg.data)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.schedule = Schedule.from_config(cfg)
        self.autocast = autocast_dtype_for(cfg.train.precision, device)
        self.bad = BadRowCount()
        self.history: list[dict[str, float]] = []
        self.samples, self.step = 0, 0
        self.t0 = time.perf_counter()

    def stopped(self) -> bool:
        """``max_steps`` reached."""
        return self.max_steps is not None and self.step >= self.max_steps

    def train_epoch(self, plan: Any, epoch: int) -> None:
        """One pass over the shards at the phase's size, until the phase's end (or ``max_steps``)."""
        from reclip_ray.data.local import iter_local_batches

        cfg = self.cfg
        batches = iter_local_batches(
            self.train_path, image_size=plan.image_size, text_length=plan.text_length, tokenizer=self.tok,
            batch_size=plan.batch_size, columns=self.columns, train=True,
            seed=cfg.train.seed + 1000 * plan.index + epoch, bad_rows=self.bad,
        )
        got_any = False
        for batch in batches:
            n = plan.batch_at(self.samples)
            if n > len(batch["tokens"]):  # a remainder too small for its own step joined this one (batch_at)
                more = next(batches, None)
                if more is not None:
                    batch = {k: np.concatenate([batch[k], more[k]]) for k in ("image", "tokens")}
            if len(batch["tokens"]) < n:
                continue  # drop the short end of an epoch (as the Ray loop does): steps == schedule.total_steps
            got_any = True
            self.train_batch(plan, batch, n)
            if self.samples >= plan.end_sample or self.stopped():
                break
        self.bad.check(cfg.data.max_bad_fraction)
        if not got_any:
            raise DataError(f"{self.train_path}: fewer usable rows than one batch of {plan.batch_size}")

    def train_batch(self, plan: Any, batch: dict[str, np.ndarray], n: int) -> None:
        """One step on the batch's first ``n`` rows, recorded in the history (and logged every few steps)."""
        from reclip_ray.config import phase_micro_batch
        from reclip_ray.train.step import read_step, train_step

        lr = self.schedule.lr_at(self.samples)
        out = read_step(train_step(
            self.model, self.optimizer,
            torch.from_numpy(batch["image"][:n]), torch.from_numpy(batch["tokens"][:n]),
            lr=lr, grad_clip=self.cfg.optim.grad_clip, autocast_dtype=self.autocast,
            micro_batch=phase_micro_batch(self.cfg, plan.index),  # one process: local_loss has nothing to split
        ))  # read every step: the history keeps each step's loss
        self.samples += n
        self.step += 1
        elapsed = time.perf_counter() - self.t0
        self.history.append({"step": self.step, "samples": self.samples, "phase": plan.index,
                             "image_size": plan.image_size, "time": elapsed, **out})
        if self.log and (self.step % self.cfg.train.log_every_steps == 0 or self.samples >= plan.end_sample):
            self.log(f"step {self.step}/{self.schedule.total_steps} {plan.name} samples {self.samples} "
                     f"loss {out['loss']:.4f} lr {lr:.2e} scale {out['logit_scale']:.1f} "
                     f"{self.samples / (time.perf_counter() - self.t0):.0f} samples/s")
