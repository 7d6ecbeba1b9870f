"""Speak open_clip (issue 15): the CLIP tokenizer, the open_clip export, ``model.init_from`` and evaluation of an
export. No Ray, nothing downloaded: every open_clip model here is built with random weights.

Models get seeded noise on every parameter before they are compared: a fresh init has zero biases and unit
LayerNorm weights, so a mapping that dropped or swapped those would still look exact.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from reclip_ray.config import ConfigError, load_config  # noqa: E402
from reclip_ray.data.tokenizer import load_tokenizer  # noqa: E402
from reclip_ray.errors import CheckpointError, DataError  # noqa: E402
from reclip_ray.model import build_model  # noqa: E402

TOL = 1e-4  # the bound on |reclip-ray - open_clip| after normalisation, fp32


@pytest.fixture(scope="module", autouse=True)
def _clip_cache(tmp_path_factory):
    """The converted CLIP tokenizer goes to a per-module cache, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def clip_tok():
    return load_tokenizer("clip")


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.02, vectors_only: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if vectors_only and p.ndim > 1 and p.shape[0] > 1:
                continue
            p.add_(scale * torch.randn(p.shape, generator=g))


def make_model(preset: str, tok, *, pool: str = "cls", seed: int = 0, vectors_only: bool = False):
    cfg = load_config(preset, [f"model.vision.pool={pool}"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, tokenizer=tok).eval()
    perturb(model, seed, vectors_only=vectors_only)
    return model, cfg


def load_open_clip(folder: Path, caplog) -> torch.nn.Module:
    """create_model_and_transforms on the folder, failing on any warning or log line about keys."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    noise = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in noise if "missing" in m.lower() or "unexpected" in m.lower()], noise
    return model.eval()


# --------------------------------------------------------------------------------------------------- 1. tokenizer

WORDS = ("a photo of the cat dog on left right red blue green circle square striped dotted big small two three "
         "sitting beside under over").split()
ODD = [
    "café", "naïve", "Ångström", "façade", "ΟΔΟΣ", "σοφία", "İstanbul", "straße", "ẞIG", "Москва", "日本語",
    "北京の夜", "مرحبا", "😀", "👍🏽", "🇫🇷", "“quoted”", "it’s", "‘single’", "&amp;", "&quot;hi&quot;", "&#39;",
    "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "ﬁne", "ＡＢＣ１２３", "Ã©tÃ©", "x\u200by", "non\u00a0breaking",
    "snake_case", "https://example.com/a_b?c=1&d=2", "me@example.org", "#hashtag", "@user", "3.14", "1,000",
    "1990s", "--", "...", "!!!", "?!", "(paren)", "[bracket]", "{brace}", "a/b", "50%", "$9.99", "C++", "e.g.",
    "IT'S", "they're", "we'll", "I'M", "you'd", "o'clock", "rock'n'roll", "TAB\tTAB", "new\nline", "<end_of_text>",
    "<start_of_text>", "ＨＥＬＬＯ", "Ω≈ç√∫", "™®©", "naïve—dash", "x–y", "½", "²", "Ⅻ", "ǅ", "ﬀ",
]


def captions(n: int = 1200, seed: int = 0) -> list[str]:
    """Varied captions: plain, capitalised, punctuated, unicode-heavy, HTML-escaped, and long (cut at 16 and 77)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 2, 4, 8, 12, 20, 40, 90]) if i % 7 else rng.randint(60, 150)
        words = []
        for _ in range(length):
            r = rng.random()
            w = rng.choice(ODD) if r < 0.3 else rng.choice(WORDS)
            if rng.random() < 0.2:
                w = w.upper() if rng.random() < 0.5 else w.capitalize()
            if rng.random() < 0.15:
                w += rng.choice(",.!?;:")
            words.append(w)
        sep = rng.choice([" ", " ", "  ", "\t", " \n "])
        out.append(rng.choice(["", " ", "\n"]) + sep.join(words) + rng.choice(["", " ", "."]))
    out += ["", " ", "a", "A.", "x" * 400, "word " * 200]
    return out


