"""The CLIP model: one set of weights at several resolutions / text lengths, pooling, resume, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from reclip_ray.config import load_config
from reclip_ray.loss import contrastive_loss
from reclip_ray.model import build_model
from reclip_ray.pixels import CLIP_MEAN, CLIP_STD, normalize_images


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


def test_without_eot_id_text_pooled_at_last_non_pad_token(cfg):
    """A model built from a bare vocab size (no tokenizer, eot_id -1) keeps the earlier last-non-pad rule."""
    model = _model(cfg).eval()
    assert model.cfg.text.eot_id == -1
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


def _word_tokenizer(path, words, **names):
    """A user-made WordLevel tokenizer.json with the given id order, loaded as a CaptionTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from reclip_ray.data.tokenizer import load_tokenizer

    user = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    user.pre_tokenizer = pre_tokenizers.Whitespace()
    user.save(str(path))
    return load_tokenizer(path, **names)


WORDS = ["<unk>", "red", "blue", "star", "circle", "<pad>", "<start_of_text>", "<end_of_text>", "on", "left"]
# CLIP's BPE layout: start/end of text are the two last ids and padding is end-of-text itself (HF CLIPTokenizer).
CLIP_WORDS = ["<unk>", "red", "blue", "star", "circle", "on", "left", "<|startoftext|>", "<|endoftext|>"]
CAPTIONS = ["red star", "blue circle on left", "star"]


@pytest.fixture(params=["pad5_eot7", "clip_pad_is_eot"])
def user_tok(request, tmp_path):
    if request.param == "pad5_eot7":
        tok = _word_tokenizer(tmp_path / "tokenizer.json", WORDS)
        assert (tok.pad_id, tok.eot_id) == (5, 7)
    else:
        tok = _word_tokenizer(tmp_path / "tokenizer.json", CLIP_WORDS, pad="<|endoftext|>")
        assert tok.pad_id == tok.eot_id == tok.vocab_size - 1 == 8
    return tok


def _pool_by_hand(model, tokens, positions):
    """encode_text computed outside the model: blocks, then the hidden state at ``positions``, then the heads."""
    text = model.text
    x = text.token_embedding(tokens) + text.positional_embedding[: tokens.shape[1]]
    for blk in text.blocks:
        x = blk(x)
    pooled = text.ln_final(x[torch.arange(len(tokens)), torch.as_tensor(positions)])
    return torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)


def test_text_pooled_at_the_tokenizers_end_of_text(cfg, user_tok):
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=user_tok).eval()
    assert (model.cfg.text.eot_id, model.cfg.text.pad_id, model.cfg.text.vocab_size) == (
        user_tok.eot_id, user_tok.pad_id, user_tok.vocab_size)
    tokens = torch.from_numpy(user_tok.encode(CAPTIONS, 16))
    eot = [row.tolist().index(user_tok.eot_id) for row in tokens]  # first end-of-text, found by hand
    assert eot == [3, 5, 2]
    with torch.no_grad():
        features = model.encode_text(tokens)
        torch.testing.assert_close(features, _pool_by_hand(model, tokens, eot))
        for wrong in ([e - 1 for e in eot], [15, 15, 15]):  # the token before eot; the last (padding) position
            assert not torch.allclose(features, _pool_by_hand(model, tokens, wrong), atol=1e-4)


def test_padding_and_tokens_after_eot_do_not_change_text_features(cfg, user_tok):
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=user_tok).eval()
    short, long = (torch.from_numpy(user_tok.encode(CAPTIONS, n)) for n in (12, 32))
    noisy = long.clone()
    noisy[:, 12:] = torch.randint(0, user_tok.vocab_size, (len(CAPTIONS), 20))  # even stray eot tokens later on
    with torch.no_grad():
        base = model.encode_text(short)
        torch.testing.assert_close(model.encode_text(long), base)
        torch.testing.assert_close(model.encode_text(noisy), base)


def test_row_without_eot_pools_its_last_position(cfg, user_tok):
    model = build_model(cfg, tokenizer=user_tok).eval()
    tokens = torch.tensor([[1, 2, 3, 4], [1, user_tok.eot_id, 3, 4]])
    assert model.text.pool_positions(tokens).tolist() == [3, 1]


def test_build_model_ids_explicit_and_checked(cfg, user_tok):
    model = build_model(cfg, vocab_size=20, eot_id=9, pad_id=4)  # no tokenizer: the ids as given
    assert (model.cfg.text.vocab_size, model.cfg.text.eot_id, model.cfg.text.pad_id) == (20, 9, 4)
    assert build_model(cfg, tokenizer=user_tok, vocab_size=64).cfg.text.vocab_size == 64  # explicit wins
    assert cfg.text.eot_id == -1  # the caller's config is not modified
    with pytest.raises(ValueError, match="eot_id=9 is not below vocab_size=9"):
        build_model(cfg, vocab_size=9, eot_id=9)


def test_export_keeps_the_tokenizer_ids(cfg, user_tok, tmp_path):
    from reclip_ray.config import load_config
    from reclip_ray.export import export_model, load_model

    run = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(run.model, tokenizer=user_tok).eval()
    out = export_model(model, user_tok, run, tmp_path / "model")
    loaded, tok = load_model(out)
    assert (loaded.cfg.text.eot_id, loaded.cfg.text.pad_id) == (user_tok.eot_id, user_tok.pad_id)
    assert (tok.eot_id, tok.pad_id) == (user_tok.eot_id, user_tok.pad_id)  # pad found by name, pinned by id
    tokens = torch.from_numpy(tok.encode(CAPTIONS, 16))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_export_from_before_eot_id_takes_it_from_the_tokenizer(tmp_path, tokenizer_path):
    import yaml

    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model, load_model

    tok = load_tokenizer(tokenizer_path)
    model = build_model(load_config("tiny").model, tokenizer=tok).eval()
    out = export_model(model, tok, load_config("tiny"), tmp_path / "model")
    raw = yaml.safe_load((out / "config.yaml").read_text())
    del raw["model"]["text"]["eot_id"]
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    loaded, _ = load_model(out)
    assert loaded.cfg.text.eot_id == tok.eot_id == 2
    tokens = torch.from_numpy(tok.encode(["a red circle on the left", "a star"], 24))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


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
