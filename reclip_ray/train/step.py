"""One optimisation step, shared by the Ray worker loop and the single-process loop.

The caller owns the schedule: it passes ``lr = schedule.lr_at(samples_seen)``, so the LR is a function of samples
seen and never of the worker count. The model may be DDP-wrapped; gradients are then averaged over ranks by DDP,
which is exactly the convention ``reclip_ray.loss.contrastive_loss`` is written for (see its docstring).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from reclip_ray.loss import contrastive_loss
from reclip_ray.model import normalize_images


def autocast_dtype_for(precision: str, device: torch.device | str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``bf16`` forces bf16 autocast (also on CPU); ``fp32``: none."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    lr: float,
    grad_clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    local_batch_sizes: Sequence[int] | None = None,
) -> dict[str, float]:
    """uint8 NHWC images + int64 tokens (this rank's share of the global batch) -> one AdamW step.

    Returns floats: ``loss`` (this rank's contrastive loss; the global-batch loss in full-gather mode),
    ``logit_scale`` (exp'd, as used in the logits), ``grad_norm`` (before clipping) and ``lr``.
    """
    core = getattr(model, "module", model)
    device = next(core.parameters()).device
    images = images.to(device, non_blocking=True)
    tokens = tokens.to(device, non_blocking=True)
    for group in optimizer.param_groups:
        group["lr"] = lr

    model.train()
    x = normalize_images(images)
    amp = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with amp:
        image_features, text_features, logit_scale = model(x, tokens)
    # The loss (logsumexp over the whole global batch) runs in fp32 whatever the towers ran in.
    loss = contrastive_loss(
        image_features.float(),
        text_features.float(),
        logit_scale.float(),
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        local_batch_sizes=local_batch_sizes,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in core.parameters() if p.grad is not None]
    if grad_clip and grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    optimizer.step()
    if hasattr(core, "clamp_logit_scale_"):
        core.clamp_logit_scale_()
    return {
        "loss": float(loss.detach()),
        "logit_scale": float(logit_scale.detach()),
        "grad_norm": float(grad_norm),
        "lr": float(lr),
    }
