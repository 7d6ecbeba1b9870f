"""One optimisation step, shared by the Ray worker loop and the single-process loop.

The caller owns the schedule: it passes ``lr = schedule.lr_at(samples_seen)``, so the LR is a function of samples
seen and never of the worker count. The model may be DDP-wrapped; gradients are then averaged over ranks by DDP,
which is exactly the convention ``reclip_ray.loss.contrastive_loss`` is written for (see its docstring).

Gradient accumulation (``micro_batch``) keeps a worker's memory fixed whatever its share of the global batch, and
it is exact for the contrastive loss, whose every row needs the features of the *whole* global batch. It is the
feature-cache method (GradCache, Gao et al. 2021; open_clip's ``accum_freq`` is a variant of it):

1. encode every micro-batch of this rank without autograd (same autocast as the plain path) and keep only the
   L2-normalised features - ``2 x local_batch x embed_dim`` floats, no activations;
2. compute ``contrastive_loss`` once on those cached features, as leaves that require grad (all ranks' features
   are gathered there, exactly as in the plain path, with the same ``local_loss`` / ``gather_with_grad`` modes and
   DDP convention), and backpropagate to the leaves: that gives ``dL/d(features)`` of every local row - image rows
   and text rows, so both directions of the symmetric loss and the column terms from every other row and rank are
   in it - and ``dL/d(logit_scale)``;
3. re-encode each micro-batch with autograd and backpropagate ``<features, cached gradient>``; by the chain rule the
   parameter gradients summed over micro-batches are the gradients of the plain path. ``logit_scale`` enters once,
   through the last micro-batch's surrogate, so its gradient is counted exactly once.

Unlike open_clip (which recomputes the whole loss for every micro-batch) the logits are built once per step. Under
DDP step 3's micro-batches before the last run through DDP in ``no_sync()``, and the last one's backward all-reduces
the accumulated gradients: averaged over ranks exactly once. Through DDP, not on the unwrapped module: with
``train.compile`` the training graph is compiled at its first call, and only a graph first compiled inside DDP's
forward is split at its gradient buckets (dynamo's DDPOptimizer), which lets each bucket's all-reduce start while
the rest of the backward runs; compiled outside it, the graph would be reused unsplit by the last micro-batch, and
every all-reduce would wait for the whole backward. DDP's forward makes no collective here (it broadcasts buffers,
and the CLIP has none: tests/test_accumulation.py), so ranks may run different numbers of micro-batches. Step 1
needs no DDP: it encodes without autograd. Step 3 assumes the re-encoded features equal the cached ones: the only
randomness of the CLIP here is patch dropout, so each micro-batch's RNG state is saved before step 1 encodes it and
restored before step 3 re-encodes it (the same patches are dropped in both passes; no dropout, drop-path or batch
norm otherwise).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from reclip_ray.loss import contrastive_loss
from reclip_ray.pixels import normalize_images


def autocast_dtype_for(precision: str, device: torch.device | str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``bf16`` forces bf16 autocast (also on CPU); ``fp32``: none."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def micro_batch_slices(n: int, micro_batch: int) -> list[slice]:
    """Consecutive row ranges of at most ``micro_batch`` rows covering ``n`` rows (one range when ``micro_batch``
    is 0 or at least ``n``)."""
    if micro_batch <= 0 or micro_batch >= n:
        return [slice(0, n)]
    return [slice(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``train.compile``: ``torch.compile`` the model's forward in place and return it.

    In place (``nn.Module.compile``) so parameter names, ``state_dict`` keys, checkpoints, DDP wrapping and export
    are unchanged. ``dynamic=None`` is torch's automatic dynamic shapes, measured here (tests/test_accumulation.py,
    slow): each resolution compiles once and keeps its graph (the image size stays static: timm's position-embedding
    resample specialises on the patch grid), so a phase that returns to a size reuses it; the batch size and the
    text length recompile once at their first change (a phase's short last step) and are symbolic after that. The
    no-grad encode of gradient accumulation is another graph (grad mode is part of the guard). The cache limit is
    raised so a many-phase run never falls back to eager silently.

    ``backend`` is inductor in the trainer. The test of the recompile policy above passes ``aot_eager``: dynamo
    decides the recompiles, and ``aot_eager`` traces the same graphs without generating code (on 2 CPU cores with a
    cold cache, which CI always has, the test took 71 s this way and 165 s all on inductor; both gave the same
    recompiles on torch 2.14).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    model.compile(dynamic=None, backend=backend)
    return model


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
    micro_batch: int = 0,
) -> dict[str, torch.Tensor | float]:
    """uint8 NHWC images + int64 tokens (this rank's share of the global batch) -> one AdamW step.

    ``micro_batch`` > 0 and smaller than the largest local batch (``local_batch_sizes``, else this rank's): exact
    gradient accumulation over micro-batches of at most that many rows (module docstring); 0 or at least every
    rank's batch: the plain single-pass step, bit for bit.

    Returns detached 0-d tensors on the model's device: ``loss`` (the global-batch loss on every rank: with
    ``local_loss`` each rank's share is averaged over ranks, one scalar all-reduce, so the logged loss means the
    same with or without it), ``logit_scale`` (exp'd, as used in the logits), ``grad_norm`` (before clipping);
    with the sigmoid loss also ``logit_bias``; and ``lr``, the float passed in. The loss is the model's: one with a
    ``logit_bias`` (``train.loss: siglip``) trains the sigmoid loss, whose value is always each rank's share (as
    with ``local_loss``).

    Tensors, not floats: reading a GPU value on the host waits for every kernel queued before it, so a float per
    step would stop the host from preparing the next batch and queueing its kernels while the GPU runs this step.
    The caller reads them (``read_step``) only where it needs the numbers: a log window, a checkpoint.
    """
    core = getattr(model, "module", model)
    bias = getattr(core, "logit_bias", None)  # the sigmoid loss's (train.loss: siglip); None with the CLIP loss
    device = next(core.parameters()).device
    images = images.to(device, non_blocking=True)
    tokens = tokens.to(device, non_blocking=True)
    for group in optimizer.param_groups:
        group["lr"] = lr

    model.train()
    amp = _autocast(device, autocast_dtype)
    # The one place the loss is chosen: both paths below call it on fp32 features, with the same cross-rank mode.
    loss_fn = functools.partial(contrastive_loss, local_loss=local_loss, gather_with_grad=gather_with_grad,
                                local_batch_sizes=local_batch_sizes)
    # Every rank takes the same path (the two issue their collectives in a different order), decided by the largest
    # local batch when the sizes are known: a rank at or under micro_batch then accumulates over one micro-batch.
    longest = max(local_batch_sizes) if local_batch_sizes else images.shape[0]
    if not 0 < micro_batch < longest:
        loss, logit_scale = _backward(model, optimizer, images, tokens, bias, amp, loss_fn)
    else:
        optimizer.zero_grad(set_to_none=True)
        slices = micro_batch_slices(images.shape[0], micro_batch)
        loss, logit_scale = _accumulate(model, core, images, tokens, bias, slices, amp, loss_fn)
    grad_norm = _clip_gradients(core, grad_clip)
    optimizer.step()
    if hasattr(core, "clamp_logit_scale_"):
        core.clamp_logit_scale_()
    return {
        "loss": _global_loss(loss, local_loss or bias is not None),
        "logit_scale": logit_scale.detach().float(),
        "grad_norm": grad_norm.detach(),
        "lr": float(lr),
        **({} if bias is None else {"logit_bias": bias.detach().float()}),
    }


def read_step(out: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """``train_step``'s output as floats, read from the device in one transfer (one wait for the step's kernels)."""
    tensors = {k: v.reshape(()).float() for k, v in out.items() if isinstance(v, torch.Tensor)}
    values = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
    return {k: values[k] if k in values else float(v) for k, v in out.items()}


def set_grad_reduce(model: nn.Module, dtype: str) -> nn.Module:
    """``train.grad_reduce``: with ``bf16``, a DDP-wrapped model all-reduces its gradients in bf16 (PyTorch's
    ``bf16_compress_hook``: each bucket cast to bf16, divided by the world size, summed, cast back), half the bytes
    of fp32 per step; other models (one worker) are unchanged. Returns ``model``.

    Why it is there: DDP all-reduces every parameter's gradient each step, 4 bytes each (0.6 GB for vit-b-16), and a
    64 px phase's steps are short (16 ms for 512 rows per H100 at the plan's MFU), so on a cluster whose all-reduce
    bandwidth is below what ``reclip-ray plan`` prints for a phase, the step waits for it. Why it is off: the
    sum runs in bf16 (8 bits of mantissa), so it rounds the gradients (tests/test_accumulation.py measures by how
    much); the optimizer and its state stay fp32. The micro-batches of gradient accumulation before the last run
    outside DDP (``_accumulate``), so the hook runs once per step either way."""
    from torch.nn.parallel import DistributedDataParallel

    if dtype == "bf16" and isinstance(model, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        model.register_comm_hook(state=None, hook=bf16_compress_hook)
    return model


def pinned_for(device: torch.device | str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host tensors bound for ``device`` in page-locked memory when it is a GPU (each unchanged otherwise).

    ``train_step`` copies its batch with ``non_blocking=True``. From pageable memory CUDA stages the copy through
    its own buffer, and a copy larger than that (a 224 px batch of 512 rows is 77 MB) waits on the host until the
    GPU has run every kernel queued before it: the host could not queue the next step while the GPU runs this one,
    which undoes ``train_step``'s reading nothing back. From pinned memory the copy is queued and the call returns.
    ``pin_memory`` copies into PyTorch's cached pinned blocks (the host's copy, while the GPU runs the step before;
    in the worker's data-wait time) and keeps each block until the copy from it is done."""
    if torch.device(device).type != "cuda":
        return tensors
    return tuple(t if t.is_cuda else t.pin_memory() for t in tensors)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the towers' autocast context (a no-op context without a dtype)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _backward(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, tokens: torch.Tensor,
              bias: torch.Tensor | None, amp, loss_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain single-pass step's forward and backward (``bias``: the sigmoid loss's ``logit_bias``, else None);
    returns (loss, logit_scale)."""
    x = normalize_images(images)
    with amp():
        image_features, text_features, logit_scale = model(x, tokens)
    # The loss (logsumexp over the whole global batch) runs in fp32 whatever the towers ran in.
    loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float(),
                   logit_bias=None if bias is None else bias.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss, logit_scale


def _clip_gradients(core: nn.Module, grad_clip: float) -> torch.Tensor:
    """The gradients' global norm before clipping (clipped to ``grad_clip`` when it is > 0)."""
    params = [p for p in core.parameters() if p.grad is not None]
    if grad_clip and grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))


