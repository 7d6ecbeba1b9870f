"""Real images with real captions: public emoji art from the npm registry, as train and held-out eval datasets.

    python benchmarks/emoji_data.py --out /tmp/emoji                # fetch (~280 MB, cached) and build: ~75 s
    python benchmarks/emoji_data.py --out /tmp/emoji --shrink 40    # + the 40 px copies a 32 px phase reads
    python benchmarks/emoji_data.py --out DIR --packages-dir DIR    # already-extracted packages, no network

The cache (``--cache``, default ~/.cache/reclip_ray/emoji) keeps the tarballs and the files extracted from them;
nothing is written into the repository.

Sources (pinned versions; each tarball's sha512 is checked against the integrity string npm published for it):
- ``emoji-datasource-{apple,google,facebook}`` 16.0.0: one 64 px RGBA PNG per emoji (``img/<vendor>/64/``), and
  the names, short names, categories and subcategories of every emoji in ``emoji.json``;
- ``@twemoji/svg`` 15.0.0: Twitter's art as SVG, rendered at ``--full-size`` px. It replaces the 64 px PNGs of
  ``emoji-datasource-twitter`` (the same drawings): it is the only training style whose images carry detail
  above 64 px, so the full-resolution phase has something to learn and the unseen-emoji split something to test
  at full resolution (the 64 px styles are upsampled there). ``--twitter png`` uses the PNG package instead;
- ``openmoji`` 17.0.0: SVG art (``color/svg/``) with annotations and tags (``data/openmoji.json``), rendered at
  ``--full-size`` px; the held-out art style.

Outputs under ``--out`` (Parquet shards + dataset.json each, written by the project's own ``data ingest``):
- ``train``: every style but OpenMoji, every emoji not held out;
- ``eval_style``: OpenMoji (a style training never sees) drawing the emoji training does see, so the split
  measures style transfer alone;
- ``eval_emoji``: the held-out emoji in every training style, so the split measures unseen names in familiar
  styles. Held out: exactly ``round(--heldout * names)`` distinct Unicode names (15 %), those whose hash of
  (``--seed``, name) ranks lowest, so a name is held out of every style at once (and its OpenMoji drawing too).
  The names are new, not always the concepts: "woman technologist" may be held out while "man technologist"
  trains, or "red apple" while "green apple" (keyword "apple") trains. That is the split's question: does the
  model put a name it never saw with an image it never saw, from the words and drawings it knows;
- ``eval_both``: OpenMoji's drawings of the held-out emoji (new style and new name; small, for completeness).
Every split has the label sets ``category`` (column ``label``, 9 classes such as "food and drink") and
``subcategory`` (``label_subcategory``, 98 such as "food fruit") in dataset.json, in synth.py's format, with the
same class lists in every split, so numbers compare across splits; ``rows_per_style`` and ``rows_per_category``
count the rows.

Decisions:
- Emoji identity is the code point sequence without U+FE0F (variation selector 16) or leading zeros, which is
  how the packages' file names differ ("2764-fe0f", "2764"; "0023-fe0f-20e3", "23-20e3"). Every style's caption
  draws on the same text: emoji-datasource's Unicode name ("heavy black heart"), short names, category and
  subcategory, and the CLDR short name and keywords ("red heart"; "emotion, love") that openmoji.json carries for
  each code point. That is Unicode's text, not OpenMoji's art, so it is no leak of the held-out style; the
  ``openmoji_tags`` (OpenMoji's words for its own drawings) are not used, since only the held-out style would have
  them. An emoji therefore has the same words and labels in every style.
- Base emoji only: skin-tone variants (emoji-datasource's ``skin_variations``, OpenMoji rows with a ``skintone``)
  are the same drawing five times with one caption word apart, which would weight people emoji ~6x and make the
  held-out names easy by their variants. Category ``Component`` (bare skin-tone swatches and hair parts) and
  OpenMoji's non-Unicode extras are dropped: they are not emoji of their own or have no Unicode name. An emoji a
  style does not draw is left out of that style (counted as ``absent`` in the summary).
- One row per distinct image in a split: vendors draw some emoji alike (Apple's and Google's families are one
  picture under up to a dozen names), and the evaluator groups rows by image bytes, so one image under two
  subcategories could not be scored at all. The first in plan order (style, then Unicode order) keeps the image;
  an eval row whose image is also in train is dropped too (the drawing is not unseen). dataset.json's
  ``duplicates_dropped`` counts both (on the real packages: 54 train, 23 + 0 eval_style, 0 + 16 eval_emoji rows).
- Images are composited on white (transparent pixels carry arbitrary colours) and stored as PNG: lossless for
  flat-colour art with hard edges, which JPEG rings around, at 1.0-1.3x the bytes of a quality-95 JPEG at 64 px
  and 0.6x at 128 px, decoded about as fast (measured on this data, 2 cores). The low-resolution phase reads
  ``--shrink`` copies, which are JPEG as always.
- Captions: one per image, fixed at build time: the Unicode or CLDR name in one of six templates, in half of the
  rows followed by the category ("..., from the food and drink category") or subcategory ("..., a food fruit
  emoji") in the zero-shot templates' words, and in 30 % by one to three keywords, as alt text does.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reclip_ray.errors import DataError

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "reclip_ray", "emoji")
REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class Package:
    """One npm tarball: what to fetch, the integrity npm published for it, and which files to keep."""

    name: str
    version: str
    integrity: str  # `npm view NAME@VERSION dist.integrity`
    keep: tuple[str, ...]  # path prefixes inside the tarball's "package/" folder that are extracted

    @property
    def url(self) -> str:
        return f"{REGISTRY}/{self.name}/-/{self.name.split('/')[-1]}-{self.version}.tgz"

    @property
    def folder(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


def _datasource(vendor: str, integrity: str) -> Package:
    return Package(f"emoji-datasource-{vendor}", "16.0.0", integrity, ("emoji.json", f"img/{vendor}/64/"))


# Integrity strings from `npm view NAME@VERSION dist.integrity` (2026-12): a tarball that does not match is refused.
PACKAGES: dict[str, Package] = {
    "apple": _datasource(
        "apple", "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw=="),
    "google": _datasource(
        "google", "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "facebook": _datasource(
        "facebook", "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ=="),
    "twitter": _datasource(
        "twitter", "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "twemoji": Package(
        "@twemoji/svg", "15.0.0",
        "sha512-ZSPef2B6nBaYnfgdTbAy4jgW95o7pi2xPGwGCU+WMTxo7J6B1lMPTWwSq/wTuiMq+N0khQ90CcvYp1wFoQpo/w==", ("",)),
    "openmoji": Package(
        "openmoji", "17.0.0",
        "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
        ("data/openmoji.json", "color/svg/")),
}


# -------------------------------------------------------------------------------------------------- fetch


def check_integrity(path: str | os.PathLike, integrity: str, what: str = "") -> None:
    """Raise a one-line DataError (naming ``what``, default the path) unless the file's digest is the npm
    ``dist.integrity`` string (``sha512-<base64>``)."""
    algo, _, expected = integrity.partition("-")
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    got = base64.b64encode(digest.digest()).decode()
    if got != expected:
        raise DataError(f"{what or path}: integrity mismatch: expected {integrity}, got {algo}-{got} (a corrupt "
                        "or tampered download; delete it and rerun)")


def download(pkg: Package, tarballs: Path) -> Path:
    """The package's verified tarball in ``tarballs`` (downloaded once; an existing one is re-verified)."""
    tarballs.mkdir(parents=True, exist_ok=True)
    path = tarballs / f"{pkg.folder}.tgz"
    if not path.exists():
        tmp = path.with_suffix(".tgz.part")
        try:
            with urllib.request.urlopen(pkg.url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            check_integrity(tmp, pkg.integrity, pkg.url)
            os.replace(tmp, path)
        except OSError as exc:
            raise DataError(f"cannot download {pkg.url}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    else:
        check_integrity(path, pkg.integrity)
    return path


def extract(pkg: Package, tarball: Path, packages: Path) -> Path:
    """Extract the kept files of a verified tarball to ``packages/<folder>`` (all or nothing)."""
    dest = packages / pkg.folder
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == pkg.integrity:
        return dest
    tmp = packages / f"{pkg.folder}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/")
                       and m.name[len("package/"):].startswith(pkg.keep)]
            for m in members:
                m.name = m.name[len("package/"):]
            tar.extractall(tmp, members=members, **safe)
        (tmp / ".complete").write_text(pkg.integrity + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{tarball}: cannot extract ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch(names: list[str], cache: str | os.PathLike = DEFAULT_CACHE, log: Any = print) -> dict[str, Path]:
    """{package key: extracted folder}, downloading and verifying what the cache lacks."""
    cache = Path(cache)
    out = {}
    for key in names:
        pkg = PACKAGES[key]
        start = time.perf_counter()
        tarball = download(pkg, cache / "tarballs")
        out[key] = extract(pkg, tarball, cache / "packages")
        log(f"[emoji] {pkg.name}@{pkg.version}: {tarball.stat().st_size / 1e6:.1f} MB verified "
            f"({time.perf_counter() - start:.1f} s)")
    return out


# -------------------------------------------------------------------------------------------------- emoji


@dataclass(frozen=True)
class Emoji:
    """One base emoji with the text every style's caption draws from."""

    key: str  # canonical code points ("1f44b"), see ``canonical``
    image: str  # emoji-datasource's file name ("1f44b.png")
    name: str  # Unicode name, lower case ("waving hand sign")
    cldr: str  # CLDR short name from openmoji.json's annotation ("waving hand"), "" when unknown
    keywords: tuple[str, ...]  # short names and CLDR tags, without the names themselves
    category: str  # emoji-datasource category ("Food & Drink")
    subcategory: str  # emoji-datasource subcategory ("food-fruit")
    heldout: bool  # in the unseen-emoji split, never in training


@dataclass(frozen=True)
class Style:
    """An art style: which package draws it and how its files are found."""

    name: str
    package: str  # key of PACKAGES
    kind: str  # "png" (kept at its size) or "svg" (rendered at --full-size)

    def path(self, folder: Path, emoji: Emoji, files: dict[str, str]) -> Path | None:
        if self.kind == "png":
            path = folder / "img" / self.name / "64" / emoji.image
            return path if path.is_file() else None
        rel = files.get(emoji.key)
        return folder / rel if rel else None


TRAIN_STYLES = ("apple", "google", "facebook")
HELDOUT_STYLE = Style("openmoji", "openmoji", "svg")
SPLITS = ("train", "eval_style", "eval_emoji", "eval_both")


def styles(twitter: str = "svg") -> list[Style]:
    """Training styles, then the held-out one. ``twitter``: "svg" (@twemoji/svg) or "png" (emoji-datasource)."""
    if twitter not in ("svg", "png"):
        raise DataError(f"--twitter must be svg or png, got {twitter!r}")
    tw = Style("twitter", "twemoji", "svg") if twitter == "svg" else Style("twitter", "twitter", "png")
    return [Style(v, v, "png") for v in TRAIN_STYLES] + [tw, HELDOUT_STYLE]


def canonical(hexcode: str) -> str:
    """"0023-FE0F-20E3" and twemoji's "23-20e3" -> "23-20e3": code points without U+FE0F or leading zeros."""
    try:
        points = [int(part, 16) for part in hexcode.strip().split("-")]
    except ValueError:
        raise DataError(f"not a code point sequence: {hexcode!r}") from None
    return "-".join(format(p, "x") for p in points if p != 0xFE0F)


def heldout_names(names: list[str], seed: int, share: float) -> set[str]:
    """The unseen-emoji split's names: the ``round(share * n)`` distinct names whose hash of (seed, name) is
    smallest. A name's rank depends only on its own hash, so a name is held out of every style at once, and another
    package version moves at most the names at the boundary."""
    distinct = sorted(set(names))
    ranked = sorted(distinct, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).digest())
    return set(ranked[: round(share * len(distinct))])


