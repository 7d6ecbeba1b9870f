"""Distributed contrastive loss: N gloo ranks + DDP gradient averaging == one process on the whole batch."""

from __future__ import annotations


import pytest
import torch

from gloo_ranks import join, leave, spawn
from reclip_ray.loss import contrastive_loss

MODES = [  # (local_loss, gather_with_grad)
    (False, True),
    (False, False),
    (True, True),
    (True, False),  # value-exact only (documented approximation)
]


def _model_and_batch(total: int):
    from reclip_ray.config import load_config
    from reclip_ray.model import build_model

    cfg = load_config("tiny", ["model.vision.depth=1", "model.text.depth=1"]).model
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=64)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # keep logits moderate so the test is sensitive to gradient errors
    g = torch.Generator().manual_seed(1)
    images = torch.randn(total, 3, 32, 32, generator=g)
    tokens = torch.randint(3, 64, (total, 8), generator=g)
    tokens[::2, 6:] = 0  # some right padding
    return model, images, tokens


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, sizes: list[int], init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    join(rank, world, init_file)
    model, images, tokens = _model_and_batch(sum(sizes))
    ddp = DDP(model)
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    results = {}
    for local_loss, with_grad in MODES:
        ddp.zero_grad(set_to_none=True)
        img, txt, scale = ddp(images[sl], tokens[sl])
        sizes_arg = sizes if local_loss else None  # both ways of learning the sizes are exercised
        loss = contrastive_loss(
            img, txt, scale, local_loss=local_loss, gather_with_grad=with_grad, local_batch_sizes=sizes_arg
        )
        loss.backward()  # DDP averages gradients over ranks, as in the trainer
        value = loss.detach().clone()
        dist.all_reduce(value)
        results[(local_loss, with_grad)] = (value.item() / world, _grads(model))
    if rank == 0:
        torch.save(results, out)
    leave()


@pytest.mark.parametrize("sizes", [[4, 4], [3, 2, 4]], ids=["2ranks", "3ranks-unequal"])
def test_distributed_loss_matches_single_process(tmp_path, sizes):
    out = str(tmp_path / "out.pt")
    spawn(_worker, len(sizes), len(sizes), sizes, str(tmp_path / "init"), out)
    results = torch.load(out, weights_only=False)

    model, images, tokens = _model_and_batch(sum(sizes))
    img, txt, scale = model(images, tokens)
    ref_loss = contrastive_loss(img, txt, scale)
    ref_loss.backward()
    ref = _grads(model)

    for mode in MODES:
        value, grads = results[mode]
        assert value == pytest.approx(ref_loss.item(), rel=1e-5), mode
        if mode == (True, False):
            # The cheap local path drops the column terms: proof that the comparison below can fail.
            assert any(not torch.allclose(g, ref[n], rtol=1e-4, atol=1e-6) for n, g in grads.items())
            continue
        assert grads.keys() == ref.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")


def _collectives_worker(rank: int, world: int, sizes: list[int], init_file: str, out: str) -> None:
    import torch.distributed as dist

    from reclip_ray import loss as loss_module

    join(rank, world, init_file)
    calls = []

    def recording(name):
        real = getattr(dist, name)

        def call(tensor, *args, **kwargs):
            calls.append((name, tuple(tensor.shape)))
            return real(tensor, *args, **kwargs)
        return call

    g = torch.Generator().manual_seed(rank)
    img = torch.nn.functional.normalize(torch.randn(sizes[rank], 16, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(sizes[rank], 16, generator=g), dim=-1).requires_grad_()
    loss = contrastive_loss(img, txt, torch.tensor(2.0), local_loss=True, local_batch_sizes=sizes)
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather"):
        setattr(loss_module.dist, name, recording(name))
    loss.backward()
    if rank == 0:
        torch.save(calls, out)
    leave()


def test_the_gathers_backward_sends_each_rank_its_rows_only(tmp_path):
    """The backward of the gather with gradients is one reduce-scatter per tower, each rank receiving its own
    (padded) rows: no all-reduce of the whole B x D gradients, which moved twice the bytes (loss.py, cost at scale).
    The gradients it gives are checked against one process in ``test_distributed_loss_matches_single_process``."""
    sizes, out = [3, 5], str(tmp_path / "calls.pt")
    spawn(_collectives_worker, 2, 2, sizes, str(tmp_path / "init"), out)
    assert torch.load(out) == [("reduce_scatter_tensor", (5, 16))] * 2


def test_single_process_loss_matches_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = (scale * img @ txt.T).double()
    i2t = -(logits.diag() - logits.logsumexp(1)).mean()
    t2i = -(logits.diag() - logits.logsumexp(0)).mean()
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-5)
    # Perfectly aligned, well-separated features give a near-zero loss.
    eye = torch.eye(5, 8)
    assert contrastive_loss(eye, eye, torch.tensor(100.0)).item() < 1e-6
