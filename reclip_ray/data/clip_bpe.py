"""OpenAI's CLIP tokenizer as a ``tokenizers`` JSON, built offline from the vocabulary ``open_clip`` ships.

``data.tokenizer: clip`` gives the 49,408-token byte-level BPE that every OpenAI / open_clip CLIP model uses, so a
model trained here tokenizes like them and its export works in open_clip, CLIP_benchmark and anything else that
calls ``open_clip.tokenize``. The merges file (``bpe_simple_vocab_16e6.txt.gz``) comes from the installed
``open_clip_torch`` package (nothing is downloaded); it is converted once into a ``tokenizer.json`` cached under
``~/.cache/reclip_ray`` and from then on handled by ``CaptionTokenizer`` like any other tokenizer.

What has to match open_clip's ``SimpleTokenizer`` exactly, and where each part lives:

- cleaning: ``ftfy.fix_text``, HTML unescaping (twice), whitespace collapsing and lower-casing. ftfy is Python, so
  it cannot live in the JSON; ``CaptionTokenizer`` recognises a CLIP vocabulary (``is_clip_vocab``) and runs
  ``clean_caption`` before encoding. The JSON's own normalizer (whitespace + lowercase) is a no-op on cleaned
  text and only keeps the file usable on its own.
- pre-tokenization: CLIP's regex (contractions, runs of letters, single digits, runs of other symbols), then the
  GPT-2 byte-to-unicode map;
- BPE: CLIP's merges with ``</w>`` marking the end of a word; ids are the 256 byte symbols, the same 256 with
  ``</w>``, one id per merge, then ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407);
- layout: ``[sot, ..., eot, 0, 0, ...]``, padded with id 0 and truncated so that the end token is kept
  (``CaptionTokenizer.encode`` does exactly this).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from reclip_ray.errors import DataError

CLIP_NAME = "clip"  # the value of data.tokenizer that selects this tokenizer
CLIP_VOCAB_SIZE = 49408
CLIP_SOT, CLIP_EOT = "<start_of_text>", "<end_of_text>"
CLIP_SOT_ID, CLIP_EOT_ID, CLIP_PAD_ID = 49406, 49407, 0
# Same alternatives as CLIP's pattern, minus the special tokens (tokenizers splits those out before this runs).
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CACHE_NAME = "clip_bpe_49408.tokenizer.json"
INSTALL_HINT = "pip install 'reclip-ray[openclip]' (or: pip install open_clip_torch)"


def selects_clip_bpe(tokenizer: str) -> bool:
    """Whether ``data.tokenizer`` names this tokenizer: ``clip``, unless a file of that name is in the working
    directory (which is then the tokenizer, as any other path)."""
    return tokenizer == CLIP_NAME and not os.path.exists(tokenizer)


def open_clip_bpe_path() -> Path:
    """The merges file inside the installed open_clip package, located without importing open_clip (slow)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
        raise DataError(f"data.tokenizer: clip needs the open_clip_torch package, which ships the CLIP vocabulary: "
                        f"{INSTALL_HINT}")
    path = Path(spec.origin).parent / _BPE_FILE
    if not path.is_file():
        raise DataError(f"the installed open_clip has no {_BPE_FILE} at {path}; reinstall it: {INSTALL_HINT}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) in CLIP's id layout, read from the merges file."""
    path = Path(bpe_path) if bpe_path else open_clip_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2  # the file holds more merges than CLIP uses
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise DataError(f"{path}: not CLIP's merges file (expected {n_merges} merges)")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise DataError(f"{path}: merges give {len(vocab)} distinct tokens, not {CLIP_VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(bpe_path: str | os.PathLike | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` equal to open_clip's SimpleTokenizer on cleaned text (see the module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = clip_vocab_and_merges(bpe_path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None,
                               fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # "</w>" becomes the byte-level symbol of a space before the bytes are decoded (as open_clip's decode does).
    tok.decoder = decoders.Sequence([decoders.Replace("</w>", _bytes_to_unicode()[ord(" ")]), decoders.ByteLevel()])
    tok.add_special_tokens([AddedToken(CLIP_SOT, special=True, normalized=False),
                            AddedToken(CLIP_EOT, special=True, normalized=False)])
    return tok


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reclip_ray"


def clip_tokenizer_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted ``tokenizer.json``; converted on first use and written atomically (several processes
    may race to make it; each writes its own temp file and the rename is atomic)."""
    folder = Path(cache_dir) if cache_dir else _cache_dir()
    path = folder / _CACHE_NAME
    if path.is_file():
        return path
    bpe = open_clip_bpe_path()  # the install hint, before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_CACHE_NAME}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(build_clip_tokenizer(bpe).to_str())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_clip_vocab(tokenizer: Any) -> bool:
    """True for a tokenizer with CLIP's vocabulary (ours, or Hugging Face's ``<|startoftext|>`` spelling)."""
    if tokenizer.get_vocab_size(with_added_tokens=True) != CLIP_VOCAB_SIZE:
        return False
    for sot, eot in ((CLIP_SOT, CLIP_EOT), ("<|startoftext|>", "<|endoftext|>")):
        if tokenizer.token_to_id(sot) == CLIP_SOT_ID and tokenizer.token_to_id(eot) == CLIP_EOT_ID:
            return True
    return False


# Printable ASCII (and tab / newline) without "&": nothing for ftfy or html.unescape to change in such a caption
# (no mojibake, quotes, ligatures, widths, control characters or entities), and most web captions are like this.
_NEEDS_CLEANING = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def clean_caption(text: str) -> str:
    """open_clip's ``basic_clean``: fix mojibake and unicode oddities (ftfy), unescape HTML twice, strip.

    Whitespace collapsing and lower-casing follow in ``CaptionTokenizer`` (the same for every tokenizer). ftfy costs
    ~0.1 ms a caption, as much as decoding a small image, so captions it cannot change skip it.
    """
    if not _NEEDS_CLEANING.search(text):
        return text.strip()
    try:
        import ftfy
    except ImportError:
        raise DataError(f"the CLIP tokenizer cleans captions with ftfy, which is missing: {INSTALL_HINT}") from None
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()