_ASCII = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def _text(words: str) -> str:
    """Lower case, ASCII quotes, single spaces: "Woman’s Hat" -> "woman's hat"."""
    return " ".join(words.lower().translate(_ASCII).split())


def _phrase(words: str) -> str:
    """A package's identifier as words: "Food & Drink" -> "food and drink", "flag-jp" -> "flag jp"."""
    return _text(words.replace("&", "and").replace("_", " ").replace("-", " "))


def _a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is the package extracted there?)") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def load_emoji(datasource: Path, openmoji: Path | None, seed: int = 0, share: float = 0.15) -> list[Emoji]:
    """Base emoji from emoji-datasource's emoji.json in Unicode order, with openmoji.json's CLDR name and tags."""
    path = datasource / "emoji.json"
    records = _read_json(path)
    cldr: dict[str, dict] = {}
    if openmoji is not None:
        for rec in _read_json(openmoji / "data" / "openmoji.json"):
            if not rec.get("skintone") and rec.get("hexcode"):
                cldr.setdefault(canonical(rec["hexcode"]), rec)
    kept = []
    for i, rec in enumerate(records):
        missing = [k for k in ("name", "unified", "image", "category", "subcategory") if not rec.get(k)]
        if missing:
            raise DataError(f"{path}: entry {i} ({rec.get('unified')}) has no {missing[0]!r}")
        if rec["category"] != "Component":  # skin-tone swatches and hair parts: no emoji of their own
            kept.append(rec)
    if not kept:
        raise DataError(f"{path}: no emoji")
    kept.sort(key=lambda r: r.get("sort_order", 0))
    held = heldout_names([_text(r["name"]) for r in kept], seed, share)
    out = []
    for rec in kept:
        key = canonical(rec["unified"])
        extra = cldr.get(key, {})
        name, short = _text(rec["name"]), _text(extra.get("annotation", ""))
        words = [_phrase(w) for w in rec.get("short_names") or []]
        words += [_text(t) for t in extra.get("tags", "").split(",")]
        keywords = tuple(dict.fromkeys(w for w in words if w and w not in (name, short)))
        out.append(Emoji(key, rec["image"], name, short if short != name else "", keywords, rec["category"],
                         rec["subcategory"], name in held))
    return out


