"""Analytical FLOPs vs. torch's FlopCounterMode on the real models (matmul/conv/attention FLOPs)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from reclip_ray.config import load_config
from reclip_ray.flops import (
    image_forward_flops,
    logits_forward_flops,
    phase_global_batch,
    run_flops,
    sample_forward_flops,
    text_forward_flops,
    train_flops_per_sample,
)
from reclip_ray.model import build_model


def _counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", ["tiny", "vit-b-16"])
@pytest.mark.parametrize("image_size", [64, 224])
def test_image_flops_match_flop_counter(preset, image_size):
    cfg = load_config(preset).model
    with torch.device("meta"):  # shapes only: vit-b-16 at 224 px costs nothing
        model = build_model(cfg, vocab_size=1000)
        measured = _counted(model.encode_image, torch.zeros(2, 3, image_size, image_size))
    assert image_forward_flops(cfg.vision, image_size, cfg.embed_dim) == pytest.approx(measured / 2, rel=0.05)


@pytest.mark.parametrize("preset,length", [("tiny", 16), ("tiny", 32), ("vit-b-16", 16), ("vit-b-16", 77)])
def test_text_flops_match_flop_counter(preset, length):
    cfg = load_config(preset).model
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=1000)
        measured = _counted(model.encode_text, torch.zeros(2, length, dtype=torch.long))
    assert text_forward_flops(cfg.text, length, cfg.embed_dim) == pytest.approx(measured / 2, rel=0.05)


def test_flops_on_real_cpu_tensors_tiny():
    """The meta-device count is the same as a real forward (guards against meta-only code paths)."""
    cfg = load_config("tiny").model
    model = build_model(cfg, vocab_size=100)
    images, tokens = torch.randn(1, 3, 48, 48), torch.randint(3, 100, (1, 16))
    measured = _counted(model, images, tokens)
    assert sample_forward_flops(cfg, 48, 16)["total"] == pytest.approx(measured, rel=0.05)


def test_reclip_ratio_and_run_total():
    cfg = load_config("vit-b-16")
    ratio = image_forward_flops(cfg.model.vision, 224) / image_forward_flops(cfg.model.vision, 64)
    assert 11 < ratio < 13.5  # 197 vs 17 tokens (DESIGN.md: about 12x)
    out = run_flops(cfg)
    assert [p["name"] for p in out["phases"]] == ["lowres", "finetune"]
    expected = sum(
        train_flops_per_sample(cfg.model, ph.image_size, ph.text_length, phase_global_batch(cfg, i)) * n
        for i, (ph, n) in enumerate(zip(cfg.phases, cfg.phase_samples()))
    ) / 1e9
    assert out["total_train_gflops"] == pytest.approx(expected)
    assert out["phases"][1]["image_gflops_per_sample"] == pytest.approx(image_forward_flops(cfg.model.vision, 224, 512) / 1e9)


def test_run_flops_image_and_text_tower_totals_by_hand():
    """The per-tower training totals of run_flops against a hand count of a one-block model (2 FLOPs a multiply-add,
    training = 3x forward): they add up, with the logits, to the run's total."""
    cfg = load_config("tiny", [
        "model.embed_dim=4", "model.vision.width=16", "model.vision.depth=1", "model.vision.heads=1",
        "model.text.width=8", "model.text.depth=1", "model.text.heads=1", "train.samples=100", "train.batch_size=10",
        "phases=[{name: low, image_size: 32, text_length: 16, samples: 90}, "
        "{name: full, image_size: 64, text_length: 32, samples: 10}]",
    ])
    # image, patch 8, width 16, MLP 64: patch embed 2*P*(3*8*8)*16; one block at T = P + 1 tokens: qkv 2*T*16*48,
    # attention 2*2*T*T*16, out projection 2*T*16*16, MLP 2*2*T*16*64; projection to embed_dim 2*16*4.
    def block(t, w, hidden):
        return 2 * t * w * 3 * w + 4 * t * t * w + 2 * t * w * w + 4 * t * w * hidden

    image32 = 2 * 16 * 192 * 16 + block(17, 16, 64) + 2 * 16 * 4
    image64 = 2 * 64 * 192 * 16 + block(65, 16, 64) + 2 * 16 * 4
    assert (image32, image64) == (98304 + 122944 + 128, 393216 + 669760 + 128)
    text16, text32 = block(16, 8, 32) + 2 * 8 * 4, block(32, 8, 32) + 2 * 8 * 4
    assert (text16, text32) == (32832, 81984)
    out = run_flops(cfg)
    assert out["total_image_train_gflops"] == pytest.approx(3 * (90 * image32 + 10 * image64) / 1e9, rel=1e-12)
    assert out["total_text_train_gflops"] == pytest.approx(3 * (90 * text16 + 10 * text32) / 1e9, rel=1e-12)
    assert [p["image_train_gflops"] for p in out["phases"]] == pytest.approx([3 * 90 * image32 / 1e9,
                                                                               3 * 10 * image64 / 1e9])
    logits = 3 * 100 * 2 * 10 * 4 / 1e9
    assert out["total_train_gflops"] == pytest.approx(
        out["total_image_train_gflops"] + out["total_text_train_gflops"] + logits, rel=1e-12)


def test_logits_flops_match_flop_counter_and_scale_with_the_global_batch():
    """The loss's B x B logits: 2 B D forward FLOPs per sample (FlopCounterMode on contrastive_loss), counted in
    the training total at the phase's global batch, the same for any worker count."""
    from reclip_ray.loss import contrastive_loss

    batch, dim = 24, 16
    img = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    measured = _counted(contrastive_loss, img, img.clone(), torch.tensor(10.0))
    assert logits_forward_flops(dim, batch) * batch == measured
    cfg = load_config("vit-b-16")
    towers = train_flops_per_sample(cfg.model, 64, 16)
    with_logits = train_flops_per_sample(cfg.model, 64, 16, 32768)
    assert with_logits - towers == 3 * 2 * 32768 * 512
    assert 0.005 < (with_logits - towers) / towers < 0.01  # the model's count; N ranks without local_loss run N x
    big = load_config("vit-b-16", ["phases.1.batch_size=4096"])
    assert run_flops(big)["phases"][1]["logits_gflops_per_sample"] == 2 * 4096 * 512 / 1e9