def test_clip_tokenizer_matches_open_clip_tokenize(clip_tok):
    caps = captions()
    assert len(caps) >= 1000
    assert (clip_tok.vocab_size, clip_tok.pad_id, clip_tok.sot_id, clip_tok.eot_id) == (49408, 0, 49406, 49407)
    for length in (16, 77):
        ours = clip_tok.encode(caps, length)
        ref = open_clip.tokenize(caps, context_length=length).numpy()
        bad = [caps[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
        assert not bad, f"{len(bad)} captions differ at length {length}, e.g. {bad[:3]!r}"
    cut = clip_tok.encode(["word " * 200], 16)[0]
    assert cut[0] == 49406 and cut[-1] == 49407  # truncation keeps the end token


def test_clip_tokenizer_is_a_tokenizers_json_converted_once(tmp_path, clip_tok):
    from reclip_ray.data.clip_bpe import clip_tokenizer_file
    from reclip_ray.data.tokenizer import CaptionTokenizer

    path = clip_tokenizer_file(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert clip_tokenizer_file(tmp_path) == path and path.stat().st_mtime_ns == stamp  # not converted again
    # The JSON text alone (what Ray workers get) tokenizes the same.
    again = CaptionTokenizer.from_json(path.read_text())
    caps = captions(200, seed=1)
    assert np.array_equal(again.encode(caps, 77), clip_tok.encode(caps, 77))
    assert clip_tok.decode(clip_tok.encode(["A red circle, on the left!"], 16)[0]) == "a red circle , on the left !"


def test_clip_tokenizer_without_open_clip_is_one_line_error(monkeypatch, tmp_path):
    import importlib.util

    from reclip_ray.data import clip_bpe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing converted yet
    with pytest.raises(DataError) as err:
        load_tokenizer("clip")
    message = str(err.value)
    assert "\n" not in message and "pip install" in message and "openclip" in message
    assert not (tmp_path / "reclip_ray").exists() or not list((tmp_path / "reclip_ray").iterdir())
    assert clip_bpe.CLIP_NAME == "clip"


def test_data_tokenizer_clip_builds_the_model_ids(clip_tok):
    from reclip_ray.train.local import _tokenizer_for

    cfg = load_config("tiny", ["data.tokenizer=clip"])
    tok = _tokenizer_for(cfg, None)
    model = build_model(cfg.model, tokenizer=tok)
    t = model.cfg.text
    assert (t.vocab_size, t.eot_id, t.pad_id) == (49408, 49407, 0)


# --------------------------------------------------------------------------------------------------- 2. export


def compare(model, oc, tok, size: int, length: int, n_images: int = 2) -> tuple[float, float]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(n_images, 3, size, size, generator=g)
    caps = ["a photo of a cat", "Two “striped” squares &amp; a circle, on the LEFT!"]
    tokens = torch.from_numpy(tok.encode(caps, length))
    with torch.no_grad():
        d_img = (model.encode_image(images) - oc.encode_image(images, normalize=True)).abs().max().item()
        padded = torch.nn.functional.pad(tokens, (0, oc.context_length - length), value=tok.pad_id)
        d_txt = (model.encode_text(tokens) - oc.encode_text(padded, normalize=True)).abs().max().item()
    return d_img, d_txt


@pytest.mark.parametrize("preset,pool,size", [("tiny", "cls", None), ("tiny", "avg", 32), ("vit-b-16", "cls", None)])
def test_open_clip_export_loads_and_matches(tmp_path, clip_tok, caplog, preset, pool, size):
    import reclip_ray

    model, cfg = make_model(preset, clip_tok, pool=pool, vectors_only=preset != "tiny")
    out = reclip_ray.export_model(model, clip_tok, cfg, tmp_path / "oc", format="open_clip", image_size=size)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                     "open_clip_model.safetensors", "tokenizer.json"]
    oc = load_open_clip(out, caplog)
    size = size or cfg.phases[-1].image_size
    assert tuple(oc.visual.image_size) == (size, size)
    length = cfg.phases[-1].text_length
    d_img, d_txt = compare(model, oc, clip_tok, size, length)
    print(f"{preset}/{pool}/{size}px: max |diff| image {d_img:.2e}, text {d_txt:.2e}")
    assert d_img < TOL and d_txt < TOL
    # open_clip's own tokenizer for the folder gives our ids.
    oc_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    caps = captions(50, seed=2)
    ctx = cfg.model.text.context_length
    assert np.array_equal(oc_tok(caps).numpy(), clip_tok.encode(caps, ctx))
    assert "open_clip.get_tokenizer" in (out / "README.md").read_text()


def test_open_clip_export_with_project_tokenizer(tmp_path, tokenizer_path, caplog):
    from reclip_ray.openclip import export_open_clip

    tok = load_tokenizer(tokenizer_path)
    model, cfg = make_model("tiny", tok, seed=3)
    out = export_open_clip(model, tok, cfg, tmp_path / "oc")
    doc = json.loads((out / "open_clip_config.json").read_text())
    assert doc["model_cfg"]["text_cfg"]["pool_type"] == "eos" and doc["model_cfg"]["text_cfg"]["eos_id"] == tok.eot_id
    oc = load_open_clip(out, caplog)
    d_img, d_txt = compare(model, oc, tok, 64, 16)
    assert d_img < TOL and d_txt < TOL
    readme = (out / "README.md").read_text()
    assert "load_tokenizer" in readme and f"eot={tok.eot_id}" in readme and "not open_clip.get_tokenizer" in readme


def test_sigmoid_loss_model_exports_its_bias_both_ways(tmp_path, clip_tok, caplog):
    """train.loss=siglip: open_clip's config gets ``init_logit_bias`` (so its CLIP has the parameter) and the trained
    bias and scale load exactly, in ``create_model_and_transforms("local-dir:...")`` and in our own export."""
    import reclip_ray
    from reclip_ray.openclip import from_open_clip_state, open_clip_model_cfg, to_open_clip_state

    cfg = load_config("tiny", ["train.loss=siglip"])
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer=clip_tok).eval()
    perturb(model)  # the bias moves off its init: the trained value must travel with the weights
    bias, scale = model.logit_bias.item(), model.logit_scale.item()
    assert bias != -10.0
    out = reclip_ray.export_model(model, clip_tok, cfg, tmp_path / "oc", format="open_clip")
    doc = json.loads((out / "open_clip_config.json").read_text())
    assert doc["model_cfg"]["init_logit_bias"] == pytest.approx(bias)
    oc = load_open_clip(out, caplog)
    assert (oc.logit_bias.item(), oc.logit_scale.item()) == (bias, scale)
    size, length = cfg.phases[-1].image_size, cfg.phases[-1].text_length
    d_img, d_txt = compare(model, oc, clip_tok, size, length)
    assert d_img < TOL and d_txt < TOL
    theirs = to_open_clip_state(model, size)
    assert set(theirs) == set(open_clip.CLIP(**open_clip_model_cfg(model, size)).state_dict())
    assert torch.equal(from_open_clip_state(theirs)[0]["logit_bias"], model.logit_bias.detach())
    # A CLIP-loss model has no bias and its config none (open_clip then builds no such parameter).
    plain, _ = make_model("tiny", clip_tok)
    assert "init_logit_bias" not in open_clip_model_cfg(plain, 64) and "logit_bias" not in to_open_clip_state(plain, 64)
    # reclip-ray's own export reloads the same bias (config.yaml keeps train.loss and model.init_logit_bias).
    again, _ = reclip_ray.load_model(reclip_ray.export_model(model, clip_tok, cfg, tmp_path / "ours"))
    assert again.logit_bias.item() == bias


def test_mapping_covers_every_weight_both_ways(clip_tok):
    """Every reclip-ray weight has exactly one open_clip name (the key set open_clip's CLIP has), and back."""
    from reclip_ray.openclip import from_open_clip_state, open_clip_model_cfg, to_open_clip_state

    for pool in ("cls", "avg"):
        model, _ = make_model("tiny", clip_tok, pool=pool)
        theirs = to_open_clip_state(model, 64)
        oc = open_clip.CLIP(**open_clip_model_cfg(model, 64))
        assert set(theirs) == set(oc.state_dict())
        assert all(theirs[k].shape == v.shape for k, v in oc.state_dict().items())
        back, unused = from_open_clip_state(theirs, pool=pool)
        ours = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.norm." if pool == "avg"
                                                                                   else "visual.fc_norm.")}
        assert not unused and set(back) == set(ours)
        assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_patch_embed_bias_is_folded_exactly(tmp_path):
    """A timm ViT whose patch embedding has a bias computes the same features once loaded (bias -> positions)."""
    from timm.models.vision_transformer import VisionTransformer

    from reclip_ray.init_weights import init_from

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=0,
                            pre_norm=True).eval()
    old = vit.patch_embed.proj
    vit.patch_embed.proj = torch.nn.Conv2d(3, 128, 8, 8, bias=True)
    with torch.no_grad():
        vit.patch_embed.proj.weight.copy_(old.weight)
    perturb(vit, 4)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    assert "patch_embed.proj.bias" in state
    model = build_model(load_config("tiny").model, vocab_size=100, eot_id=2, pad_id=0).eval()
    torch.save(state, tmp_path / "vit.pth")
    line = init_from(model, tmp_path / "vit.pth")
    assert "(timm)" in line and "missing" in line
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.visual(x) - vit(x)).abs().max().item() < 1e-5