def svg_files(folder: Path, subdir: str) -> dict[str, str]:
    """{canonical key: path relative to ``folder``} of the SVGs in ``folder/subdir`` (skin tones included: they
    are never asked for)."""
    base = folder / subdir if subdir else folder
    if not base.is_dir():
        raise DataError(f"{base}: no SVG folder (is the package extracted there?)")
    files = {}
    for entry in sorted(os.listdir(base)):
        if entry.endswith(".svg"):
            try:
                files[canonical(entry[:-4])] = os.path.join(subdir, entry) if subdir else entry
            except DataError:
                continue  # not an emoji file name
    return files


# -------------------------------------------------------------------------------------------------- captions

CATEGORY_TEMPLATES = ["an emoji from the {} category.", "{} emoji.", "an icon from the {} category."]
SUBCATEGORY_TEMPLATES = ["{} emoji.", "an emoji of {}.", "an icon of {}."]
_NAME_TEMPLATES = ["{}", "an emoji of {}", "{} emoji", "the {} emoji", "an icon of {}", "a picture of {}"]


def caption(emoji: Emoji, rng: random.Random) -> str:
    """A caption that always names the emoji (Unicode or CLDR name), sometimes with its category, subcategory or a
    few keywords, as alt text does. The category and subcategory use the zero-shot templates' words."""
    name = emoji.cldr if emoji.cldr and rng.random() < 0.5 else emoji.name
    text = rng.choice(_NAME_TEMPLATES).format(name)
    u = rng.random()
    if u < 0.25:
        text += f", from the {_phrase(emoji.category)} category"
    elif u < 0.5:
        text += f", {_a(_phrase(emoji.subcategory))} emoji"
    if emoji.keywords and rng.random() < 0.3:
        text += ": " + ", ".join(rng.sample(emoji.keywords, min(len(emoji.keywords), rng.randint(1, 3))))
    return text


