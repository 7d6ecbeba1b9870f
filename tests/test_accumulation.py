"""Exact gradient accumulation and local loss through ``train_step``: the same numbers as the plain global batch.

The reference is one process training on the whole global batch in one pass (``micro_batch=0``). Every other way
of running the same steps - micro-batches of a quarter of the global batch in one process, two gloo ranks under
DDP with and without micro-batches, with ``local_loss`` on, with unequal local batches so the ranks run different
numbers of micro-batches - must give the same loss and pre-clip gradient norm at every step, the same gradients
after the first step (``logit_scale``'s included: counted once) and the same parameters after three AdamW steps,
up to float rounding. The same holds for the sigmoid loss (``train.loss: siglip``: texts exchanged round a ring,
its ``logit_bias`` a leaf counted once, like ``logit_scale``).
"""

from __future__ import annotations

import pytest
import torch

from gloo_ranks import join, leave, spawn
from reclip_ray.config import ConfigError, load_config, local_loss_enabled
from reclip_ray.train.step import micro_batch_slices, read_step, set_grad_reduce, train_step

GLOBAL = 16
STEPS = 3
LR = 1e-3
# Losses and gradients agree to fp32 rounding (gradients to ~5e-8 absolute here). Parameters after AdamW get an
# absolute tolerance of 1% of one step's size (LR): Adam divides by sqrt(v), so for gradient elements near zero
# a rounding-level difference becomes a visible share of that element's step. A real error (a gradient counted
# twice, a missing column term) moves parameters by a good part of LR, 100x more.
RTOL, PARAM_ATOL = 1e-5, 1e-2 * LR

