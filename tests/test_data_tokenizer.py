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


# ------------------------------------------------------------------------------------------ long captions are cut

# Words that stress the cut: contractions and apostrophes (GPT-2's pieces), digits (CLIP makes each one a piece),
# final sigma (lower-casing looks at the next character), combining marks (NFC), entities and mojibake (CLIP's
# cleaning), special-token text, emoji, CJK, and one-letter words (one token each: a cut one word short shows).
NASTY_WORDS = ["it's", "we'll", "x'", "'s", "ΟΔΟΣ", "nai\u0308ve", "e\u0301", "\u0301", "東京", "😀", "<end_of_text>",
               "<pad>", "12345", "abc123def", "!!!", "&amp;", "Ã©cole", "ﬁne", "Ｆｕｌｌ", "Straße", "a", "b", "c", "7"]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "\xa0", "\u3000", "\x1c"]


class _SeenTexts:
    """Stands in for the ``tokenizers.Tokenizer``: records the length of every text ``encode`` hands it."""

    def __init__(self, inner) -> None:
        self.inner, self.lengths = inner, []

    def encode_batch(self, texts, **kwargs):
        self.lengths += [len(t) for t in texts]
        return self.inner.encode_batch(texts, **kwargs)


def _long_captions(n_chars: int) -> list[str]:
    rng = np.random.default_rng(0)

    def caption(words: list[str]) -> str:
        picked = rng.integers(len(words), size=n_chars)  # at least one character a word: enough of them
        gaps = rng.integers(len(SEPARATORS), size=n_chars)
        return "".join(words[w] + SEPARATORS[g] for w, g in zip(picked, gaps))[:n_chars]

    return [caption(NASTY_WORDS), caption(["a", "b", "c", "7", "x"]), "  " + caption(["ΟΔΟΣ", "it's", "'s"])]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    pytest.importorskip("open_clip")
    with pytest.MonkeyPatch.context() as mp:  # the converted vocabulary goes to a temporary cache, not ~/.cache
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield load_tokenizer("clip")


@pytest.fixture(params=["trained", "clip"])
def any_tokenizer(request, tokenizer_path):
    return load_tokenizer(tokenizer_path) if request.param == "trained" else request.getfixturevalue("clip_tokenizer")


def test_a_long_caption_is_cut_before_it_is_tokenized_and_keeps_the_same_tokens(any_tokenizer):
    """A caption of 100k characters gives the ids its whole text would (the reference: the tokenizer called
    directly on the whole caption, cleaned and normalised as encode does), while the tokenizer only sees its first
    words (tokenizing a 1 MB caption whole took 0.4-0.9 s)."""
    from reclip_ray.data.clip_bpe import clean_caption

    tok = any_tokenizer
    inner = tok._tok
    captions = _long_captions(100_000)
    clean = clean_caption if tok.clip_bpe else str
    whole = [inner.encode(" ".join(clean(c).split()).lower(), add_special_tokens=False).ids for c in captions]
    assert min(len(ids) for ids in whole) > 10_000
    spy = _SeenTexts(inner)
    tok._tok = spy
    try:
        for length in (2, 3, 4, 5, 16, 33, 77):
            body = length - 2
            expected = [[tok.sot_id, *ids[:body], tok.eot_id] for ids in whole]
            assert tok.encode(captions, length).tolist() == expected, length
            assert max(spy.lengths) <= 15 * length, (length, max(spy.lengths))  # words of <= 13 characters
            spy.lengths.clear()
    finally:
        tok._tok = inner
    assert tok.encode(["  a   b  "], 77).tolist()[0][:4] == tok.encode(["a b"], 77).tolist()[0][:4]


def test_a_tokenizer_whose_tokens_may_span_spaces_gets_the_whole_caption(tmp_path, tokenizer_path):
    """Only tokenizers known to keep words are cut: a token that spans a space ("a b") or an added token with a
    space in it would be lost if the caption were cut to its first word."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<start_of_text>": 1, "<end_of_text>": 2, "a": 3, " ": 4, "b": 5, "a ": 6, "a b": 7}
    spans = Tokenizer(models.BPE(vocab, [("a", " "), ("a ", "b")], unk_token=None))  # no pre-tokenizer
    spans.save(str(tmp_path / "spans.json"))
    tok = load_tokenizer(tmp_path / "spans.json")
    assert tok.encode(["a b " * 1000], 3).tolist() == [[1, 7, 2]]

    with_added = Tokenizer.from_file(str(tokenizer_path))
    with_added.add_tokens(["red circle"])
    added = with_added.token_to_id("red circle")
    tok = CaptionTokenizer(with_added)
    assert tok.encode(["red circle " * 1000], 3).tolist() == [[tok.sot_id, added, tok.eot_id]]


def test_every_character_that_is_not_whitespace_gives_a_token(any_tokenizer):
    """The premise of the cut: each word gives at least one token, so the first n tokens lie in the first n words.
    Checked on every control, format, separator, mark and private-use character and on a sample of the rest."""
    import unicodedata

    risky = ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me", "Mc", "Co")
    chars = [chr(i) for i in range(0x110000) if not 0xD800 <= i < 0xE000
             and (i % 97 == 0 or (i < 0xF0000 and unicodedata.category(chr(i)) in risky))]
    words = [c.lower() for c in chars if not c.isspace()]
    assert len(words) > 10_000
    encodings = any_tokenizer._tok.encode_batch(words, add_special_tokens=False)
    assert [w for w, e in zip(words, encodings) if not e.ids] == []
