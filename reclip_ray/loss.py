"""Symmetric contrastive (InfoNCE) loss with features gathered from every rank.

Gradient convention (what the trainer relies on): each rank calls ``contrastive_loss`` on its *local* normalised
features, calls ``backward()`` on the returned value, and the parameter gradients are then AVERAGED over ranks
(DDP's default all-reduce mean, or ``all_reduce(SUM) / world_size`` by hand). With that, in every mode below
except ``local_loss=True, gather_with_grad=False``, the averaged gradients equal - up to float rounding - the
gradients of single-process training on the concatenated global batch, and ``mean over ranks of the returned
loss`` equals the global-batch loss. No extra scaling is needed in the trainer. Why it works per mode:

* ``local_loss=False, gather_with_grad=True``: every rank computes the full global-batch loss ``L``. The gather's
  backward all-reduces (sums) the gradient w.r.t. the gathered features and hands each rank its own slice, so rank
  r's features receive ``N * dL/dx_r`` (every rank holds an identical copy of ``L``); DDP's mean divides the N back
  out. ``logit_scale`` gets ``dL/ds`` on every rank; the mean keeps it.
* ``local_loss=False, gather_with_grad=False`` (open_clip's cheap path): other ranks' features are constants and
  the local tensor is put back at index ``rank``. Rank r computes ``dL/dx_r`` exactly, so its local features'
  gradient is multiplied by N (a straight-through scale) to survive DDP's mean; ``logit_scale`` is unchanged.
* ``local_loss=True, gather_with_grad=True``: rank r only computes the logits of its own rows (against all
  columns) - ``N`` times less logits memory. Its loss is the mean CE over its rows, scaled by ``N * b_r / B`` so
  that the mean over ranks is the global mean (the scale is 1 when local batches are equal). Summing gathered
  gradients in the backward collects the column terms from the other ranks.
* ``local_loss=True, gather_with_grad=False``: the loss value follows the same convention, but the gradients
  through other ranks' columns are dropped: this is an approximation (as in open_clip), not gradient-exact.

Local batches may differ in size between ranks (the last batch of a split): sizes are gathered first and
features padded to the largest.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    world = dist.get_world_size()
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (first dims given by ``sizes``) without autograd."""
    longest = max(sizes)
    padded = x.detach()
    if x.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    padded = padded.contiguous()
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([t[:n] for t, n in zip(out, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.start = sum(sizes[:rank])
        ctx.n = sizes[rank]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass, gradient multiplied by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    gather_with_grad: bool = True,
    local_batch_sizes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All ranks' features concatenated in rank order, plus the per-rank sizes.

    With ``gather_with_grad=False`` the other ranks' rows are constants and this rank's rows are the local tensors
    (so gradients reach the local features through them only). ``local_batch_sizes`` (every rank's batch, when the
    caller knows them) saves the collective that otherwise exchanges them.
    """
    rank, world = _dist_info()
    if world == 1:
        return image_features, text_features, [image_features.shape[0]]
    if local_batch_sizes is not None:
        sizes = [int(n) for n in local_batch_sizes]
        if len(sizes) != world or sizes[rank] != image_features.shape[0]:
            raise ValueError(f"local_batch_sizes {sizes} do not match rank {rank}'s batch {image_features.shape[0]}")
    else:
        sizes = _gather_sizes(image_features.shape[0], image_features.device)
    if gather_with_grad:
        all_img = _AllGatherWithGrad.apply(image_features, sizes, rank)
        all_txt = _AllGatherWithGrad.apply(text_features, sizes, rank)
        return all_img, all_txt, sizes
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])

    def put_back(local: torch.Tensor) -> torch.Tensor:
        gathered = _gather_padded(local, sizes)
        return torch.cat([gathered[:start], local, gathered[end:]])

    return put_back(image_features), put_back(text_features), sizes


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    local_batch_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised local features; see the module docstring for the DDP convention."""
    rank, world = _dist_info()
    if world == 1:
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    if not local_loss and not gather_with_grad:
        # Rank r computes dL/dx_r exactly; x N so DDP's mean over ranks restores it.
        image_features = _ScaleGrad.apply(image_features, float(world))
        text_features = _ScaleGrad.apply(text_features, float(world))
    all_img, all_txt, sizes = gather_features(
        image_features, text_features, gather_with_grad=gather_with_grad, local_batch_sizes=local_batch_sizes
    )
    total = sum(sizes)
    if not local_loss:
        logits = logit_scale * all_img @ all_txt.T
        labels = torch.arange(total, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    n = image_features.shape[0]
    offset = sum(sizes[:rank])
    labels = torch.arange(offset, offset + n, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_txt.T
    logits_per_text = logit_scale * text_features @ all_img.T
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss * (world * n / total)