def test_cli_export(tmp_path, clip_tok, capsys):
    from reclip_ray.cli import main
    from reclip_ray.export import export_model

    model, cfg = make_model("tiny", clip_tok)
    src = export_model(model, clip_tok, cfg, tmp_path / "model")
    assert main(["export", str(src), "--format", "open_clip", "--out", str(tmp_path / "oc"), "--image-size", "48"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["image_size"] == 48 and printed["tokenizer"] == "clip"
    assert (tmp_path / "oc" / "open_clip_model.safetensors").is_file()
    assert main(["export", str(src), "--out", str(tmp_path / "bad"), "--image-size", "50"]) == 2  # not 8k
    assert "multiple of the model's patch size" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- 3. init_from


def random_open_clip(seed: int = 1) -> tuple[torch.nn.Module, dict]:
    """A randomly initialised open_clip CLIP shaped like `tiny` but on a 96 px grid with a 40-token context."""
    cfg = dict(embed_dim=128,
               vision_cfg=dict(image_size=96, patch_size=8, width=128, layers=4, head_width=32,
                               norm_kwargs={"eps": 1e-6}),
               text_cfg=dict(context_length=40, vocab_size=49408, width=128, heads=4, layers=3))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    perturb(model, seed)
    return model, cfg


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_init_from_open_clip_checkpoint(tmp_path, clip_tok, suffix):
    from safetensors.torch import save_file

    from reclip_ray.init_weights import init_from

    oc, oc_cfg = random_open_clip()
    path = tmp_path / f"open_clip{suffix}"
    state = {k: v.contiguous() for k, v in oc.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif suffix == ".bin":
        torch.save(state, path)
    else:  # a training checkpoint: wrapped, saved from DDP
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model, _ = make_model("tiny", clip_tok, seed=5)
    line = init_from(model, path)
    assert "\n" not in line and "(open_clip)" in line
    n = len(model.state_dict())
    assert f"loaded {n}/{n}" in line and "missing 0" in line and "unexpected 0" in line
    assert "visual.pos_embed 12x12->8x8" in line and "text.positional_embedding 40->32" in line
    # Same features as open_clip's own model on the same grid (open_clip resizes its grid the same way).
    at64 = open_clip.CLIP(**{**oc_cfg, "vision_cfg": {**oc_cfg["vision_cfg"], "image_size": 64}}).eval()
    sd = oc.state_dict()
    open_clip.model.resize_pos_embed(sd, at64)
    at64.load_state_dict(sd)
    d_img, d_txt = compare(model.eval(), at64, clip_tok, 64, 32)
    assert d_img < TOL and d_txt < TOL


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_init_from_open_clip_export_and_reclip_export(tmp_path, clip_tok, pool):
    from reclip_ray.export import export_model
    from reclip_ray.init_weights import init_from
    from reclip_ray.openclip import export_open_clip

    src, cfg = make_model("tiny", clip_tok, pool=pool, seed=6)
    fresh, _ = make_model("tiny", clip_tok, pool=pool, seed=7)
    line = init_from(fresh, export_model(src, clip_tok, cfg, tmp_path / "model"))
    assert "(reclip-ray)" in line
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), src.state_dict().values()))
    other, _ = make_model("tiny", clip_tok, pool=pool, seed=8)
    line = init_from(other, export_open_clip(src, clip_tok, cfg, tmp_path / "oc"))  # a local-dir folder
    assert "(open_clip)" in line and "unexpected 0" in line
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), src.state_dict().values()))


def test_init_from_timm_vit_loads_the_image_tower_only(tmp_path):
    import timm

    from reclip_ray.init_weights import init_from

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)  # 192 wide, 12 deep, 3 heads
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    cfg = load_config("tiny", ["model.vision.patch_size=16", "model.vision.width=192", "model.vision.depth=12",
                               "model.vision.heads=3", "model.vision.base_image_size=64"])
    model = build_model(cfg.model, vocab_size=300, eot_id=2, pad_id=0)
    before = model.text.token_embedding.weight.clone()
    line = init_from(model, tmp_path / "vit.pth")
    assert "(timm)" in line and "unexpected 2 (visual.head.weight, visual.head.bias)" in line
    assert "text: " in line and "visual: 2" in line  # text tower and norm_pre (plain timm ViTs have none) missing
    assert "visual.pos_embed 14x14->4x4" in line
    assert torch.equal(model.visual.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    assert torch.equal(model.text.token_embedding.weight, before)
    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)  # 384 wide: nothing fits
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="nothing in"):
        init_from(model, tmp_path / "small.pth")


def test_init_from_missing_path_is_a_config_error(tmp_path, synth_dir, tokenizer_path):
    from reclip_ray.train.local import train_local

    cfg = load_config("tiny", [f"model.init_from={tmp_path / 'nope.safetensors'}", f"data.train={synth_dir / 'train'}"])
    with pytest.raises(ConfigError) as err:
        train_local(cfg, tokenizer=tokenizer_path, max_steps=1, log=None)
    assert "'model.init_from'" in str(err.value) and "\n" not in str(err.value)


