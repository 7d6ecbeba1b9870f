"""Caption tokenizer: byte-level BPE (``tokenizers``) behind a small fixed-length interface.

RECLIP's main phase uses short texts (16 tokens in CLIPA), so truncation must keep the end token: the text tower
pools at the (first) end-of-text token. Any ``tokenizer.json`` works; we only need to find its pad / start / end
tokens, whose names and ids differ between ecosystems (CLIP's BPE has ``<|endoftext|>`` as its last id, 49407).
The model takes ``eot_id`` / ``pad_id`` from here (``build_model(cfg, tokenizer=tok)``), never from defaults.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from reclip_ray import storage
from reclip_ray.data.schema import current_column_flag, missing_column_message
from reclip_ray.data.shards import list_parquet_files
from reclip_ray.errors import DataError

PAD, SOT, EOT = "<pad>", "<start_of_text>", "<end_of_text>"
PAD_NAMES = (PAD, "[PAD]", "<|pad|>", "<|padding|>", "<PAD>")
SOT_NAMES = (SOT, "<|startoftext|>", "<|start_of_text|>", "[CLS]", "<s>", "<bos>", "<|begin_of_text|>", "[BOS]")
EOT_NAMES = (EOT, "<|endoftext|>", "<|end_of_text|>", "[SEP]", "</s>", "<eos>", "[EOS]")


def _normalize(text: str, words: int | None = None) -> str:
    """Whitespace collapsed to single spaces, lower case; with ``words``, only the first that many words
    (``split``'s ``maxsplit`` stops scanning there, so a megabyte caption costs what its first words cost)."""
    return " ".join(str(text).split(None, -1 if words is None else words)[:words]).lower()


# The tokenizers whose first n tokens provably lie in the first n words of a normalised caption (``_cut_safe``):
# GPT-2's byte-level pre-tokenizer (ours, ``train_tokenizer``) and CLIP's (``clip_bpe``), both of whose pieces never
# cross a space, behind normalizers that act within a word. Their JSON, as ``__getstate__`` gives it.
_WORD_NORMALIZERS = ({"type": "NFC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
                     {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "})


def _cut_safe(tokenizer) -> bool:
    """Whether ``encode`` may hand the tokenizer only the first ``n`` words of a caption when it keeps ``n`` tokens.

    Why it cannot change those tokens: the pieces the pre-tokenizer makes never span the space between two words
    (GPT-2's regex attaches at most a leading space to a piece; CLIP's drops whitespace), a cut at a space leaves the
    earlier pieces as they were (neither regex looks past a word, but for GPT-2's ``\\s+(?!\\S)`` on whitespace; the
    normalizers act per character or, NFC, are stable at a space; added tokens hold no space), BPE works within a
    piece, and every piece gives at least one token (all 256 byte symbols are in the vocabulary, with the end-of-word
    suffix too), so each word gives one or more. Anything else (a user's tokenizer.json whose tokens may span
    spaces: no pre-tokenizer, Metaspace, WordPiece...) is not known to keep words and gets the whole caption.

    Not cut, as nothing provably can be: a caption without spaces (one 1 MB word still takes ~0.7 s), and CLIP's
    cleaning (ftfy decides per line whether a line is mojibake), ~0.3 s for a 1 MB line that is not plain ASCII.
    """
    import json

    from tokenizers import models, pre_tokenizers

    from reclip_ray.data.clip_bpe import CLIP_PATTERN

    model = tokenizer.model
    if not isinstance(model, models.BPE) or model.dropout or model.continuing_subword_prefix:
        return False
    try:  # a component written in Python has no JSON: not known, so not cut
        norms = json.loads(tokenizer.normalizer.__getstate__()) if tokenizer.normalizer is not None else {}
        pre = json.loads(tokenizer.pre_tokenizer.__getstate__()) if tokenizer.pre_tokenizer is not None else {}
    except Exception:
        return False
    parts = norms.get("normalizers", []) if norms.get("type", "Sequence") == "Sequence" else [norms]
    if any(part not in _WORD_NORMALIZERS for part in parts):
        return False
    steps = [(s.get("type"), s.get("use_regex")) for s in pre.get("pretokenizers", [pre])]
    gpt2 = steps == [("ByteLevel", True)]
    clip = steps == [("Split", None), ("ByteLevel", False)] and pre["pretokenizers"][0] == {
        "type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": True}
    if not (gpt2 or clip):
        return False
    suffix = model.end_of_word_suffix or ""
    if any(tokenizer.token_to_id(c) is None or tokenizer.token_to_id(c + suffix) is None
           for c in pre_tokenizers.ByteLevel.alphabet()):
        return False
    return not any(ch.isspace() for t in tokenizer.get_added_tokens_decoder().values() for ch in t.content)


class CaptionTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; encodes to [sot, ..., eot, pad, ...] int64 rows of a fixed length."""

    def __init__(self, tokenizer, *, pad: str | int | None = None, sot: str | int | None = None,
                 eot: str | int | None = None, source: str = "tokenizer") -> None:
        from reclip_ray.data.clip_bpe import CLIP_PAD_ID, clean_caption, is_clip_vocab

        self._tok = tokenizer
        self.source = source
        # CLIP's vocabulary (data.tokenizer: clip) has no pad token: open_clip pads with id 0, and its captions are
        # cleaned with ftfy first (clean_caption; checked here so a missing ftfy fails at once, not in a task).
        self.clip_bpe = is_clip_vocab(tokenizer)
        self._clean = clean_caption if self.clip_bpe else None
        if self._clean is not None:
            self._clean("")
            pad = CLIP_PAD_ID if pad is None else pad
        self.pad_id = self._find("pad", pad, PAD_NAMES)
        self.sot_id = self._find("start", sot, SOT_NAMES)
        self.eot_id = self._find("end", eot, EOT_NAMES)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._cut = _cut_safe(tokenizer)

    def _find(self, role: str, name: str | int | None, candidates: Sequence[str]) -> int:
        """The id of a special token: given as an id (an exported model pins the ids it was trained with), by
        name, or else the first of the usual names that the vocabulary has."""
        if isinstance(name, int) and not isinstance(name, bool):
            if self._tok.id_to_token(name) is None:
                raise DataError(f"{self.source}: no {role} token with id {name} (vocabulary of "
                                f"{self._tok.get_vocab_size(with_added_tokens=True)})")
            return name
        names = (name,) if name else candidates
        for candidate in names:
            idx = self._tok.token_to_id(candidate)
            if idx is not None:
                return int(idx)
        raise DataError(
            f"{self.source}: no {role} token found (looked for {', '.join(names)}); "
            f"add one of them as a special token"
        )

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """[sot, the first ``length - 2`` tokens, eot, pad...] per text. A tokenizer known to keep words
        (``_cut_safe``) sees only as many words as tokens are kept: a 1 MB caption took 0.4-0.9 s whole, 3 ms cut."""
        if length < 2:
            raise DataError(f"text length must be >= 2 (start and end tokens), got {length}")
        out = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        if not len(texts):
            return out
        if self._clean is not None:
            texts = [self._clean(str(t)) for t in texts]
        body = length - 2
        words = body if self._cut else None
        encodings = self._tok.encode_batch([_normalize(t, words) for t in texts], add_special_tokens=False)
        for i, enc in enumerate(encodings):
            ids = enc.ids[:body]
            out[i, 0] = self.sot_id
            out[i, 1 : 1 + len(ids)] = ids
            out[i, 1 + len(ids)] = self.eot_id
        return out

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.pad_id, self.sot_id, self.eot_id}
        kept = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1).tolist():
            if i == self.eot_id:
                break
            if i not in special:
                kept.append(int(i))
        return self._tok.decode(kept, skip_special_tokens=True).strip()

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, s: str, **names: str | None) -> "CaptionTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(s)
        except Exception as exc:
            raise DataError(f"not a valid tokenizer.json: {exc}") from exc
        return cls(tok, **names)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` whole (local path or URI; ``storage.write_text`` is atomic)."""
        storage.write_text(str(path), self.to_json())

    def __repr__(self) -> str:
        return (f"CaptionTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, sot_id={self.sot_id}, "
                f"eot_id={self.eot_id})")


def load_tokenizer(path: str | os.PathLike, *, pad: str | int | None = None, sot: str | int | None = None,
                   eot: str | int | None = None) -> CaptionTokenizer:
    """Any ``tokenizer.json`` (ours or a user's); special tokens found by common names unless given (name or id).

    ``"clip"`` (when no such file exists) is OpenAI's CLIP BPE, converted from open_clip's vocabulary on first use.
    ``path`` may be a URI (``s3://bucket/tokenizer.json``): one GET.
    """
    from reclip_ray.data.clip_bpe import clip_tokenizer_file, selects_clip_bpe

    path = str(path)
    if selects_clip_bpe(path):
        path = str(clip_tokenizer_file())
    try:
        if not path.endswith(".json") and storage.exists(storage.join(path, "tokenizer.json")):
            path = storage.join(path, "tokenizer.json")  # a folder that holds one (an export)
        text = storage.read_text(path)
    except FileNotFoundError:
        raise DataError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:  # also a folder without tokenizer.json
        raise DataError(f"cannot read tokenizer {path}: {exc}") from None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:
        raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None
    return CaptionTokenizer(tok, pad=pad, sot=sot, eot=eot, source=str(path))


CAPTION_READ_THREADS = 8  # caption columns read in parallel (object storage answers one small read at a time)


def iter_captions(data: str | os.PathLike, caption_column: str = "caption", batch_rows: int = 16384, *,
                  limit: int = 0, threads: int = CAPTION_READ_THREADS, flag: str | None = None) -> Iterator[str]:
    """The non-empty captions of the shards under ``data`` in file order, read column-only (no image bytes
    touched), at most ``limit`` of them (0: all).

    Files are read ``threads`` at a time, in order, at most ``2 * threads`` files ahead of the consumer, so a
    bounded sample stops reading soon after the bound: files not started yet are never opened. On a local disk
    the reads are CPU-bound and more threads than cores only contend for the GIL (20,000 small shards: 8.4 s with
    one thread, 5.9 s with two, 8.0 s with eight on 2 cores), so there ``threads`` is capped at the core count.
    A shard without ``caption_column`` is a DataError whose hint names ``flag`` (``schema.column_flag``'s template;
    None: the one in force where the reading starts, since the files are read on other threads).
    """
    flag = flag or current_column_flag()
    files = list_parquet_files(str(data))
    if not storage.is_uri(str(data)):
        threads = min(threads, os.cpu_count() or 1)
    taken = 0
    read = functools.partial(_file_captions, caption_column=caption_column, batch_rows=batch_rows, flag=flag)
    for captions in storage.ordered_prefetch(read, files, threads):
        for caption in captions:
            yield caption
            taken += 1
            if limit and taken >= limit:
                return


def _file_captions(file: str, caption_column: str, batch_rows: int, flag: str) -> list[str]:
    """One file's non-empty captions, normalised."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(file)
    with fs.open_input_file(inner) as f:
        pf = pq.ParquetFile(f)
        if caption_column not in pf.schema_arrow.names:
            raise DataError(missing_column_message(file, pf.schema_arrow, [("caption", caption_column)], flag))
        if pf.metadata.num_rows <= batch_rows:  # one read of the column chunk: the common case, and the cheapest
            return [_normalize(c) for c in pf.read(columns=[caption_column], use_threads=False).column(0).to_pylist()
                    if c]
        return [_normalize(c) for batch in pf.iter_batches(batch_size=batch_rows, columns=[caption_column],
                                                          use_threads=False)
                for c in batch.column(0).to_pylist() if c]


def train_tokenizer(
    data: str | os.PathLike,
    vocab_size: int,
    out: str | os.PathLike | None = None,
    caption_column: str = "caption",
    max_captions: int = 0,
    flag: str | None = None,
) -> CaptionTokenizer:
    """Byte-level BPE on the dataset's captions; ids 0/1/2 are <pad>/<start_of_text>/<end_of_text>.

    ``max_captions`` > 0 trains on the first that many captions in file order (a launch passes
    ``data.tokenizer_sample_captions``): BPE merges settle long before a billion captions, and reading every
    caption of a web-scale set would keep the driver busy for hours before the first step.
    ``flag``: how a missing caption column's hint names the flag (``schema.OPTION_FLAG`` for ``reclip-ray data
    tokenizer``); the tokenizers library reads the captions on its own thread, where ``schema.column_flag`` is unset,
    so it is taken here, on the caller's thread, when not given.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 256 + 3:
        raise DataError(f"vocab_size must be >= 259 (256 bytes + 3 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, SOT, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    captions = iter_captions(data, caption_column, limit=max_captions, flag=flag or current_column_flag())
    tok.train_from_iterator(captions, trainer=trainer)
    result = CaptionTokenizer(tok, source=str(data))
    if out is not None:
        result.save(out)
    return result