def _global_loss(loss: torch.Tensor, local_loss: bool) -> torch.Tensor:
    """The global-batch loss: as is in full-gather mode; the mean of the ranks' shares with ``local_loss`` (an
    all-reduce the device queues like any other kernel: no host wait)."""
    if not local_loss or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss.detach()
    value = loss.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _accumulate(
    model: nn.Module,
    core: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None,
    slices: list[slice],
    amp,
    loss_fn: Callable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the module docstring; leaves the summed gradients in ``.grad``, returns (loss, logit_scale)."""
    # 1. Cache the features of every micro-batch (images normalised per micro-batch: memory stays flat).
    image_parts, text_parts, rng = [], [], []
    with torch.no_grad():
        for sl in slices:
            rng.append(_rng_state(images.device))  # replayed in step 3: patch dropout drops the same patches
            with amp():
                img, txt, scale = core(normalize_images(images[sl]), tokens[sl])
            image_parts.append(img.float())
            text_parts.append(txt.float())
    image_cache = torch.cat(image_parts).requires_grad_()
    text_cache = torch.cat(text_parts).requires_grad_()
    scale_leaf = scale.float().detach().requires_grad_()
    bias_leaf = None if bias is None else bias.float().detach().requires_grad_()  # a leaf like logit_scale
    del image_parts, text_parts

    # 2. The loss once, on the cached features of all ranks; its backward gives the features' gradients.
    loss = loss_fn(image_cache, text_cache, scale_leaf, logit_bias=bias_leaf)
    loss.backward()
    image_grad, text_grad, scale_grad = image_cache.grad, text_cache.grad, scale_leaf.grad

    # 3. Re-encode with autograd, every micro-batch through DDP; only the last one's backward all-reduces (the others
    # run in no_sync), and it carries logit_scale.
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for k, sl in enumerate(slices):
        last = k == len(slices) - 1
        _set_rng_state(images.device, rng[k])
        with contextlib.nullcontext() if last else no_sync():
            with amp():
                img, txt, scale = model(normalize_images(images[sl]), tokens[sl])
            surrogate = (img.float() * image_grad[sl]).sum() + (txt.float() * text_grad[sl]).sum()
            if last:
                surrogate = surrogate + scale.float() * scale_grad
                if bias is not None:
                    surrogate = surrogate + bias.float() * bias_leaf.grad
            surrogate.backward()
    return loss, scale_leaf


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator ``device``'s random ops draw from (CUDA: its seed and offset, kept on the host)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
