"""Export / load round trip and refusal of unsafe pickles."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from reclip_ray.config import load_config
from reclip_ray.errors import CheckpointError, ReclipError
from reclip_ray.export import export_model, load_model


@pytest.fixture()
def exported(tmp_path, tokenizer_path):
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model

    cfg = load_config("tiny")
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=tok.vocab_size).eval()
    out = export_model(model, tok, cfg, tmp_path / "model")
    return model, tok, cfg, out


def test_round_trip_identical_embeddings(exported):
    model, tok, cfg, out = exported
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind
    loaded, tok2 = load_model(out)
    assert loaded.cfg.text.vocab_size == tok.vocab_size
    assert tok2.encode(["a red circle"], 16).tolist() == tok.encode(["a red circle"], 16).tolist()
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.from_numpy(tok.encode(["a red circle on the left", "a blue square"], 32))
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))


def test_export_replaces_existing(exported):
    model, tok, cfg, out = exported
    with torch.no_grad():
        model.logit_scale.fill_(1.234)
    export_model(model, tok, cfg, out)
    assert load_model(out)[0].logit_scale.item() == pytest.approx(1.234)


def test_an_export_replaces_only_an_empty_folder_or_an_earlier_export(exported, tmp_path, monkeypatch, capsys):
    """``reclip-ray export RUN/model --out .`` once deleted the working directory whole (the swap replaces the
    folder): a folder holding anything but an earlier export of the same format is refused and left as it was."""
    from reclip_ray.cli import main

    model, tok, cfg, out = exported
    work = tmp_path / "work"
    (work / "checkpoint_000001").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    with pytest.raises(CheckpointError, match=r"holds checkpoint_000001, notes.txt, which an export would delete"):
        export_model(model, tok, cfg, ".", format="open_clip")
    assert main(["export", str(out), "--out", str(work)]) == 2
    assert "which an export would delete" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint_000001", "notes.txt"]
    assert (work / "notes.txt").read_text() == "keep me"
    # The model folder itself is not an open_clip export; a file is not a folder.
    with pytest.raises(CheckpointError, match="holds config.yaml, model.safetensors, which an export would delete"):
        export_model(model, tok, cfg, out, format="open_clip")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        export_model(model, tok, cfg, tmp_path / "a_file", format="open_clip")
    # An empty folder, and an earlier export of the same format, are replaced.
    (tmp_path / "empty").mkdir()
    oc = export_model(model, tok, cfg, tmp_path / "empty", format="open_clip")
    assert main(["export", str(out), "--out", str(oc)]) == 0
    assert sorted(p.name for p in oc.iterdir()) == ["README.md", "open_clip_config.json",
                                                    "open_clip_model.safetensors", "tokenizer.json"]


def test_an_export_saved_before_a_launch_rule_still_loads(exported):
    """The launch refuses a phase ``lr`` under ``optim.schedule: global`` (it was ignored); a model exported by a
    run made before that rule, whose config.yaml has both, loads as before (``from_dict(saved=True)``)."""
    model, tok, cfg, out = exported
    text = (out / "config.yaml").read_text()
    assert "schedule: per_phase" in text and "lr: 0.00025" in text  # the tiny preset's finetune LR
    (out / "config.yaml").write_text(text.replace("schedule: per_phase", "schedule: global"))
    loaded, _ = load_model(out)
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_model_pt_state_dict_loads(exported):
    model, _, _, out = exported
    # Perturb every parameter (logit_scale included) with seeded noise first: a loader that ignored model.pt and
    # kept the freshly built weights (same seed, same init) would otherwise pass.
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            before = p.detach().clone()
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            assert not torch.equal(p, before), name
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "model.pt")
    loaded, _ = load_model(out)
    expected, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_malicious_pickle_refused(exported, tmp_path):
    _, _, _, out = exported
    (out / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(out / "model.pt", "wb") as f:
        pickle.dump({"w": _Evil(str(marker))}, f, protocol=2)
    with open(out / "model.pt", "rb") as f:  # the payload is live: a plain unpickle runs it
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="refused"):
        load_model(out)
    assert not marker.exists()


def test_wrong_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReclipError, match="missing config.yaml"):
        load_model(tmp_path / "empty")