def test_init_from_in_train_local_logs_one_line(tmp_path, synth_dir, clip_tok):
    from reclip_ray.openclip import export_open_clip
    from reclip_ray.train.local import train_local

    src, cfg = make_model("tiny", clip_tok, seed=9)
    folder = export_open_clip(src, clip_tok, cfg, tmp_path / "oc", image_size=32)
    lines: list[str] = []
    run = load_config("tiny", ["data.tokenizer=clip", f"model.init_from={folder}", f"data.train={synth_dir / 'train'}",
                               "train.batch_size=8", "model.vision.depth=4"])
    train_local(run, max_steps=1, log=lines.append)
    assert [ln for ln in lines if ln.startswith("init_from")] and "visual.pos_embed 4x4->8x8" in lines[0]


def test_prepare_checks_init_from_only_for_a_fresh_run(tmp_path, synth_dir, tokenizer_path):
    from reclip_ray.run_names import CHECKPOINT_SNAPSHOT
    from reclip_ray.train.prepare import prepare

    def cfg(name: str):
        return load_config("tiny", [f"run.name={name}", f"run.storage_path={tmp_path / 'runs'}",
                                    f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}",
                                    f"data.tokenizer={tokenizer_path}", f"tracking.uri={tmp_path / 'mlflow.db'}",
                                    f"model.init_from={tmp_path / 'nope.pt'}"])

    with pytest.raises(ConfigError, match="'model.init_from' not found"):
        prepare(cfg("fresh"))
    # With a checkpoint to resume from, the checkpoint wins and the (now missing) init_from is not needed.
    run_dir = tmp_path / "runs" / "resumed"
    (run_dir / "checkpoint_s1").mkdir(parents=True)
    (run_dir / "checkpoint_s1" / "meta.json").write_text("{}")
    (run_dir / CHECKPOINT_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result":
                                                           {"checkpoint_dir_name": "checkpoint_s1"}}))
    prepare(cfg("resumed"))


# --------------------------------------------------------------------------------------------------- 4. evaluation


