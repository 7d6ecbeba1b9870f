"""The CLIP model: one set of weights at several resolutions / text lengths, pooling, resume, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from reclip_ray.config import load_config
from reclip_ray.loss import contrastive_loss
from reclip_ray.model import CLIP_MEAN, CLIP_STD, build_model, normalize_images


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny").model


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=100)


def _tokens(n, length, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(n, length, dtype=torch.long)
    for i, k in enumerate(lengths):
        t[i, :k] = torch.randint(3, 100, (k,), generator=g)
    return t


def test_runs_at_three_sizes_and_two_lengths(cfg):
    model = _model(cfg).eval()
    pos_shape = tuple(model.visual.pos_embed.shape)
    for size in (32, 48, 64):
        for length in (16, 32):
            img, txt, scale = model(torch.randn(3, 3, size, size), _tokens(3, length, [2, 5, length]))
            assert img.shape == txt.shape == (3, cfg.embed_dim)
            torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
            torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
            assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert tuple(model.visual.pos_embed.shape) == pos_shape == (1, (64 // 8) ** 2 + 1, 128)  # never resized


def test_text_pooled_at_last_real_token_any_length(cfg):
    model = _model(cfg).eval()
    short = _tokens(2, 16, [4, 16])
    padded = torch.zeros(2, 32, dtype=torch.long)
    padded[:, :16] = short
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(short), model.encode_text(padded))
        # A change inside the caption does change the pooled feature (the pooling is not reading padding).
        before = short.clone()
        before[0, 1] = 7 if short[0, 1] != 7 else 8
        base = model.encode_text(short)
        assert not torch.allclose(model.encode_text(before)[0], base[0])
        torch.testing.assert_close(model.encode_text(before)[1], base[1])


def test_resume_after_low_res_gives_identical_high_res_outputs(cfg):
    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, tokens = torch.randn(4, 3, 32, 32), _tokens(4, 16, [3, 5, 8, 16])
    loss = contrastive_loss(*model(images, tokens))
    loss.backward()
    opt.step()  # the weights moved while running at 32 px
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _model(cfg, seed=123)
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    big, long = torch.randn(2, 3, 64, 64), _tokens(2, 32, [7, 32])
    with torch.no_grad():
        for a, b in zip(model(big, long), fresh(big, long)):
            assert torch.equal(a, b)


def test_logit_scale_clamped(cfg):
    model = _model(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    _, _, scale = model(torch.randn(1, 3, 32, 32), _tokens(1, 16, [3]))
    assert scale.item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_normalize_images():
    x = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    out = normalize_images(x)
    assert out.shape == (2, 3, 5, 6) and out.dtype == torch.float32
    expected = (x[1, 2, 3, 1].item() / 255 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert out[1, 1, 2, 3].item() == pytest.approx(expected, rel=1e-5)
    assert normalize_images(x, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_grad_checkpointing_same_gradients(cfg):
    images, tokens = torch.randn(3, 3, 32, 32), _tokens(3, 16, [3, 5, 16])
    grads = []
    for ckpt in (False, True):
        model = _model(cfg)
        model.set_grad_checkpointing(ckpt)
        contrastive_loss(*model(images, tokens)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_avg_pool_and_vocab_required():
    cfg = load_config("tiny", ["model.vision.pool=avg"]).model
    model = build_model(cfg, vocab_size=50)
    assert model(torch.randn(1, 3, 32, 32), _tokens(1, 8, [3]) % 50)[0].shape == (1, 128)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(load_config("tiny").model)
