"""The RECLIP phase plan and learning-rate schedule, both functions of *samples seen*.

Everything is keyed by samples rather than steps so that an elastic resize (different worker count, same global
batch) or a resume cannot change the optimisation: the same sample count always means the same phase and LR.

LR rules (``optim.schedule``):

* ``global``: linear warmup over ``optim.warmup_samples`` (a fraction of the run when a float <= 1; an integer
  is a count, so ``1`` is one sample and ``1.0`` the whole run), then one
  cosine from ``optim.lr`` down to ``min_lr_ratio * optim.lr`` at the end of the last phase. A phase's own
  ``lr`` / ``warmup_samples`` have no place in it, so the config refuses them (``config._check_phase_schedule``).
* ``per_phase``: every phase restarts: its own warmup (``phase.warmup_samples``; -1 means
  ``optim.warmup_samples``; a float <= 1 is a fraction of *that phase*), its own peak (``phase.lr``; 0 means
  ``optim.lr``) and a cosine to ``min_lr_ratio * peak`` at the phase end. RECLIP's short full-resolution finetune
  needs this: the low-res phase has decayed to ~0 and the finetune needs a fresh (smaller) peak.

A phase's steps are full global batches plus a short last one for the remainder; a remainder smaller than
``scaling.max_workers`` joins the last full step instead (``PhasePlan.batch_at``), so every step gives every
worker a row whatever the worker count up to that maximum.

Warmup is ``peak * min(1, (s + 1) / warmup)`` for ``s`` samples into the warmup, so the very first step does not
run at exactly zero LR; the cosine starts when the warmup ends.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reclip_ray.config import Config, OptimConfig, resolve_count

if TYPE_CHECKING:  # the plan (``reclip-ray plan``, no torch) reads the schedule; only the optimizer needs torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class PhasePlan:
    index: int
    name: str
    image_size: int
    text_length: int
    start_sample: int
    end_sample: int  # exclusive: the phase covers samples [start_sample, end_sample)
    batch_size: int  # global batch
    steps: int  # full steps plus a short last one; a remainder under min_step rows joins the step before it
    peak_lr: float
    warmup_samples: int
    min_step: int = 1  # the fewest rows a step may have: scaling.max_workers, so that every worker gets a row

    @property
    def samples(self) -> int:
        return self.end_sample - self.start_sample

    def batch_at(self, samples_seen: int) -> int:
        """Global batch of the step that starts at ``samples_seen``: full, or what is left at the phase end.

        What is left after the last full step is a short step of its own when it gives every one of up to
        ``min_step`` workers a row, else it joins the last full step (``batch_size + remainder`` rows, one step):
        DDP and the loss's all-gather need every rank in every step's collectives, and a rank with no rows would
        push empty tensors through the model. Either way the step trains exactly the samples it counts.
        """
        left = self.end_sample - samples_seen
        if left <= 0:
            return 0
        return left if left < self.batch_size + self.min_step else self.batch_size

    @property
    def last_batch(self) -> int:
        """The global batch of the phase's last step (the largest step when a remainder joined it)."""
        return self.batch_at(self.start_sample + (self.steps - 1) * self.batch_size)


def phase_steps(samples: int, batch: int, min_step: int) -> int:
    """Steps of a phase (``PhasePlan.batch_at``): the full ones, plus the remainder's unless it joins the last."""
    full, rest = divmod(samples, batch)
    return max(1, full + (1 if rest >= min_step else 0))


def _cosine(peak: float, floor: float, warmup: int, length: int, s: int) -> float:
    """Warmup then cosine over ``length`` samples; ``s`` counts samples from the start of the segment."""
    if warmup > 0 and s < warmup:
        return peak * min(1.0, (s + 1) / warmup)
    decay = max(1, length - warmup)
    progress = min(1.0, max(0.0, (s - warmup) / decay))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The phase plan plus the LR rule; ``total_samples`` is where the run ends.

    ``total_samples`` is the schedule's own end (the last phase's end sample), which is what the workers train to.
    A driver deciding whether a run finished must compare against it, not recompute it from the config.
    """

    def __init__(self, phases: list[PhasePlan], optim: OptimConfig, global_warmup: int) -> None:
        self.phases = phases
        self.optim = optim
        self.global_warmup = global_warmup
        self.total_samples: int = phases[-1].end_sample
        self.total_steps = sum(p.steps for p in phases)

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedule":
        """Plan from ``cfg.phase_samples()`` (the same counts the config validated), so both agree on the total."""
        counts = cfg.phase_samples()
        total = sum(counts)
        global_warmup = resolve_count(cfg.optim.warmup_samples, total)
        plans, start = [], 0
        for i, (ph, n) in enumerate(zip(cfg.phases, counts)):
            batch = ph.batch_size or cfg.train.batch_size
            if cfg.optim.schedule == "per_phase":
                peak = ph.lr or cfg.optim.lr
                w = ph.warmup_samples if ph.warmup_samples != -1 else cfg.optim.warmup_samples
                warmup = resolve_count(w, n)
            else:
                peak, warmup = cfg.optim.lr, global_warmup
            plans.append(
                PhasePlan(
                    index=i,
                    name=ph.name,
                    image_size=ph.image_size,
                    text_length=ph.text_length,
                    start_sample=start,
                    end_sample=start + n,
                    batch_size=batch,
                    steps=phase_steps(n, batch, cfg.scaling.max_workers),
                    peak_lr=float(peak),
                    warmup_samples=int(warmup),
                    min_step=cfg.scaling.max_workers,
                )
            )
            start += n
        return cls(plans, cfg.optim, global_warmup)

    def phase_at(self, samples: int) -> PhasePlan:
        """The phase that the step starting at ``samples`` belongs to (the last phase once the run is over)."""
        for plan in self.phases:
            if samples < plan.end_sample:
                return plan
        return self.phases[-1]

    def lr_at(self, samples: int) -> float:
        ratio = self.optim.min_lr_ratio
        if self.optim.schedule == "global":
            peak = self.optim.lr
            return _cosine(peak, ratio * peak, self.global_warmup, self.total_samples, samples)
        plan = self.phase_at(samples)
        return _cosine(plan.peak_lr, ratio * plan.peak_lr, plan.warmup_samples, plan.samples, samples - plan.start_sample)


# Parameters that should not be pulled towards zero: gains/biases, embeddings and the temperature.
_NO_DECAY = re.compile(r"(^|\.)(bias|logit_scale|pos_embed|cls_token|reg_token|positional_embedding)$|token_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or _NO_DECAY.search(name) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on norms, biases, embeddings and logit_scale (CLIP / open_clip practice)."""
    import torch

    model = getattr(model, "module", model)  # DDP-wrapped or not: the same parameter names
    return torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
    )