# Two-rank cases: (name, per-rank sizes, micro_batch, local_loss, train.loss)
RANK_CASES = [
    ("ddp", [8, 8], 0, False, "clip"),
    ("ddp-local-loss", [8, 8], 0, True, "clip"),
    ("ddp-micro", [8, 8], GLOBAL // 4, False, "clip"),
    ("ddp-micro-local-loss", [8, 8], GLOBAL // 4, True, "clip"),
    ("ddp-micro-unequal", [9, 7], GLOBAL // 4, True, "clip"),  # rank 0: 4+4+1 rows, rank 1: 4+3 rows
    ("ddp-micro-one-rank-over", [9, 7], 8, False, "clip"),  # rank 0: 8+1 rows, rank 1: one micro-batch of 7 (same path)
    # The extra row on rank 1, as batch_split.step_split rotates it: rank 0's features are padded in the gather
    ("ddp-extra-row-on-rank-1", [7, 9], 0, True, "clip"),
    # The sigmoid loss (local_loss does not apply): plain, accumulated, and unequal with different micro-batch counts
    ("siglip-ddp", [8, 8], 0, False, "siglip"),
    ("siglip-ddp-micro", [8, 8], GLOBAL // 4, False, "siglip"),
    ("siglip-ddp-micro-unequal", [9, 7], GLOBAL // 4, True, "siglip"),
]


def _cfg(loss: str = "clip"):
    return load_config("tiny", ["model.vision.depth=1", "model.text.depth=1", f"train.loss={loss}"])


def _model(loss: str = "clip"):
    from reclip_ray.model import build_model

    torch.manual_seed(0)
    model = build_model(_cfg(loss).model, vocab_size=64)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # moderate logits: the test stays sensitive to gradient errors
        if model.logit_bias is not None:
            model.logit_bias.fill_(-1.0)  # likewise (the paper's -10 makes every pair a confident negative)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        images = torch.randint(0, 256, (GLOBAL, 32, 32, 3), dtype=torch.uint8, generator=g)
        tokens = torch.randint(3, 64, (GLOBAL, 8), generator=g)
        tokens[::2, 6:] = 0  # some right padding
        out.append((images, tokens))
    return out


def _run(model, rows: slice = slice(None), **step_kwargs) -> dict:
    """``STEPS`` AdamW steps on ``rows`` of each global batch; per-step loss / grad norm, step-1 grads, end params."""
    from reclip_ray.schedule import build_optimizer

    core = getattr(model, "module", model)
    opt = build_optimizer(core, _cfg().optim)
    losses, norms, grads = [], [], {}
    for i, (images, tokens) in enumerate(_batches()):
        out = read_step(train_step(model, opt, images[rows], tokens[rows], lr=LR, grad_clip=1.0, **step_kwargs))
        losses.append(out["loss"])
        norms.append(out["grad_norm"])
        if i == 0:
            grads = {n: p.grad.detach().clone() for n, p in core.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in core.named_parameters()}
    return {"loss": losses, "grad_norm": norms, "grads": grads, "params": params}


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), what
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), what
    assert got["grads"].keys() == ref["grads"].keys(), what
    for name, g in got["grads"].items():
        torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-7, msg=f"{what}: grad of {name}")
    for name, p in got["params"].items():
        torch.testing.assert_close(p, ref["params"][name], rtol=RTOL, atol=PARAM_ATOL, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def reference() -> dict:
    return _run(_model())


@pytest.fixture(scope="module")
def reference_siglip() -> dict:
    return _run(_model("siglip"))


def test_one_worker_micro_batches_equal_the_global_batch_siglip(reference_siglip):
    assert "logit_bias" in reference_siglip["grads"]  # so the comparison covers the bias, counted once
    got = _run(_model("siglip"), micro_batch=GLOBAL // 4)
    _assert_same(got, reference_siglip, "siglip, 1 worker, micro-batch global/4")


def test_micro_batch_slices():
    assert micro_batch_slices(10, 0) == [slice(0, 10)]
    assert micro_batch_slices(10, 10) == micro_batch_slices(10, 64) == [slice(0, 10)]
    assert micro_batch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


def test_one_worker_micro_batches_equal_the_global_batch(reference):
    got = _run(_model(), micro_batch=GLOBAL // 4)
    _assert_same(got, reference, "1 worker, micro-batch global/4")
    # The negatives matter: four independent quarter-batch losses are not the global loss (what exactness buys).
    from reclip_ray.loss import contrastive_loss

    model = _model()
    images, tokens = _batches()[0]
    from reclip_ray.pixels import normalize_images

    with torch.no_grad():
        img, txt, scale = model(normalize_images(images), tokens)
        quarters = [contrastive_loss(img[sl], txt[sl], scale).item() for sl in micro_batch_slices(GLOBAL, 4)]
    assert sum(quarters) / 4 != pytest.approx(reference["loss"][0], rel=1e-3)


def test_micro_batch_at_least_the_local_batch_is_the_plain_step_bit_for_bit(reference):
    got = _run(_model(), micro_batch=GLOBAL)
    assert got["loss"] == reference["loss"]
    assert all(torch.equal(p, reference["params"][n]) for n, p in got["params"].items())


def _compiled_under_ddp(rank: int, grad_checkpointing: bool = False, backend: str = "aot_eager") -> dict:
    """``train.compile`` with micro-batches under DDP: the training graph must be compiled inside DDP's forward, where
    dynamo splits it at the gradient buckets (DDPOptimizer) so that each bucket's all-reduce overlaps the rest of
    the backward. Counted by wrapping DDPOptimizer.compile_fn; ``aot_eager`` (no code generation) keeps it quick,
    ``inductor`` is the trainer's. With ``grad_checkpointing`` the blocks are recomputed in the backward (the
    worker's order: checkpointing, then compile, then the DDP wrap), which must change no number."""
    import torch._dynamo
    import torch._dynamo.backends.distributed as ddp_backend
    from torch.nn.parallel import DistributedDataParallel as DDP

    from reclip_ray.train.step import compile_model

    torch._dynamo.reset()
    split = []  # the code of each graph DDPOptimizer compiled
    compile_fn = ddp_backend.DDPOptimizer.compile_fn
    ddp_backend.DDPOptimizer.compile_fn = lambda self, gm, inputs: split.append(gm.code) or compile_fn(self, gm, inputs)
    try:
        # Buckets of 1 MB: several for this model (DDP's 25 MB would hold it whole, and leave nothing to split).
        model = _model()
        model.set_grad_checkpointing(grad_checkpointing)
        ddp = DDP(compile_model(model, backend=backend), find_unused_parameters=False, bucket_cap_mb=1)
        result = _run(ddp, slice(8 * rank, 8 * rank + 8), micro_batch=GLOBAL // 4, local_loss=True,
                      gather_with_grad=True, local_batch_sizes=[8, 8])
    finally:
        ddp_backend.DDPOptimizer.compile_fn = compile_fn
        torch._dynamo.reset()
    # dynamo traces a checkpointed block as one higher-order op: counted, so the case really recomputes in backward
    return {**result, "ddp_optimizer_graphs": len(split),
            "checkpointed_ops": sum(code.count("tag_activation_checkpoint") for code in split)}


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    join(rank, world, init_file)
    results = {}
    for name, sizes, micro, local_loss, loss in RANK_CASES:
        ddp = DDP(_model(loss), find_unused_parameters=False)  # as the trainer wraps it (ray.train.torch.prepare_model)
        start = sum(sizes[:rank])
        results[name] = _run(ddp, slice(start, start + sizes[rank]), micro_batch=micro, local_loss=local_loss,
                             gather_with_grad=True, local_batch_sizes=sizes)
    for name, micro in BF16_CASES:  # train.grad_reduce=bf16, as the worker sets it after wrapping
        ddp = set_grad_reduce(DDP(_model(), find_unused_parameters=False), "bf16")
        results[name] = _run(ddp, slice(8 * rank, 8 * rank + 8), micro_batch=micro, local_loss=True,
                             gather_with_grad=True, local_batch_sizes=[8, 8])
    results["ddp-micro-compiled"] = _compiled_under_ddp(rank)
    results["ddp-micro-compiled-checkpointed"] = _compiled_under_ddp(rank, grad_checkpointing=True)
    if rank == 0:
        torch.save(results, out)
    leave()


BF16_CASES = [("bf16-reduce", 0), ("bf16-reduce-micro", GLOBAL // 4)]


def test_two_workers_with_and_without_micro_batches_equal_the_global_batch(tmp_path, reference, reference_siglip):
    """Also ``train.grad_reduce=bf16`` (``step.set_grad_reduce``), plain and accumulated: the gradients DDP averages
    are the fp32 reference's rounded to bf16 (~0.4 % relative per value: 8 bits of mantissa), not equal to them."""
    out = str(tmp_path / "out.pt")
    spawn(_rank_worker, 2, 2, str(tmp_path / "init"), out)
    results = torch.load(out, weights_only=False)
    for name, *_, loss in RANK_CASES:
        _assert_same(results[name], reference_siglip if loss == "siglip" else reference, name)
    for name in ("ddp-micro-compiled", "ddp-micro-compiled-checkpointed"):
        _assert_same(results[name], reference, name)
        assert results[name]["ddp_optimizer_graphs"] >= 1, name  # the training graph was compiled in DDP's forward
    assert results["ddp-micro-compiled"]["checkpointed_ops"] == 0
    assert results["ddp-micro-compiled-checkpointed"]["checkpointed_ops"] >= 2  # a block of each tower
    for name, _ in BF16_CASES:
        got = results[name]
        assert got["loss"][0] == pytest.approx(reference["loss"][0], rel=RTOL), name  # the same first forward
        errors = {n: float((g - reference["grads"][n]).norm() / reference["grads"][n].norm())
                  for n, g in got["grads"].items()}
        assert max(errors.values()) < 1e-2, (name, errors)
        assert sorted(errors.values())[len(errors) // 2] > 1e-4, (name, errors)  # bf16's rounding, not fp32's
        assert got["grad_norm"][0] == pytest.approx(reference["grad_norm"][0], rel=1e-2), name


def _inductor_rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    join(rank, world, init_file, timeout_s=300)  # a rank whose C++ builds run long keeps the other waiting
    result = _compiled_under_ddp(rank, grad_checkpointing=True, backend="inductor")
    if rank == 0:
        torch.save(result, out)
    leave()


@pytest.mark.slow
def test_inductor_under_ddp_with_checkpointing_and_micro_batches_equals_the_global_batch(tmp_path, reference):
    """The multi-GPU trainer's path with ``train.compile``, ``train.grad_checkpointing`` and micro-batches: the model
    compiled by inductor (the trainer's backend; the test above uses ``aot_eager``, which generates no code), split
    at DDP's buckets, the checkpointed blocks recomputed in the backward. Same numbers as the one-process eager
    global batch on torch 2.14 and on the GPU machine's 2.11 (BENCHMARKS.md, issue 26). Its cost is the C++ builds
    of both ranks: 55-61 s with a cold inductor cache on 2 CPU cores, 103-112 s with the machine loaded (load 5-8)."""
    out = str(tmp_path / "out.pt")
    spawn(_inductor_rank_worker, 2, 2, str(tmp_path / "init"), out)
    result = torch.load(out, weights_only=False)
    _assert_same(result, reference, "inductor, DDP, micro-batches, grad checkpointing")
    assert result["ddp_optimizer_graphs"] >= 1 and result["checkpointed_ops"] >= 2


@pytest.mark.parametrize("preset", ["tiny", "vit-b-16", "vit-l-16"])
def test_the_clip_has_no_buffers_so_ddps_forward_makes_no_collective(preset):
    """Gradient accumulation runs its micro-batches through DDP's forward, and ranks may run different numbers of
    them (``train/step.py``). DDP's forward broadcasts the module's buffers when it has any: a collective, which
    ranks running different numbers of forwards would deadlock on. The CLIP has none (built on the meta device:
    shapes only)."""
    from reclip_ray.model import build_model

    with torch.device("meta"):
        model = build_model(load_config(preset).model, vocab_size=1000)
    assert sum(p.numel() for p in model.parameters()) > 1e6
    assert [name for name, _ in model.named_buffers()] == []


def test_local_loss_setting():
    assert local_loss_enabled("auto", 1) is False and local_loss_enabled("auto", 2) is True
    assert local_loss_enabled("true", 1) is True and local_loss_enabled(False, 8) is False
    with pytest.raises(ValueError, match="local_loss"):
        local_loss_enabled("sometimes", 2)


def test_config_keys_and_one_line_errors():
    cfg = load_config("tiny")
    assert (cfg.train.local_loss, cfg.train.micro_batch_size, cfg.train.compile) == ("auto", 0, False)
    cfg = load_config("tiny", ["train.local_loss=false", "train.micro_batch_size=32", "train.compile=true"])
    assert (cfg.train.local_loss, cfg.train.micro_batch_size, cfg.train.compile) == ("false", 32, True)
    assert load_config("tiny", ["train.local_loss=true"]).train.local_loss == "true"
    for override, key in [("train.micro_batch_size=-1", "train.micro_batch_size"),
                          ("train.micro_batch_size=2.5", "train.micro_batch_size"),
                          ("train.local_loss=maybe", "train.local_loss"),
                          ("train.compile=fast", "train.compile"),
                          ("train.grad_reduce=fp16", "train.grad_reduce")]:
        with pytest.raises(ConfigError, match=key) as info:
            load_config("tiny", [override])
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_compiled_step_matches_eager_and_compiles_once_per_resolution():
    """``train.compile``: the same numbers as eager; one compile per resolution, reused when a resolution comes back
    (timm's position-embedding resample keeps the image size static), and batch size and text length turn dynamic
    at their first change (a phase's short last step). The numbers come from inductor, the trainer's backend; the
    recompiles are counted with ``aot_eager`` (dynamo decides them; no C++ builds: 71 s instead of 165 s on 2 CPU
    cores with a cold cache)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from reclip_ray.schedule import build_optimizer
    from reclip_ray.train.step import compile_model

    torch._dynamo.reset()
    ref = _run(_model())
    got = _run(compile_model(_model()))  # 32 px, batch 16, 8 tokens
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    for name, p in got["params"].items():
        torch.testing.assert_close(p, ref["params"][name], rtol=1e-4, atol=PARAM_ATOL, msg=name)

    torch._dynamo.reset()
    model = compile_model(_model(), backend="aot_eager")
    assert _run(model)["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    opt = build_optimizer(model, _cfg().optim)
    graphs = [int(counters["stats"]["unique_graphs"])]
    shapes = [(64, 16, 8), (48, 16, 8), (64, 16, 8), (32, 16, 8), (48, 8, 8), (48, 5, 8), (48, 5, 12), (48, 7, 10)]
    for px, n, length in shapes:
        images = torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8)
        train_step(model, opt, images, torch.randint(3, 64, (n, length)), lr=LR)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    new = [b - a for a, b in zip(graphs, graphs[1:])]
    #     64 px, 48 px, 64 again, 32 again, batch 8, batch 5, 12 tokens, batch 7 + 10 tokens
    assert new == [1, 1, 0, 0, 1, 0, 1, 0], list(zip(shapes, new))


@pytest.mark.parametrize("dtype, hook", [("fp32", None), ("bf16", "bf16_compress_hook")])
def test_the_worker_wraps_its_model_with_the_configured_gradient_all_reduce(tmp_path, monkeypatch, dtype, hook):
    """``Worker._wrap_ddp`` (what every rank of a multi-worker run trains through) registers the
    ``train.grad_reduce`` hook on the DDP model Ray Train's ``prepare_model`` returns: the worker's own method, with
    ``prepare_model`` wrapping in DDP on a one-rank gloo group as it does on a cluster."""
    from types import SimpleNamespace

    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from reclip_ray.train.worker import Worker

    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kwargs: DDP(model))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        stub = SimpleNamespace(world=2, model=torch.nn.Linear(3, 3),
                               cfg=load_config("tiny", [f"train.grad_reduce={dtype}"]))
        wrapped = Worker._wrap_ddp(stub)
        assert isinstance(wrapped, DDP)
        assert wrapped._get_ddp_logging_data().get("comm_hook") == hook
    finally:
        dist.destroy_process_group()
