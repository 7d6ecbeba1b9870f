"""FLIP's patch dropout as a phase option (``phases[i].patch_dropout``) and ``train.grad_checkpointing``.

The model drops what the FLOP count says it drops: the kept-token count is read off the ViT's blocks and compared
with ``flops.kept_patches`` (timm's rounding), and the image tower's FLOPs with torch's FlopCounterMode. The count
reaches ``run_flops``, ``reclip-ray plan`` and the sweep's GFLOPs budget; gradient accumulation re-encodes each
micro-batch with the patches it cached; gradient checkpointing leaves the gradients as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from reclip_ray.config import ConfigError, apply_overrides, from_dict, load_config, load_raw
from reclip_ray.flops import (image_forward_flops, image_tokens, kept_patches, phase_train_flops_per_sample, run_flops,
                              train_flops_per_sample)
from reclip_ray.loss import contrastive_loss
from reclip_ray.model import build_model, set_patch_dropout
from reclip_ray.pixels import normalize_images


def _model(preset: str = "tiny", **overrides):
    return build_model(load_config(preset).model, vocab_size=64, **overrides)


def _block_inputs(model) -> list[int]:
    """Token counts the first block of each tower sees, one entry per call (a pre-hook on it)."""
    seen: list[int] = []
    model.visual.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("px,rate", [(32, 0.5), (48, 0.3), (64, 0.75), (80, 0.9), (80, 0.5), (64, 0.99)])
def test_blocks_run_the_kept_patches_plus_the_class_token(px, rate):
    """80 px / patch 8 = 100 patches at 0.9 keep int(100 * (1 - 0.9)) = 9 (float rounding, as timm), not 10."""
    model = _model()
    seen = _block_inputs(model)
    model.set_patch_dropout(rate)
    model.train()
    model.encode_image(torch.randn(3, 3, px, px))
    patches = (px // 8) ** 2
    assert seen == [kept_patches(patches, rate) + 1] == [image_tokens(model.cfg.vision, px, rate)]
    if (px, rate) == (80, 0.9):
        assert seen == [10]
    model.eval()
    model.encode_image(torch.randn(3, 3, px, px))
    assert seen[-1] == patches + 1  # evaluation runs every token


def test_each_sample_keeps_its_own_patches_and_the_class_token():
    model = _model()
    model.set_patch_dropout(0.5)
    model.train()
    got = {}
    model.visual.patch_drop.register_forward_hook(lambda mod, args, out: got.update(x=args[0], y=out))
    model.encode_image(torch.randn(4, 3, 32, 32))
    x, y = got["x"], got["y"]
    assert y.shape == (4, 1 + 8, x.shape[-1])
    assert torch.equal(y[:, 0], x[:, 0])  # the class token, always first
    kept = []
    for i in range(4):  # every kept token is one of the sample's own patches, none twice
        match = (y[i, 1:, None, :] == x[i, None, 1:, :]).all(-1)
        assert match.sum(1).tolist() == [1] * 8
        kept.append(frozenset(match.float().argmax(1).tolist()))
    assert len(set(kept)) > 1  # masks are drawn per sample


def test_eval_forward_is_the_plain_model_and_the_rate_is_settable_on_a_live_model():
    torch.manual_seed(0)
    plain = _model()
    dropped = copy.deepcopy(plain)
    keys = list(dropped.state_dict())
    set_patch_dropout(dropped, 0.5)
    assert dropped.patch_dropout == 0.5
    wrapped = torch.nn.Module()
    wrapped.module = dropped  # the trainers pass the DDP wrapper's module the same way
    set_patch_dropout(wrapped, 0.25)
    assert dropped.patch_dropout == 0.25 and list(dropped.state_dict()) == keys  # no weights added or renamed
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(3, 64, (2, 16))
    plain.eval(), dropped.eval()
    assert torch.equal(plain(images, tokens)[0], dropped(images, tokens)[0])
    dropped.train()
    assert not torch.allclose(plain.train()(images, tokens)[0], dropped(images, tokens)[0])
    dropped.set_patch_dropout(0.0)
    assert isinstance(dropped.visual.patch_drop, torch.nn.Identity) and dropped.patch_dropout == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="patch dropout"):
            dropped.set_patch_dropout(bad)


# ------------------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("preset,px,rate", [("tiny", 64, 0.5), ("tiny", 80, 0.9), ("vit-b-16", 224, 0.5),
                                            ("vit-b-16", 64, 0.75), ("vit-b-16", 160, 0.9)])
def test_image_flops_with_patch_dropout_equal_the_flop_counter(preset, px, rate):
    """On the meta device FlopCounterMode sees every matmul, the patch conv and the attention (on CPU tensors the
    attention kernel is not counted), and the analytical count equals it exactly."""
    cfg = load_config(preset).model
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=1000)
        model.set_patch_dropout(rate)
        model.train()
        with FlopCounterMode(display=False) as counter:
            model.encode_image(torch.zeros(2, 3, px, px))
    assert image_forward_flops(cfg.vision, px, cfg.embed_dim, rate) * 2 == counter.get_total_flops()
    assert image_forward_flops(cfg.vision, px, cfg.embed_dim, rate) < image_forward_flops(cfg.vision, px, cfg.embed_dim)


def _hand_config(rate: float):
    """Patch 8, vision width 64 x 1 block, text width 32 x 1 block, embed 16; 32 px: 30 samples at ``rate``, 10 without."""
    return from_dict({
        "name": "hand",
        "model": {"embed_dim": 16,
                  "vision": {"patch_size": 8, "width": 64, "depth": 1, "heads": 1, "base_image_size": 32},
                  "text": {"width": 32, "depth": 1, "heads": 1, "context_length": 16}},
        "phases": [{"name": "drop", "image_size": 32, "text_length": 8, "samples": 30, "patch_dropout": rate},
                   {"name": "full", "image_size": 32, "text_length": 8, "samples": 10}],
        "train": {"samples": 40, "batch_size": 4},
    })


def _block(L: int, D: int) -> int:
    return 2 * L * D * 3 * D + 4 * L * L * D + 2 * L * D * D + 2 * 2 * L * D * 4 * D


def test_run_flops_and_plan_count_the_kept_tokens_by_hand():
    """16 patches at 0.5: the conv embeds all 16, the block runs 8 + 1 tokens."""
    from reclip_ray.plan import format_plan, make_plan

    cfg = _hand_config(0.5)
    image_drop = 2 * 16 * (3 * 8 * 8) * 64 + _block(9, 64) + 2 * 64 * 16
    image_full = 2 * 16 * (3 * 8 * 8) * 64 + _block(17, 64) + 2 * 64 * 16
    text, logits = _block(8, 32) + 2 * 32 * 16, 2 * 4 * 16
    expected = 3 * (30 * (image_drop + text + logits) + 10 * (image_full + text + logits))
    flops = run_flops(cfg)
    assert flops["total_train_gflops"] * 1e9 == pytest.approx(expected, rel=1e-12)
    # What the worker adds to gflops_total per sample of each phase.
    assert [phase_train_flops_per_sample(cfg, i) for i in (0, 1)] == [3 * (image_drop + text + logits),
                                                                      3 * (image_full + text + logits)]
    assert [p["image_tokens"] for p in flops["phases"]] == [9, 17]
    assert flops["phases"][0]["patch_dropout"] == 0.5
    plan = make_plan(cfg)
    assert plan.total_train_gflops * 1e9 == pytest.approx(expected, rel=1e-12)
    assert [p.image_tokens for p in plan.phases] == [9, 17]
    full = 40 * 3 * (image_full + text + logits)  # the baseline: plain CLIP, every patch
    assert plan.full_resolution["train_gflops"] * 1e9 == pytest.approx(full, rel=1e-12)
    assert plan.saving_total == pytest.approx(full / expected, rel=1e-12)
    assert plan.saving_image_tower == pytest.approx(40 * image_full / (30 * image_drop + 10 * image_full), rel=1e-12)
    assert "patch_dropout 0.5 runs 8 of 16 patch tokens" in format_plan(plan)
    no_drop = make_plan(_hand_config(0.0))
    assert no_drop.saving_total == pytest.approx(1.0) and not no_drop.notes


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, float("nan")])
def test_patch_dropout_outside_zero_one_is_a_one_line_error(value):
    with pytest.raises(ConfigError, match=r"'phases\.1\.patch_dropout' \(finetune\) must be in \[0, 1\)") as err:
        load_config("tiny", [f"phases.1.patch_dropout={value}"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="phases.0.patch_dropout"):
        load_config("tiny", ["phases.0.patch_dropout=half"])
    assert load_config("tiny", ["phases.0.patch_dropout=0.5"]).phases[0].patch_dropout == 0.5
    assert load_config("tiny").phases[0].patch_dropout == 0.0


# ------------------------------------------------------------------------------------------------ sweeps


def test_a_sweep_searches_patch_dropout_per_phase_at_equal_gflops(tmp_path):
    """``phases.0.patch_dropout`` is a plain dotted param; the GFLOPs budget buys more samples with dropout."""
    from reclip_ray.sweep import grid_corners, load_space, trial_raw

    path = tmp_path / "flip.yaml"
    path.write_text("name: flip\nbase: tiny\nparams:\n  phases.0.patch_dropout: {grid: [0.0, 0.5]}\n"
                    "metric: eval/full/colour/top1\nbudget: {gflops: 6000}\nscheduler: {name: fifo}\n")
    space = load_space(path)
    base = apply_overrides(load_raw(space.base), space.overrides)
    cfgs = {c["phases.0.patch_dropout"]: from_dict(trial_raw(base, c, space.budget)) for c in grid_corners(space)}
    assert sorted(cfgs) == [0.0, 0.5]
    for rate, cfg in cfgs.items():
        assert [p.patch_dropout for p in cfg.phases] == [rate, 0.0]
        worst = max(train_flops_per_sample(cfg.model, p.image_size, p.text_length, cfg.train.batch_size)
                    for p in cfg.phases) / 1e9
        assert 6000 - 2 * worst <= run_flops(cfg)["total_train_gflops"] <= 6000  # the trainer's count, on budget
    assert cfgs[0.5].phases[0].samples > 1.2 * cfgs[0.0].phases[0].samples  # tiny: the text tower is a large share
    with pytest.raises(ConfigError, match="phases.0.patch_dropout"):
        from_dict(trial_raw(base, {"phases.0.patch_dropout": 1.0}, space.budget))


# ------------------------------------------------------------------------------------------------ training


def check_micro_batch_replay(device: str, rows: int, rtol: float, atol: float) -> None:
    """Gradients of ``train_step`` over two micro-batches of ``rows`` against a reference built by hand: each
    micro-batch encoded once with grad, in order, from the same RNG state (what the replay must reproduce)."""
    from reclip_ray.train.step import train_step

    torch.manual_seed(0)
    model = _model().to(device)
    model.set_patch_dropout(0.5)
    ref = copy.deepcopy(model).train()
    images = torch.randint(0, 256, (2 * rows, 32, 32, 3), dtype=torch.uint8, device=device)
    tokens = torch.randint(3, 64, (2 * rows, 16), device=device)
    torch.manual_seed(1)
    out = [ref(normalize_images(images[s]), tokens[s]) for s in (slice(0, rows), slice(rows, 2 * rows))]
    contrastive_loss(torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), out[-1][2]).backward()
    torch.manual_seed(1)
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), images, tokens, lr=0.0, grad_clip=0.0,
               micro_batch=rows)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


def test_micro_batches_re_encode_with_the_patches_they_cached():
    """GradCache encodes each micro-batch twice (no grad, then with grad): the RNG is replayed, so both passes drop
    the same patches and the gradients are those of the loss on the cached features (reference built by hand)."""
    check_micro_batch_replay("cpu", rows=2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_grad_checkpointing_recomputes_both_towers_and_leaves_gradients_unchanged(rate):
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(3, 64, (3, 16))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _model()
        model.set_patch_dropout(rate)
        model.set_grad_checkpointing(ckpt)
        calls = {"visual": 0, "text": 0}
        for tower in calls:
            getattr(model, tower).blocks[0].register_forward_pre_hook(
                lambda mod, args, tower=tower: calls.__setitem__(tower, calls[tower] + 1))
        torch.manual_seed(1)
        contrastive_loss(*model(images, tokens)).backward()
        assert calls == ({"visual": 2, "text": 2} if ckpt else {"visual": 1, "text": 1})  # recomputed in backward
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_train_local_sets_each_phase_rate_and_grad_checkpointing(monkeypatch, synth_dir, tokenizer_path):
    """The config keys reach the model: each phase trains at its own rate, checkpointing on from train's key."""
    from reclip_ray.train import step
    from reclip_ray.train.local import train_local

    seen: list[tuple[float, bool, bool]] = []
    real = step.train_step

    def spy(model, *args, **kwargs):
        seen.append((model.patch_dropout, model.visual.grad_checkpointing, model.text.grad_checkpointing))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(step, "train_step", spy)
    cfg = load_config("tiny", [
        f"data.train={synth_dir / 'train'}", "train.samples=64", "train.batch_size=16", "train.grad_checkpointing=true",
        "model.vision.depth=1", "model.text.depth=1",
        "phases=[{name: drop, image_size: 32, text_length: 16, samples: 32, patch_dropout: 0.5}, "
        "{name: full, image_size: 32, text_length: 16, samples: 32}]",
    ])
    model, _ = train_local(cfg, tokenizer=str(tokenizer_path), log=None)
    assert seen == [(0.5, True, True)] * 2 + [(0.0, True, True)] * 2