def _rng(seed: int, *parts: str) -> random.Random:
    """A stream that depends only on its parts, so a row's caption is the same whatever else the build holds."""
    return random.Random(int.from_bytes(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()[:8], "big"))


# -------------------------------------------------------------------------------------------------- images


def flatten(img: Any) -> Any:
    """RGBA (or any mode) onto white, as RGB: how the art looks on a page, and no alpha for the pipeline to guess."""
    from PIL import Image

    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def prepare_image(task: tuple[str, str, int, str]) -> tuple[int, int]:
    """(kind, source, size, destination): write the flattened PNG; returns its (width, height)."""
    from PIL import Image

    kind, src, size, dst = task
    try:
        if kind == "svg":
            import cairosvg

            img = Image.open(io.BytesIO(cairosvg.svg2png(url=src, output_width=size, output_height=size)))
        else:
            img = Image.open(src)
        img = flatten(img)
    except Exception as exc:  # a bad file stops the build: the sources are pinned, so it is a real problem
        raise DataError(f"{src}: cannot read image ({exc})") from None
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    img.save(dst, format="PNG")
    return img.size


# -------------------------------------------------------------------------------------------------- build


def class_lists(emoji: list[Emoji]) -> tuple[list[str], list[str]]:
    """Category and subcategory names in Unicode order (the same lists for every split)."""
    return list(dict.fromkeys(e.category for e in emoji)), list(dict.fromkeys(e.subcategory for e in emoji))


