"""Symmetric contrastive (InfoNCE) loss with features gathered from every rank.

Gradient convention (what the trainer relies on): each rank calls ``contrastive_loss`` on its *local* normalised
features, calls ``backward()`` on the returned value, and the parameter gradients are then AVERAGED over ranks
(DDP's default all-reduce mean, or ``all_reduce(SUM) / world_size`` by hand). With that, in every mode below
except ``local_loss=True, gather_with_grad=False``, the averaged gradients equal - up to float rounding - the
gradients of single-process training on the concatenated global batch, and ``mean over ranks of the returned
loss`` equals the global-batch loss. No extra scaling is needed in the trainer. Why it works per mode:

* ``local_loss=False, gather_with_grad=True``: every rank computes the full global-batch loss ``L``. The gather's
  backward sums the gradient w.r.t. the gathered features over ranks and hands each rank its own rows (a
  reduce-scatter), so rank r's features receive ``N * dL/dx_r`` (every rank holds an identical copy of ``L``);
  DDP's mean divides the N back out. ``logit_scale`` gets ``dL/ds`` on every rank; the mean keeps it.
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

The sigmoid loss (SigLIP, Zhai et al. 2023; ``train.loss: siglip``, selected by passing ``logit_bias``) follows the
same convention: each rank returns its share (the mean over ranks is the global-batch loss
``sum over all B x B pairs of -log sigmoid(z_ij (t x_i.y_j + b)) / B``, z = +1 on the diagonal, -1 elsewhere) and
DDP's mean gives the global gradients exactly. Every pair is independent, so no rank ever needs the B x B matrix or
the other ranks' images: rank r scores its b images against its own texts, then against every other rank's texts
as they come round a ring (``_ring_texts``: both neighbours at once, ceil((N - 1) / 2) point-to-point rounds). The
received texts keep their autograd path (``_Exchange``: the backward sends each received chunk's gradient back to
its owner), so a rank's text features get the column terms that every other rank's images put on them. The
``local_loss`` / ``gather_with_grad`` modes do not apply: the loss is always row-local and gradient-exact.

Cost at scale (64 ranks, B = 32,768, b = 512, D = 512, fp32 features: one rank's features are 1 MiB), per rank
per step, loss only:

* bytes moved: sigmoid 63 MiB in (texts) + 63 MiB back (their gradients) = 126 MiB. CLIP with local loss:
  all-gather of images and texts 2 x 63 MiB, then a reduce-scatter of two B x D gradients (2 x 63 MiB) = ~252 MiB,
  2x more (an all-reduce of the whole gradients, then sliced, moved ~378 MiB), and each is a synchronising
  collective over all 64 ranks where the ring only ever waits for two neighbours.
* peak memory: sigmoid keeps the received text chunks for the backward (B x D = 64 MiB) and one b x b logits
  block per rank pair (b x B = 64 MiB), ~130 MiB. CLIP with local loss keeps the gathered images and texts
  (128 MiB), two b x B logits matrices plus their softmax (~256 MiB) and the reduce-scatters' (2 MiB; a padded
  copy of the gradients, 128 MiB, when the local batches differ), ~0.4-0.5 GiB. Both are small next to the towers'
  activations; the sigmoid loss never builds anything B x B.
* latency: the ring is 32 sequential rounds of 1 MiB each way (not overlapped with the block's compute here).
* FLOPs: one ``b x B x D`` product per rank, exactly the ``2 B D`` per sample that ``reclip_ray.flops`` counts for
  the logits (CLIP with local loss executes it twice, one per direction); the sigmoid and the sums are
  elementwise (not counted, as LayerNorm is not). So the FLOPs accounting is the same for both losses.
"""

from __future__ import annotations

import itertools
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


