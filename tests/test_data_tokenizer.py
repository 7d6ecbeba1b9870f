"""CaptionTokenizer: fixed-length encoding, truncation keeping the end token, user tokenizer.json files."""

from __future__ import annotations

import numpy as np
import pytest

from reclip_ray.data.tokenizer import CaptionTokenizer, load_tokenizer
from reclip_ray.errors import DataError


def test_round_trip_and_padding(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    texts = ["A  Red circle on the LEFT ", "a photo of a star."]
    ids = tok.encode(texts, 24)
    assert ids.shape == (2, 24) and ids.dtype == np.int64
    for row, text in zip(ids, texts):
        n = int((row != tok.pad_id).sum())
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id and (row[n:] == tok.pad_id).all()
        assert tok.decode(row) == " ".join(text.split()).lower()
    again = CaptionTokenizer.from_json(tok.to_json())
    assert np.array_equal(again.encode(texts, 24), ids) and again.vocab_size == tok.vocab_size


def test_truncation_keeps_end_token(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    long = "a large striped red star on the left and a small blue circle at the top " * 3
    full = tok.encode([long], 77)[0]
    short = tok.encode([long], 8)[0]
    assert short[0] == tok.sot_id and short[-1] == tok.eot_id
    assert np.array_equal(short[1:7], full[1:7])  # the first tokens are kept, the end token replaces the tail
    with pytest.raises(DataError):
        tok.encode(["x"], 1)


def test_user_tokenizer_with_other_special_names(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "red": 4, "star": 5}
    user = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    user.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    user.save(str(path))
    tok = load_tokenizer(path)
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 2, 3)
    assert tok.encode(["Red STAR blue"], 7).tolist() == [[2, 4, 5, 1, 3, 0, 0]]
    assert load_tokenizer(tmp_path).vocab_size == 6  # a folder holding tokenizer.json works too

    no_pad = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "x": 2, "?": 3}, unk_token="?"))
    no_pad.save(str(tmp_path / "nopad.json"))
    with pytest.raises(DataError, match=r"nopad\.json: no pad token found"):
        load_tokenizer(tmp_path / "nopad.json")
    assert load_tokenizer(tmp_path / "nopad.json", pad="</s>").pad_id == 1
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "absent.json")


def test_clip_layout_end_of_text_is_the_last_id_and_pads(tmp_path):
    """CLIP's BPE puts <|endoftext|> last (49407) and HF pads with it: ids come from the file, first eot ends it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "red", "star", "<|startoftext|>", "<|endoftext|>"]
    user = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    user.pre_tokenizer = pre_tokenizers.Whitespace()
    user.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, pad="<|endoftext|>")
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size) == (3, 4, 4, 5)
    assert tok.encode(["red star"], 6).tolist() == [[3, 1, 2, 4, 4, 4]]
    assert tok.decode([3, 1, 2, 4, 4, 4]) == "red star"


def test_special_tokens_pinned_by_id(tmp_path):
    """An exported model pins pad/eot by the ids it was trained with; a missing id is a one-line DataError."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "red", "<pad>", "<end_of_text>", "<start_of_text>", "</s>"]
    user = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    user.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    user.save(str(path))
    assert load_tokenizer(path).eot_id == 3  # found by name
    tok = load_tokenizer(path, eot=5, pad=0)
    assert (tok.eot_id, tok.pad_id) == (5, 0)
    assert tok.encode(["red"], 5).tolist() == [[4, 1, 5, 0, 0]]
    with pytest.raises(DataError, match=r"no end token with id 9 \(vocabulary of 6\)"):
        load_tokenizer(path, eot=9)