def plan(emoji: list[Emoji], style_list: list[Style], folders: dict[str, Path]) -> tuple[dict[str, list], dict]:
    """{split: [(style, emoji, source path)]} and {style: emoji without an image in that style}."""
    rows: dict[str, list] = {s: [] for s in SPLITS}
    absent: dict[str, int] = {}
    for style in style_list:
        folder = folders[style.package]
        files = {}
        if style.kind == "svg":
            files = svg_files(folder, "color/svg" if style.package == "openmoji" else "")
        absent[style.name] = 0
        for e in emoji:
            src = style.path(folder, e, files)
            if src is None:
                absent[style.name] += 1
                continue
            if style.name == HELDOUT_STYLE.name:
                split = "eval_both" if e.heldout else "eval_style"
            else:
                split = "eval_emoji" if e.heldout else "train"
            rows[split].append((style, e, src))
    return rows, absent


def _dataset_meta(split: str, categories: list[str], subcategories: list[str], info: dict) -> dict:
    cats = [_phrase(c) for c in categories]
    subs = [_phrase(s) for s in subcategories]
    for names, kind in ((cats, "category"), (subs, "subcategory")):
        if len(set(names)) != len(names):  # two classes with one prompt would split their images by chance
            twins = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"two {kind} names read the same as words: {twins}")
    return {
        **info,
        "split": split,
        "classes": cats,
        "templates": list(CATEGORY_TEMPLATES),
        "label_sets": {
            "category": {"column": "label", "classes": cats, "templates": list(CATEGORY_TEMPLATES)},
            "subcategory": {"column": "label_subcategory", "classes": subs, "templates": list(SUBCATEGORY_TEMPLATES)},
        },
    }