def _batch_sizes(features: torch.Tensor, local_batch_sizes: Sequence[int] | None) -> list[int]:
    """Every rank's local batch size: checked against this rank when the caller knows them, else gathered."""
    rank, world = _dist_info()
    if local_batch_sizes is None:
        return _gather_sizes(features.shape[0], features.device)
    sizes = [int(n) for n in local_batch_sizes]
    if len(sizes) != world or sizes[rank] != features.shape[0]:
        raise ValueError(f"local_batch_sizes {sizes} do not match rank {rank}'s batch {features.shape[0]}")
    return sizes


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
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice.

    The backward is a reduce-scatter: each rank receives the sum of its own rows only. An all-reduce of the whole
    ``B x D`` gradient (then sliced) moves twice the bytes: at a 32,768 global batch and 512 dims that is 64 MiB per
    tower per step, of which a ring all-reduce sends and receives about 2 x 64 MiB per rank, a reduce-scatter 64 MiB.
    Unequal local batches are padded to the longest, as in the forward gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        sizes, longest = ctx.sizes, max(ctx.sizes)
        if min(sizes) == longest:
            padded = grad.contiguous()
        else:  # every rank's rows at the start of an equal slot
            padded = grad.new_zeros((len(sizes) * longest, *grad.shape[1:]))
            for r, (start, n) in enumerate(zip(itertools.accumulate([0] + sizes[:-1]), sizes)):
                padded[r * longest : r * longest + n] = grad[start : start + n]
        mine = grad.new_empty((longest, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, padded, op=dist.ReduceOp.SUM)
        return mine[: sizes[ctx.rank]], None, None


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
    sizes = _batch_sizes(image_features, local_batch_sizes)
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
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised local features; see the module docstring for the DDP convention.

    With ``logit_bias`` (a model built for ``train.loss: siglip`` has one) it is the sigmoid loss instead
    (``sigmoid_loss``): the trainer makes one call whatever the loss, and the model decides which.
    """
    if logit_bias is not None:
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, local_batch_sizes=local_batch_sizes)
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


# ----------------------------------------------------------------------------------------------- sigmoid loss


def _p2p(tensors: Sequence[torch.Tensor], send_to: Sequence[int], recv_from: Sequence[int],
         recv_rows: Sequence[int]) -> list[torch.Tensor]:
    """Send ``tensors[i]`` to rank ``send_to[i]`` and receive a ``recv_rows[j]``-row tensor from ``recv_from[j]``,
    all in one batch of point-to-point operations."""
    like = tensors[0]
    received = [like.new_empty((rows, *like.shape[1:])) for rows in recv_rows]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in zip(tensors, send_to)]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in zip(received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _Exchange(torch.autograd.Function):
    """``_p2p`` whose backward runs the same exchange in reverse: the gradient of every received tensor goes back
    to the rank that sent it and lands on the tensor it sent, so features used on another rank get their gradient."""

    @staticmethod
    def forward(ctx, send_to: tuple[int, ...], recv_from: tuple[int, ...], recv_rows: tuple[int, ...],
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.send_to, ctx.recv_from = send_to, recv_from
        ctx.send_rows = tuple(t.shape[0] for t in tensors)
        return tuple(_p2p(tensors, send_to, recv_from, recv_rows))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        back = _p2p([g.contiguous() for g in grads], ctx.recv_from, ctx.send_to, ctx.send_rows)
        return (None, None, None, *back)


def _ring_texts(text_features: torch.Tensor, sizes: list[int]):
    """Yield every other rank's text features, each once, with autograd paths back to their owners.

    Round k receives the texts of rank r - k from the left neighbour and of rank r + k from the right one (each
    rank passes on what it received the round before), so N - 1 chunks arrive in ceil((N - 1) / 2) rounds; with
    N even the last round is one-way (from the left: rank r + N/2 is rank r - N/2).
    """
    rank, world = _dist_info()
    left, right = (rank - 1) % world, (rank + 1) % world
    to_right = to_left = text_features
    for k in range(1, world // 2 + 1):
        from_left_rows = sizes[(rank - k) % world]
        if 2 * k == world:  # the last round of an even ring: one way
            (from_left,) = _Exchange.apply((right,), (left,), (from_left_rows,), to_right)
            yield from_left
            return
        from_left, from_right = _Exchange.apply(
            (right, left), (left, right), (from_left_rows, sizes[(rank + k) % world]), to_right, to_left
        )
        yield from_left
        yield from_right
        to_right, to_left = from_left, from_right


def _sigmoid_block(scaled_images: torch.Tensor, texts: torch.Tensor, logit_bias: torch.Tensor, *,
                   positives: bool) -> torch.Tensor:
    """Summed ``-log sigmoid(z * logit)`` over one block of pairs; z = +1 on the diagonal of the own block, else -1.

    Written so that autograd keeps one b x b tensor per block (the logsigmoid input): the scale is already in the
    images, and the all-negative blocks are negated rather than multiplied by a sign matrix.
    """
    logits = scaled_images @ texts.T + logit_bias
    if positives:
        signs = -torch.ones_like(logits)
        signs.fill_diagonal_(1.0)
        return -F.logsigmoid(signs * logits).sum()
    return -F.logsigmoid(-logits).sum()


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    local_batch_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """This rank's share of SigLIP's pairwise sigmoid loss (module docstring: convention, exchange and cost).

    Equal to open_clip's ``SigLipLoss`` when local batches are equal (it divides by the local batch; here the
    scale is ``N / B`` so that unequal batches still average to the global loss).
    """
    rank, world = _dist_info()
    sizes = [image_features.shape[0]] if world == 1 else _batch_sizes(image_features, local_batch_sizes)
    scaled = logit_scale * image_features
    loss = _sigmoid_block(scaled, text_features, logit_bias, positives=True)
    if world > 1:
        for texts in _ring_texts(text_features, sizes):
            loss = loss + _sigmoid_block(scaled, texts, logit_bias, positives=False)
    return loss * (world / sum(sizes))