@pytest.mark.parametrize("tokenizer", ["clip", "project"])
def test_eval_open_clip_export_equals_reclip_model(tmp_path, synth_dir, tokenizer_path, clip_tok, tokenizer, capsys):
    from reclip_ray.cli import main
    from reclip_ray.evaluation.checkpoint import evaluate_checkpoint
    from reclip_ray.export import export_model

    tok = clip_tok if tokenizer == "clip" else load_tokenizer(tokenizer_path)
    model, cfg = make_model("tiny", tok, seed=11)
    perturb(model, 12, scale=0.3)  # far from init: zero-shot no longer puts every image in one class
    ours = export_model(model, tok, cfg, tmp_path / "model")
    theirs = export_model(model, tok, cfg, tmp_path / "oc", format="open_clip")
    data = str(synth_dir / "eval")
    a = evaluate_checkpoint(str(ours), data, batch_size=64, device="cpu")
    assert main(["eval", "--checkpoint", str(theirs), "--data", data, "--batch-size", "64"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert (a["image_size"], a["text_length"]) == (b["image_size"], b["text_length"]) == (64, 32)
    assert set(a["metrics"]) == set(b["metrics"]) and any("top1" in k for k in a["metrics"])
    assert any("r@1" in k for k in a["metrics"])
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_eval_of_an_open_clip_folder_normalises_with_its_own_mean_and_std(tmp_path, clip_tok):
    """A folder whose ``preprocess_cfg`` says mean = std = 0.5 (SigLIP, many timm towers) was fed pixels normalised
    with CLIP's constants; ``reclip-ray eval`` now gives its image tower what open_clip's own transform does."""
    from reclip_ray.export import export_model
    from reclip_ray.openclip import OPEN_CLIP_CONFIG, load_open_clip_export
    from reclip_ray.pixels import normalize_images

    model, cfg = make_model("tiny", clip_tok, seed=3)
    perturb(model, 4, scale=0.3)
    folder = Path(export_model(model, clip_tok, cfg, tmp_path / "oc", format="open_clip"))
    doc = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    del doc["reclip_ray"]  # as open_clip's own folders are
    doc["preprocess_cfg"].update(mean=[0.5] * 3, std=[0.5] * 3)
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(doc))
    ours, _, loaded = load_open_clip_export(folder)
    size = loaded.eval.full_image_size
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8))
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    normalise = preprocess.transforms[-1]
    assert (list(normalise.mean), list(normalise.std)) == ([0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        got = ours.encode_image(normalize_images(pixels))
        want = reference.eval().encode_image(normalise(pixels.permute(0, 3, 1, 2).float() / 255), normalize=True)
        as_before = reference.encode_image(normalize_images(pixels), normalize=True)
    assert (got - want).abs().max() < TOL
    assert (as_before - want).abs().max() > 100 * TOL  # what it was fed before: the check has teeth


def noise_pngs(sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    """PNGs of random pixels (interpolations differ on them; no JPEG draft decode in the way) of the given sizes."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# Sizes whose shorter side scales to 64 px exactly with crop offsets of whole pixels, and sizes where open_clip's
# 'shortest' rounds the resized long side down (100 x 137: 87.68 px, 87) or its crop offset to whole pixels (65 x 200:
# 196.9 px, 196, a margin of 132, an offset of 66; 641 x 480: 85.47, 85, 10.5, 10), where the exact centre square of
# reclip-ray's own eval crop is fed other pixels.
EVAL_SIZES = [(96, 120), (120, 96), (128, 160), (160, 128), (96, 96), (192, 240), (100, 137), (137, 100), (65, 200),
              (641, 480)]


@pytest.mark.parametrize("mode, interpolation", [("squash", "bilinear"), ("squash", "bicubic"),
                                                 ("shortest", "bilinear"), ("shortest", "bicubic"),
                                                 ("longest", "bilinear"), ("longest", "bicubic")])
def test_eval_of_an_open_clip_folder_resizes_as_its_preprocess_cfg_says(tmp_path, clip_tok, monkeypatch, mode,
                                                                         interpolation):
    """A folder whose ``preprocess_cfg`` says ``resize_mode: squash`` or ``interpolation: bilinear`` was evaluated on
    bicubic centre crops all the same. `reclip-ray eval` now gives its image tower the pixels open_clip's own
    transform makes of each image (torchvision's Resize / CenterCrop on PIL images, then ToTensor); ``longest``
    (refused before) with the folder's ``fill_color`` in its margins."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from open_clip.transform import ResizeKeepRatio
    from torchvision.transforms import Compose, InterpolationMode, Resize

    from reclip_ray.data.images import decode_image
    from reclip_ray.evaluation.checkpoint import evaluate_checkpoint
    from reclip_ray.export import export_model
    from reclip_ray.openclip import OPEN_CLIP_CONFIG, OpenClipModel
    from reclip_ray.pixels import CLIP_MEAN, CLIP_STD

    model, cfg = make_model("tiny", clip_tok, seed=6)
    folder = Path(export_model(model, clip_tok, cfg, tmp_path / "oc", format="open_clip"))
    doc = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    del doc["reclip_ray"]  # as open_clip's own folders are
    doc["preprocess_cfg"].update(resize_mode=mode, interpolation=interpolation, fill_color=200)
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(doc))
    images = noise_pngs(EVAL_SIZES)
    data = tmp_path / "eval"
    data.mkdir()
    pq.write_table(pa.table({"key": [str(i) for i in range(len(images))], "image": images,
                             "caption": [f"photo {i}" for i in range(len(images))]}), data / "part-0.parquet")

    seen: list[torch.Tensor] = []
    encode = OpenClipModel.encode_image
    monkeypatch.setattr(OpenClipModel, "encode_image",
                        lambda self, x, normalize=True: seen.append(x.clone()) or encode(self, x, normalize))
    out = evaluate_checkpoint(str(folder), str(data), batch_size=64, device="cpu")
    assert out["image_size"] == 64 and out["metrics"]["images"] == len(images)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    got = torch.cat(seen) * std + mean  # the pixels in [0, 1], before normalisation

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    resize = preprocess.transforms[0]
    assert resize.interpolation == InterpolationMode[interpolation.upper()]  # the folder's settings reached open_clip
    if mode == "longest":
        assert isinstance(resize, ResizeKeepRatio) and resize.longest == 1 and preprocess.transforms[1].fill == 200
    else:
        assert isinstance(resize, Resize) and resize.size == ((64, 64) if mode == "squash" else 64)
    to_pixels = Compose(preprocess.transforms[:-1])  # all but Normalize: resize (+ crop), RGB, ToTensor
    want = torch.stack([to_pixels(Image.open(io.BytesIO(b))) for b in images])
    assert (got - want).abs().max() < 1e-5
    before = torch.stack([torch.tensor(decode_image(b, 64, train=False)).permute(2, 0, 1) / 255 for b in images])
    assert (before - want).abs().max() > 0.1  # what the folder was fed before (shortest: the exact centre): teeth


HIDDEN = (200, 30, 60)  # the colour under fully transparent pixels: neither white nor black


def transparent_images(w: int, h: int, seed: int = 0) -> dict[str, bytes]:
    """An RGBA PNG whose top third is fully transparent over ``HIDDEN`` (the rest noise, alpha 0-255), the same as
    LA, a P PNG whose transparent index (255) is ``HIDDEN`` in the palette, the same P PNG without transparency, a
    16-bit grey PNG (``I;16``), and an RGB JPEG as the control."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgb[: h // 3], alpha[: h // 3] = HIDDEN, 0
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    index = rng.integers(0, 255, (h, w), dtype=np.uint8)
    index[: h // 3] = 255
    palette = Image.fromarray(index, "P")
    palette.putpalette([*rng.integers(0, 256, 255 * 3).tolist(), *HIDDEN])

    def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    grey16 = Image.fromarray(rng.integers(0, 1024, (h, w)).astype(np.uint16))  # a quarter of values <= 255
    return {"RGBA": encode(rgba), "LA": encode(rgba.convert("LA")), "P": encode(palette, transparency=255),
            "P opaque": encode(palette), "I;16": encode(grey16),
            "JPEG": encode(Image.fromarray(rgb), "JPEG", quality=90)}


@pytest.mark.parametrize("mode", ["shortest", "longest"])
def test_eval_of_an_open_clip_folder_converts_transparent_images_as_open_clip_does(tmp_path, clip_tok, monkeypatch,
                                                                                  mode):
    """Transparent images were composited onto white for every model, where open_clip's ``preprocess`` resizes the
    image in its own mode (PIL premultiplies RGBA and LA, resizes P nearest) and then converts it with
    ``convert("RGB")``, dropping alpha: its fully transparent pixels are black once resized and their hidden colour
    where the image is already the size. An open_clip folder's eval now gets exactly its ``preprocess``'s pixels for
    RGBA, LA and P-with-transparency PNGs (``longest``: padded in the image's own mode, a palette index in P), and
    for a palette PNG (resized nearest) and a 16-bit one (clipped at 255, not scaled); the same eval set scored with
    reclip-ray's own export is still composited onto white."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from reclip_ray.evaluation.checkpoint import evaluate_checkpoint
    from reclip_ray.export import export_model
    from reclip_ray.model import CLIP
    from reclip_ray.openclip import OPEN_CLIP_CONFIG, OpenClipModel
    from reclip_ray.pixels import CLIP_MEAN, CLIP_STD
    from torchvision.transforms import Compose

    model, cfg = make_model("tiny", clip_tok, seed=8)
    folder = Path(export_model(model, clip_tok, cfg, tmp_path / "oc", format="open_clip"))
    doc = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    doc["preprocess_cfg"].update(resize_mode=mode, fill_color=200)
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(doc))
    ours = export_model(model, clip_tok, cfg, tmp_path / "model")
    sizes = [(100, 137), (64, 64), (150, 61)]  # resized (shrunk), already the size, shrunk and (longest) padded
    cases = [(size, name, data) for size in sizes for name, data in transparent_images(*size).items()
             if name != "JPEG" or mode == "shortest" or max(size) < 128]  # a JPEG >= 2x the square is draft-decoded:
    # close to open_clip's pixels, not equal (test_longest_resize_of_a_large_jpeg_is_draft_decoded_near_open_clips...)
    images = [data for _, _, data in cases]
    data_dir = tmp_path / "eval"
    data_dir.mkdir()
    pq.write_table(pa.table({"key": [str(i) for i in range(len(images))], "image": images,
                             "caption": [f"photo {i}" for i in range(len(images))]}), data_dir / "part-0.parquet")

    seen: list[torch.Tensor] = []
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    for cls in (OpenClipModel, CLIP):
        encode = cls.encode_image

        def recorded(self, x, normalize=True, encode=encode):
            seen.append(x.clone())
            return encode(self, x, normalize)

        monkeypatch.setattr(cls, "encode_image", recorded)
    out = evaluate_checkpoint(str(folder), str(data_dir), batch_size=64, device="cpu")
    assert out["image_size"] == 64 and out["metrics"]["images"] == len(images)
    got = torch.cat(seen) * std + mean  # the pixels in [0, 1], before normalisation
    seen.clear()
    evaluate_checkpoint(str(ours), str(data_dir), batch_size=64, device="cpu")
    own = torch.cat(seen) * std + mean

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    to_pixels = Compose(preprocess.transforms[:-1])  # all but Normalize: resize, crop or pad, RGB, ToTensor
    for i, ((w, h), name, data) in enumerate(cases):
        want = to_pixels(Image.open(io.BytesIO(data)))
        assert (got[i] - want).abs().max() < 1e-5, (name, w, h, mode, float((got[i] - want).abs().max() * 255))
        if name == "I;16":  # clipped at 255, as PIL's convert("RGB") does, where the own eval scales 16 bits
            assert want.max() == 1.0 and own[i].max() < 0.1, (w, h)  # values up to 1023: 255 here, 4 there
        if name not in ("RGBA", "LA", "P"):
            continue
        row = (64 - round(64 * h / w)) // 2 if mode == "longest" and w > h else 0  # below the margin, if any
        top = (want[:, row, 31] * 255).round().int().tolist()  # the image's first row: transparent in the source
        hidden = Image.new("RGB", (1, 1), HIDDEN).convert("L" if name == "LA" else "RGB").convert("RGB")  # LA: grey
        hidden = list(hidden.getpixel((0, 0)))
        # open_clip: black where resized (premultiplied), the hidden colour where not, or resized nearest (P)
        assert top == (hidden if (w, h) == (64, 64) or name == "P" else [0, 0, 0]), (name, w, h, top)
        white = (own[i][:, 0, 31] * 255).round().int().tolist()
        assert white == [255, 255, 255], (name, w, h, white)  # reclip-ray's own models: composited onto white
        if mode == "longest" and w > h:  # the margin: fill_color 200 in every band, in P the palette's entry 200
            margin = (want[:, 0, 31] * 255).round().int().tolist()
            palette = Image.open(io.BytesIO(data)).getpalette() or []
            assert margin == (palette[600:603] if name == "P" else [200] * 3), (name, margin)


# Odd, wide, tall, tiny, square, near-square and much larger than the square; with 64, 224 and odd output sizes
# they cover both roundings (the long side down, a crop offset of a half to the even pixel) and enlarging: 2 x 150
# to 224 x 16800 px, just under the bound on what is made whole (WHOLE_RESIZE_PIXELS, the test after next).
ANY_SIZES = [(100, 137), (137, 100), (333, 250), (65, 200), (37, 41), (641, 480), (1, 1), (3, 7), (7, 3), (2, 150),
             (150, 2), (64, 64), (224, 224), (225, 223), (500, 375), (999, 1001), (1, 50), (127, 64), (64, 127)]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_pixels_are_open_clips_squashed_or_cropped_at_any_size(interpolation):
    """README (Evaluate like CLIP_benchmark): the test above picks some sizes; here ``squash`` and ``shortest`` give
    open_clip's pixels at any size, 0 of 255 apart. ``shortest`` did not: torchvision rounds the resized long side
    down and the crop's offsets to whole pixels, and the eval decode cropped the exact centre square (0.475 of the
    range apart on a 100 x 137 PNG). reclip-ray's own models keep that exact-centre crop (their numbers were
    measured with it): the default ``EvalResize`` still crops so."""
    import io

    from open_clip.transform import image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    from reclip_ray.data.images import _crop_box, decode_image
    from reclip_ray.openclip import eval_resize

    def pixels(data: bytes, mode: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        transform = image_transform(size, is_train=False, resize_mode=mode, interpolation=interpolation)
        want = (Compose(transform.transforms[:-1])(Image.open(io.BytesIO(data))) * 255).round()  # all but Normalize
        resize = eval_resize({"resize_mode": mode, "interpolation": interpolation}, "cfg")
        got = decode_image(data, size, train=False, resize=resize)
        return got.astype(np.int16), want.to(torch.int16).permute(1, 2, 0).numpy()

    for (w, h), data in zip(ANY_SIZES, noise_pngs(ANY_SIZES, seed=5)):
        for size in (64, 224, 33):
            for mode in ("squash", "shortest"):
                got, want = pixels(data, mode, size)
                assert got.shape == want.shape == (size, size, 3)
                assert np.abs(got - want).max() == 0, (w, h, size, mode)
    data = noise_pngs([(100, 137)])[0]  # the long side resized to 87.68 px, rounded to 87
    _, want = pixels(data, "shortest", 64)
    own = decode_image(data, 64, train=False)  # reclip-ray's own eval crop: the exact centre square, one box resize
    img = Image.open(io.BytesIO(data)).convert("RGB")
    centre = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC, box=_crop_box(100, 137, train=False)))
    assert np.array_equal(own, centre) and np.abs(own.astype(np.int16) - want).max() > 50


def test_shortest_resize_drafts_a_large_jpeg_and_resizes_a_large_png_with_alpha_as_open_clip_does(monkeypatch):
    """A large JPEG is still draft-decoded (DCT scaling) when cropped as open_clip crops: the crop's shorter side
    against the square, 768 / 64 = 12, so 1/8 in the decoder for a 1024 x 768 photo, and its pixels are within 1 of
    255 on average of open_clip's transform on the full image (measured: 0.40), where the exact-centre crop was 5.9
    apart. A large image with alpha is no longer reduced before it is resized (``_rgb_reduced``: 1500 / (3 * 64) = 7
    for a 2000 x 1500 RGBA PNG, 0.13 apart on an opaque one): open_clip resizes it whole in its own mode, and a
    reduction first rounds twice, so it is resized whole here too, and its pixels are open_clip's, 0 apart, its
    transparent rows black as open_clip makes them."""
    import io

    from open_clip.transform import image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    from reclip_ray.data import images
    from reclip_ray.openclip import eval_resize

    rng = np.random.default_rng(0)

    def photo(w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        smooth = np.stack([xx * 255, yy * 600 % 255, (1 - xx) * 200], -1) + 40 * np.sin(xx * 40)[..., None]
        return np.clip(smooth + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)

    def encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **kw)
        return buf.getvalue()

    jpeg = encode(photo(1024, 768), "JPEG", quality=90)
    rgb, alpha = photo(2000, 1500), rng.integers(0, 256, (1500, 2000), dtype=np.uint8)
    rgb[:500], alpha[:500] = HIDDEN, 0
    rgba = encode(np.dstack([rgb, alpha]), "PNG")
    drafts: list[int] = []
    reductions: list[int] = []
    draft, reduce = images._draft, images._rgb_reduced
    monkeypatch.setattr(images, "_draft", lambda *a: drafts.append(draft(*a)) or drafts[-1])
    monkeypatch.setattr(images, "_rgb_reduced", lambda *a: reductions.append(reduce(*a)[1]) or reduce(*a))
    to_pixels = Compose(image_transform(64, is_train=False, resize_mode="shortest").transforms[:-1])
    resize = eval_resize({"resize_mode": "shortest"}, "cfg")
    for data, drafted, bound in ((jpeg, [8], 1.0), (rgba, [1], 0.0)):
        drafts.clear(), reductions.clear()
        got = images.decode_image(data, 64, train=False, resize=resize).astype(np.int16)
        assert (drafts, reductions) == (drafted, [])
        want = (to_pixels(Image.open(io.BytesIO(data))) * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
        centre = images.decode_image(data, 64, train=False).astype(np.int16)
        assert np.abs(got - want).max() <= 255 * bound and np.abs(got - want).mean() <= bound
        assert np.abs(centre - want).mean() > 5.0
    assert (got[0] == 0).all()  # the transparent rows: black, where reclip-ray's own eval composites them white
    assert [*reductions] == [7] and (centre[0] == 255).all()


def test_shortest_resize_bounds_the_image_it_makes_before_cropping(monkeypatch):
    """open_clip resizes the whole image, then crops: size x size * aspect px, which for a small, very long image
    is far more than the image (a 4 x 550 PNG at 224 px: 224 x 30800 px; 1 x 89M px: 224 x 20G). The eval decode
    makes it whole only while it is no larger than the decoded image or ``WHOLE_RESIZE_PIXELS``; past that it
    resizes the crop alone, and the pixels are close to open_clip's, not equal (README; measured here)."""
    import io

    from open_clip.transform import image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    from reclip_ray.data import images
    from reclip_ray.openclip import eval_resize

    made: list[int] = []
    resize_image = Image.Image.resize

    def recorded(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        made.append(size[0] * size[1])
        return resize_image(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    resize = eval_resize({"resize_mode": "shortest"}, "cfg")
    for w, h in ((4, 550), (550, 4)):
        data = noise_pngs([(w, h)], seed=2)[0]
        made.clear()
        got = images.decode_image(data, 224, train=False, resize=resize).astype(np.int16)
        assert max(made) <= images.WHOLE_RESIZE_PIXELS, made
        want = Compose(image_transform(224, is_train=False, resize_mode="shortest").transforms[:-1])(
            Image.open(io.BytesIO(data)))
        diff = np.abs(got - (want * 255).round().to(torch.int16).permute(1, 2, 0).numpy())
        assert diff.mean() < 1.0, (w, h, diff.mean())
    # Shrunk, it is made whole past WHOLE_RESIZE_PIXELS (smaller than the image held): 230 x 20000 to 224 x 19478
    rows = (np.arange(20000) % 251).astype(np.uint8)[:, None, None]
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(rows, (20000, 230, 3)).copy()).save(buf, "PNG")
    made.clear()
    got = images.decode_image(buf.getvalue(), 224, train=False, resize=resize)
    assert made == [224 * 19478] and made[0] > images.WHOLE_RESIZE_PIXELS
    want = Compose(image_transform(224, is_train=False, resize_mode="shortest").transforms[:-1])(Image.open(buf))
    assert np.array_equal(got, (want * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("field, value, message", [
    ("resize_mode", "crop", "preprocess_cfg resize_mode 'crop' is not supported by reclip-ray eval, which resizes "
                            "'shortest', 'squash', 'longest'"),
    ("interpolation", "nearest", "preprocess_cfg interpolation 'nearest' is not supported by reclip-ray eval, which "
                                 "resizes 'bicubic' or 'bilinear'"),
    ("fill_color", 300, "preprocess_cfg fill_color 300 is not a colour reclip-ray eval pads with (an integer 0-255, "
                        "or a list of 3)"),
    ("fill_color", [0, 0], "preprocess_cfg fill_color [0, 0] is not a colour reclip-ray eval pads with (an integer "
                           "0-255, or a list of 3)"),
])
def test_eval_refuses_a_resize_it_cannot_make_in_one_line(tmp_path, clip_tok, synth_dir, capsys, field, value,
                                                           message):
    """A resize mode, interpolation or padding colour the eval decode cannot make: one line, not a model scored on
    other pixels than its own transform's."""
    from reclip_ray.cli import main
    from reclip_ray.export import export_model
    from reclip_ray.openclip import OPEN_CLIP_CONFIG

    model, cfg = make_model("tiny", clip_tok, seed=7)
    folder = Path(export_model(model, clip_tok, cfg, tmp_path / "oc", format="open_clip"))
    doc = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    doc["preprocess_cfg"][field] = value
    if field == "fill_color":  # read where open_clip pads, and only there
        doc["preprocess_cfg"]["resize_mode"] = "longest"
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder), "--data", str(synth_dir / "eval")]) == 2
    assert capsys.readouterr().err == f"reclip-ray: error: {folder / OPEN_CLIP_CONFIG}: {message}\n"


# Wide, tall, square, smaller than 64 px on both sides, smaller on one, and margins of an odd width (open_clip puts
# the odd pixel after the image): (64, 31) pads 33 rows, (150, 61) resizes to 64 x 26, a 61 px wide one to 26 x 64.
LONGEST_SIZES = [(160, 96), (96, 160), (128, 128), (40, 24), (24, 50), (150, 61), (61, 150), (64, 31), (200, 3)]


@pytest.mark.parametrize("interpolation, fill", [("bicubic", 0), ("bilinear", 255), ("bicubic", [255, 128, 7])])
def test_longest_resize_makes_open_clips_pixels(interpolation, fill):
    """``resize_mode: longest`` was refused. Now the eval decode resizes the longer side to the square's, keeps the
    aspect and centre-pads with ``fill_color``: on PNGs, exactly (0 of 255 apart) the pixels of open_clip's own
    transform (``ResizeKeepRatio(longest=1)``, ``CenterCropOrPad(fill=fill_color)``, torchvision on PIL images)."""
    import io

    from open_clip.transform import CenterCropOrPad, ResizeKeepRatio, image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    from reclip_ray.data.images import decode_image
    from reclip_ray.openclip import eval_resize

    preprocess = image_transform(64, is_train=False, resize_mode="longest", interpolation=interpolation,
                                 fill_color=fill)
    assert isinstance(preprocess.transforms[0], ResizeKeepRatio) and isinstance(preprocess.transforms[1],
                                                                                CenterCropOrPad)
    to_pixels = Compose(preprocess.transforms[:-1])  # all but Normalize
    resize = eval_resize({"resize_mode": "longest", "interpolation": interpolation, "fill_color": fill}, "cfg")
    rgb = tuple(fill) if isinstance(fill, list) else (fill,) * 3
    assert resize.fill == rgb
    for (w, h), data in zip(LONGEST_SIZES, noise_pngs(LONGEST_SIZES, seed=3)):
        got = decode_image(data, 64, train=False, resize=resize)
        want = (to_pixels(Image.open(io.BytesIO(data))) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert got.shape == want.shape == (64, 64, 3)
        assert np.abs(got.astype(np.int16) - want).max() == 0, (w, h)
        if w != h:  # the margin is there, in the folder's colour: the check is not of two crops
            assert (got[0, 0] == rgb).all() and (got[-1, -1] == rgb).all(), (w, h)


def test_images_open_clip_cannot_preprocess_get_the_nearest_pixels():
    """Two inputs open_clip's transform raises on: a premultiplied grey image (La, a TIFF's associated alpha:
    "conversion from La to L not supported") is unpremultiplied, then converted; a ``longest`` fill_color that is a
    colour, on an image without three bands (torchvision: "number of elements in 'fill' does not match"), pads the
    converted image in that colour. Neither is dropped as a bad image."""
    import io

    from open_clip.transform import image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    from reclip_ray.data.images import decode_image, open_clip_rgb
    from reclip_ray.openclip import eval_resize

    rng = np.random.default_rng(4)
    la = Image.fromarray(rng.integers(0, 256, (20, 30, 2), dtype=np.uint8), "LA").convert("La")
    with pytest.raises(ValueError, match="conversion from La to L not supported"):
        la.convert("RGB")
    assert np.array_equal(np.asarray(open_clip_rgb(la)), np.asarray(la.convert("LA").convert("RGB")))

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 128), dtype=np.uint8), "L").save(buf, "PNG")
    with pytest.raises(ValueError, match="number of elements in 'fill'"):
        Compose(image_transform(64, is_train=False, resize_mode="longest", fill_color=[255, 128, 7]).transforms[:-1])(
            Image.open(io.BytesIO(buf.getvalue())))
    got = decode_image(buf.getvalue(), 64, train=False,
                       resize=eval_resize({"resize_mode": "longest", "fill_color": [255, 128, 7]}, "cfg"))
    grey = Compose(image_transform(64, is_train=False, resize_mode="longest").transforms[:-1])(
        Image.open(io.BytesIO(buf.getvalue())))  # 64 x 20 of image between 22 rows of margin above and below
    grey = (grey * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (got[:22] == (255, 128, 7)).all() and (got[42:] == (255, 128, 7)).all()
    assert np.array_equal(got[22:42], grey[22:42])


def test_longest_resize_of_a_large_jpeg_is_draft_decoded_near_open_clips_pixels(monkeypatch):
    """A JPEG far larger than the square is draft-decoded (DCT scaling) by what the resize shrinks it by: the longer
    side's shrink, 1024 / 64 = 16 for a 1024 x 384 photo, so 1/8 in the decoder (the shorter side against the whole
    square, 384 / 64 = 6, would decode 1/4 of it, 4x the pixels). Its pixels stay within 2 of 255 on average of
    open_clip's transform on the full decode, the bound the shortest-side draft is held to (test_data_images)."""
    import io

    from open_clip.transform import image_transform
    from PIL import Image
    from torchvision.transforms import Compose

    from reclip_ray.data import images
    from reclip_ray.openclip import eval_resize

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:384, 0:1024] / 1024
    photo = np.clip(np.stack([xx * 255, yy * 600, (1 - xx) * 200], -1) + rng.normal(0, 4, (384, 1024, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(photo.astype(np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    out = images.fit_longest(1024, 384, 64)
    assert out == (64, 24)
    drafts: list[int] = []
    draft = images._draft
    monkeypatch.setattr(images, "_draft", lambda *a: drafts.append(draft(*a)) or drafts[-1])
    resize = eval_resize({"resize_mode": "longest", "fill_color": 128}, "cfg")
    got = images.decode_image(data, 64, train=False, resize=resize).astype(np.int16)
    assert drafts == [8]
    to_pixels = Compose(image_transform(64, is_train=False, resize_mode="longest", fill_color=128).transforms[:-1])
    want = (to_pixels(Image.open(io.BytesIO(data))) * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
    assert (got[:20] == 128).all() and (got[44:] == 128).all()  # 20 rows of margin above, 20 below
    assert np.abs(got - want).mean() < 2.0