def build(folders: dict[str, Path], out: str | os.PathLike, *, full_size: int = 128, seed: int = 0,
          heldout: float = 0.15, twitter: str = "svg", shard_rows: int = 1000, workers: int = 1,
          shrink: str = "", log: Any = print) -> dict:
    """Write ``out/<split>`` for every split (Parquet + dataset.json, via ``data ingest``); returns a summary.

    ``folders``: {package key: extracted package folder} (``fetch``'s result, or ``--packages-dir``). Every split
    is written to a temporary folder, and only when all are written do they replace the old ones: a failed rebuild
    with another ``--seed`` must not leave a train split next to eval splits of another held-out choice."""
    if not 0 < heldout < 1:
        raise DataError(f"--heldout must be between 0 and 1, got {heldout}")
    if full_size < 64:
        raise DataError(f"--full-size must be at least 64 (the PNG styles' size), got {full_size}")
    start = time.perf_counter()
    style_list = styles(twitter)
    emoji = load_emoji(folders[TRAIN_STYLES[0]], folders.get(HELDOUT_STYLE.package), seed, heldout)
    categories, subcategories = class_lists(emoji)
    rows, absent = plan(emoji, style_list, folders)
    info = {"source": "emoji:" + ",".join(f"{PACKAGES[s.package].name}@{PACKAGES[s.package].version}"
                                          for s in style_list),
            "seed": seed, "heldout_share": heldout, "full_size": full_size,
            "styles": {s.name: {"package": PACKAGES[s.package].name, "kind": s.kind,
                                "size": full_size if s.kind == "svg" else 64} for s in style_list}}
    summary: dict[str, Any] = {"out": str(out), "emoji": len(emoji), "heldout_emoji": sum(e.heldout for e in emoji),
                               "categories": len(categories), "subcategories": len(subcategories),
                               "absent": absent, "splits": {}}
    out = Path(out)
    staging = out / ".staging"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        _prepare_images(rows, staging, full_size, workers, log)
        summary["seconds_images"] = round(time.perf_counter() - start, 1)
        rows, summary["duplicates"] = drop_duplicates(rows, staging)
        info["duplicates_dropped"] = summary["duplicates"]
        rows["train"] = sorted(rows["train"], key=lambda r: _rng(seed, "order", r[0].name, r[1].key).random())
        written = [s for s in SPLITS if rows[s]]
        for split in written:
            meta = {**_dataset_meta(split, categories, subcategories, info),
                    "rows_per_style": _count(rows[split], lambda r: r[0].name),
                    "rows_per_category": _count(rows[split], lambda r: _phrase(r[1].category))}
            _ingest_split(rows[split], staging, out / f".{split}.part", seed, split, categories, subcategories,
                          meta, shard_rows)
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
            if split in written:
                os.replace(out / f".{split}.part", out / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for split in SPLITS:
            shutil.rmtree(out / f".{split}.part", ignore_errors=True)
    for split in written:
        meta = json.loads((out / split / "dataset.json").read_text())
        summary["splits"][split] = {"rows": meta["rows"], "bytes": _bytes(out / split),
                                    "per_style": meta["rows_per_style"], "per_category": meta["rows_per_category"]}
    summary["seconds_build"] = round(time.perf_counter() - start, 1)
    if shrink:
        from reclip_ray.data.copies import parse_sizes, shrink_dataset

        summary["copies"] = shrink_dataset(out / "train", parse_sizes(shrink), workers=workers, log=log)
    return summary


def _staged(staging: Path, split: str, style: Style, emoji: Emoji) -> Path:
    return staging / split / style.name / f"{emoji.key}.png"


def drop_duplicates(rows: dict[str, list], staging: Path) -> tuple[dict[str, list], dict[str, dict[str, int]]]:
    """The rows without those whose prepared image is byte-identical to one kept before it, and how many of each
    split were dropped and why.

    Vendors draw some emoji alike: Apple's and Google's two-person families are one picture under several names,
    OpenMoji's "family" is its "family: man, woman, boy". The evaluator groups rows by image bytes, so one image
    with two subcategories cannot be scored at all, and an eval image that training saw under another name is no
    unseen emoji. So within a split the first row in plan order (style, then Unicode order) keeps the image, and an
    eval row whose image is in train is dropped."""
    def digest(split: str, style: Style, emoji: Emoji) -> bytes:
        return hashlib.blake2b(_staged(staging, split, style, emoji).read_bytes(), digest_size=16).digest()

    kept: dict[str, list] = {}
    dropped: dict[str, dict[str, int]] = {}
    train: set[bytes] = set()
    for split in SPLITS:  # train first: the eval splits are checked against it
        seen: set[bytes] = set()
        kept[split], counts = [], {"same_image_in_split": 0, "same_image_as_train": 0}
        for row in rows[split]:
            d = digest(split, row[0], row[1])
            if d in seen:
                counts["same_image_in_split"] += 1
            elif split != "train" and d in train:
                counts["same_image_as_train"] += 1
            else:
                seen.add(d)
                kept[split].append(row)
        if split == "train":
            train = seen
        dropped[split] = counts
    return kept, dropped


def _prepare_images(rows: dict[str, list], staging: Path, full_size: int, workers: int, log: Any) -> None:
    """Every row's image, flattened (and rendered), as ``staging/<split>/<style>/<key>.png``."""
    tasks = [(style.kind, str(src), full_size, str(_staged(staging, split, style, e)))
             for split, items in rows.items() for style, e, src in items]
    log(f"[emoji] preparing {len(tasks)} images ({workers} worker(s))")
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(prepare_image, tasks, chunksize=32))
    else:
        for task in tasks:
            prepare_image(task)


def _ingest_split(items: list, staging: Path, dest: Path, seed: int, split: str, categories: list[str],
                  subcategories: list[str], meta: dict, shard_rows: int) -> None:
    """A captions file for the split's staged images, then ``data ingest`` into ``dest``, then its dataset.json."""
    from reclip_ray import storage
    from reclip_ray.data.ingest import ingest_folder
    from reclip_ray.data.schema import read_dataset_json

    captions = staging / f"{split}.jsonl"
    with open(captions, "w", encoding="utf-8") as f:
        for style, e, _ in items:
            f.write(json.dumps({
                "file": f"{style.name}/{e.key}.png", "key": f"{style.name}/{e.key}",
                "caption": caption(e, _rng(seed, split, style.name, e.key)),
                "label": categories.index(e.category), "label_subcategory": subcategories.index(e.subcategory),
            }) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    ingest_folder(staging / split, captions, dest, shard_rows=shard_rows)
    storage.write_json(str(dest / "dataset.json"), {**read_dataset_json(str(dest)), **meta}, sort_keys=False)


def _count(items: list, key: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[key(item)] = counts.get(key(item), 0) + 1
    return counts


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def needed(twitter: str = "svg") -> list[str]:
    """Package keys a build with these options reads."""
    return list(dict.fromkeys(s.package for s in styles(twitter)))


def packages_in(folder: str | os.PathLike, keys: list[str]) -> dict[str, Path]:
    """{key: folder/<package folder>} for already-extracted packages (``--packages-dir``); no network."""
    found = {}
    for key in keys:
        path = Path(folder) / PACKAGES[key].folder
        if not path.is_dir():
            raise DataError(f"--packages-dir {folder}: no {PACKAGES[key].folder} (extracted {PACKAGES[key].name})")
        found[key] = path
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: train/, eval_style/, eval_emoji/, eval_both/")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where tarballs are downloaded and extracted")
    p.add_argument("--packages-dir", default="", help="read already-extracted packages here (no download)")
    p.add_argument("--full-size", type=int, default=128, help="pixels the SVG styles are rendered at")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out emoji and the captions")
    p.add_argument("--heldout", type=float, default=0.15, help="share of emoji names held out of every style")
    p.add_argument("--twitter", default="svg", choices=["svg", "png"], help="Twitter's art from @twemoji/svg "
                   "(rendered at --full-size) or from emoji-datasource-twitter's 64 px PNGs")
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes preparing images")
    p.add_argument("--shrink", default="", metavar="SIZES", help="then shrunk copies of train, as `data shrink`")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        keys = needed(args.twitter)
        folders = packages_in(args.packages_dir, keys) if args.packages_dir else fetch(keys, args.cache, log)
        summary = build(folders, args.out, full_size=args.full_size, seed=args.seed, heldout=args.heldout,
                        twitter=args.twitter, shard_rows=args.shard_rows, workers=args.workers, shrink=args.shrink,
                        log=log)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
