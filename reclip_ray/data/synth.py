"""Captioned shapes: a procedural dataset small enough for CPU tests and rich enough for CLIP to learn.

Each 128 px image holds one object on a scene with six attributes the captions describe: the scene (8: a muted
backdrop tone named "in the sky", "on grass", ...), colour (10), position (the cell of a 3x3 grid its centre sits in:
"top left" ... "bottom right"), size (small/large), shape (10) and a surface pattern (solid/striped/dotted/checkered).
What a tiny ViT learns in the default job's ~500 steps is global colour: the scene's tone and the object's colour
(label sets ``scene`` and ``colour``), so the object is large (0.52-0.68 image sides across) and most captions name
both. Position, shape and pattern are the harder sets, reported at about chance (BENCHMARKS.md, "The default job:
what it learns"): position needs the model to find the object, which it had not done after 450 steps in the probes;
shape needs well over 100k samples at 32 px ("Shape learning"); the patterns have a period of ~4 px at 128 px, so
they average out at 32 px and are plain at 128 px: the detail a low-resolution RECLIP phase cannot learn and a
full-resolution finetune must add. One caption in five is short ("a red shape", "a star", "something in fog"), so
zero-shot prompts are in distribution.

``textured=True`` adds a sixth attribute, the background's texture (plain, horizontal lines, vertical lines, small
checks), as label set ``background``. It is the detail set issue 14 needs: a tiny ViT never learned the object
pattern at 112 px within a CPU budget (the pattern covered one small object and was named in about a third of
the captions), while the texture covers most of every image and most captions name it. Its period (4 px at 128 px) is
a box filter's exact null at 4x, so at 32 px the four textures are the same flat background. The texture is drawn
from its own random stream, so a textured set has the same scenes and captions as the plain one plus the texture.

Rows are a pure function of (seed, split, row): ``np.random.default_rng([seed, split_id, row])``, so any shard can
be rebuilt alone, shards can be written in parallel, and train and eval never share a stream.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import time
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from reclip_ray.errors import DataError

# Chosen to stay distinguishable as ~10 px blobs at 32 px (no pentagon vs hexagon vs circle).
SHAPES = ["circle", "square", "triangle", "star", "diamond", "ring", "arrow", "cross", "heart", "crescent"]
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "brown": (120, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = list(COLOURS)
PATTERNS = ["solid", "striped", "dotted", "checkered"]
BACKGROUNDS = ["plain", "horizontal", "vertical", "checks"]
SIZES = ["small", "large"]
# The scene behind the object: a muted backdrop tone, named with words no object colour uses ("in the sky", not "blue"),
# so a caption's colour word always means the object. The tones are muted and the object colours saturated: in the
# probes, saturated scene tones (and objects 0.2-0.4 image sides across) left object colour at chance after 300
# steps while the scene was learned in 100 (BENCHMARKS.md). Every object colour (brightness jitter included) differs
# from every tone by >= 94 summed over RGB, before the backdrop's own jitter (<= 18 per channel), so the object stands
# out (tests/test_data_synth.py).
SCENES = {"sky": (117, 147, 180), "grass": (105, 141, 87), "sand": (171, 159, 123), "stone": (128, 128, 128),
          "night": (72, 75, 99), "sunset": (180, 123, 108), "sea": (75, 117, 129), "fog": (175, 175, 180)}
SCENE_CLASSES = ["in the sky", "on grass", "on sand", "on stone", "at night", "at sunset", "in the sea", "in fog"]
SCENE_TEMPLATES = ["a shape {}.", "a photo of something {}.", "an object {}."]
# A 3x3 grid of cells, each a third of the image; an object's centre lies in its cell, at most 0.02 image sides from
# the cell's anchor (0.23 / 0.5 / 0.77 along each axis), so it is >= 0.08 image sides from every cell edge and the
# label is never a guess between two cells, even after the training crop (>= 0.9 of the area). Objects are very large
# (0.52-0.68 image sides across; a corner object is cut by the border) because object colour is learned faster the
# more of the image the object covers: 0.40 zero-shot top-1 after 300 probe steps at these sizes, 0.19 at 0.36-0.56,
# at chance at 0.2-0.4 (BENCHMARKS.md, "The default job: what it learns").
POSITIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
_CELL = {pos: (i % 3, i // 3) for i, pos in enumerate(POSITIONS)}  # (column, row)
_ANCHORS = (0.23, 0.5, 0.77)  # centre of column/row 0, 1, 2, in image sides
_JITTER = 0.02  # largest shift of the centre from its anchor, in image sides
_RADIUS = {"small": (0.26, 0.29), "large": (0.31, 0.34)}  # circumradius, in image sides
SPLITS = {"train": 0, "eval": 1}
JPEG_QUALITY = 90
IMAGE_SIZE = 128  # side of every synthetic image

SHAPE_TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.", "an image of a {}."]
COLOUR_TEMPLATES = ["a {} shape.", "a photo of a {} object.", "something {}."]
PATTERN_TEMPLATES = ["a {} shape.", "a photo of a {} shape.", "a picture of a {} object."]
# Background classes are whole phrases so that captions and prompts share their words ("... on vertical lines").
BACKGROUND_PHRASES = {"plain": ["a plain background", "a blank background"], "horizontal": ["horizontal lines"],
                      "vertical": ["vertical lines"], "checks": ["small checks"]}
BACKGROUND_CLASSES = [BACKGROUND_PHRASES[b][0] for b in BACKGROUNDS]
BACKGROUND_TEMPLATES = ["a shape on {}.", "a photo of a shape on {}.", "something on {}."]
BACKGROUND_CONTRAST = 0.22  # +-22 % of the background's brightness: plain to see at 112 px, gone at 32 px

# The first phrase of each position is its zero-shot class; every phrase names the cell alone (no "top" in a corner's
# phrase other than with its side, so "at the top" is the top middle cell).
_POSITION_WORDS = {
    "top left": ["in the top left corner", "at the top left", "in the upper left corner"],
    "top": ["at the top", "near the top", "at the top edge"],
    "top right": ["in the top right corner", "at the top right", "in the upper right corner"],
    "left": ["on the left", "on the left side", "at the left"],
    "centre": ["in the centre", "in the middle", "in the center"],
    "right": ["on the right", "on the right side", "at the right"],
    "bottom left": ["in the bottom left corner", "at the bottom left", "in the lower left corner"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom edge"],
    "bottom right": ["in the bottom right corner", "at the bottom right", "in the lower right corner"],
}
POSITION_CLASSES = [_POSITION_WORDS[p][0] for p in POSITIONS]
POSITION_TEMPLATES = ["a shape {}.", "a photo of something {}.", "an object {}."]
_PATTERN_ADJ = {"solid": ["solid", "plain"], "striped": ["striped"], "dotted": ["dotted", "polka-dot"],
                "checkered": ["checkered"]}
# no size words here ("small dots" would name a size the object may not have)
_PATTERN_WITH = {"solid": ["a solid fill", "no pattern"], "striped": ["stripes", "thin stripes"],
                 "dotted": ["dots", "polka dots"], "checkered": ["a checkerboard pattern", "checks"]}
_SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
# How often a (long) caption names each attribute, and the share of short captions: see caption_for.
_NAMED = {"colour": 0.8, "position": 0.8, "scene": 0.7, "shape": 0.65, "size": 0.4, "pattern": 0.3}
_SHORT = 0.2
_PREFIXES = ["", "", "a photo of ", "a picture of ", "an image of ", "a drawing of "]


# -------------------------------------------------------------------------------------------------- drawing


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon outline of a shape with circumradius ~r."""
    def poly(n: int, start: float, radii=(1.0,)) -> list[tuple[float, float]]:
        k = len(radii)
        return [
            (math.cos(start + 2 * math.pi * i / (n * k)) * radii[i % k], math.sin(start + 2 * math.pi * i / (n * k)) * radii[i % k])
            for i in range(n * k)
        ]

    if shape == "square":
        pts = [(x * 0.8, y * 0.8) for x, y in [(-1, -1), (1, -1), (1, 1), (-1, 1)]]
    elif shape == "triangle":
        pts = poly(3, -math.pi / 2)
        pts = [(x, y + 0.2) for x, y in pts]
    elif shape == "star":
        pts = poly(5, -math.pi / 2, radii=(1.0, 0.45))
    elif shape == "diamond":
        pts = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    elif shape == "arrow":  # pointing right: a shaft and a wide head
        pts = [(-1, -0.28), (0.1, -0.28), (0.1, -0.75), (1, 0), (0.1, 0.75), (0.1, 0.28), (-1, 0.28)]
    elif shape == "cross":
        a, b = 0.32, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3 / 17
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 17 - 0.1
        pts = list(zip(xs.tolist(), ys.tolist()))
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Antialiased coverage in [0, 1]: drawn at 2x and box-reduced (cheap at these sizes)."""
    s2 = 2 * size
    m = Image.new("L", (s2, s2), 0)
    d = ImageDraw.Draw(m)
    cx2, cy2, r2 = 2 * cx, 2 * cy, 2 * r
    if shape == "circle":
        d.ellipse([cx2 - r2, cy2 - r2, cx2 + r2, cy2 + r2], fill=255)
    elif shape == "ring":
        d.ellipse([cx2 - r2, cy2 - r2, cx2 + r2, cy2 + r2], fill=255)
        r3 = 0.5 * r2
        d.ellipse([cx2 - r3, cy2 - r3, cx2 + r3, cy2 + r3], fill=0)
    elif shape == "crescent":
        d.ellipse([cx2 - r2, cy2 - r2, cx2 + r2, cy2 + r2], fill=255)
        ox, oy = 0.45 * r2 * math.cos(angle), 0.45 * r2 * math.sin(angle)
        r3 = 0.85 * r2
        d.ellipse([cx2 + ox - r3, cy2 + oy - r3, cx2 + ox + r3, cy2 + oy + r3], fill=0)
    else:
        d.polygon(_shape_points(shape, cx2, cy2, r2, angle), fill=255)
    return np.asarray(m.reduce(2), dtype=np.float32) * (1.0 / 255.0)


@lru_cache(maxsize=64)
def _pattern(pattern: str, variant: int, size: int) -> np.ndarray:
    """Boolean (size, size) texture: True = object colour, False = contrast colour. Period ~4 px at 128 px."""
    period = 4.0 * size / 128
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    phase = variant * period / 4
    if pattern == "solid":
        return np.ones((size, size), dtype=bool)
    if pattern == "striped":
        angle = [0, 90][variant % 2] * math.pi / 180  # axis-aligned: averages out exactly at 4x smaller
        u = x * math.cos(angle) + y * math.sin(angle) + phase
        return np.floor(u / (period / 2)).astype(np.int64) % 2 == 0
    if pattern == "dotted":
        p = period
        dx = np.mod(x + phase, p) - p / 2
        dy = np.mod(y + phase, p) - p / 2
        return ~((dx * dx + dy * dy) <= (0.3 * p) ** 2)  # dots of the contrast colour on the object colour
    if pattern == "checkered":
        return (np.floor((x + phase) / (period / 2)).astype(np.int64) + np.floor((y + phase) / (period / 2)).astype(np.int64)) % 2 == 0
    raise ValueError(pattern)


def _contrast(rgb: np.ndarray) -> np.ndarray:
    """Second colour of a pattern: a dark shade, or a light tint for dark colours; same hue family."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 90:
        return rgb * np.float32(0.35)
    return rgb + (np.float32(255.0) - rgb) * np.float32(0.55)


def _background(rng: np.random.Generator, size: int, scene: str) -> np.ndarray:
    """The scene's tone, jittered, as a gentle two-colour gradient with a little noise."""
    c1 = np.array(SCENES[scene], np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    c2 = c1 + rng.uniform(-12, 12, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size
    g = ramp[None, :] * np.float32(math.cos(angle)) + ramp[:, None] * np.float32(math.sin(angle))
    g -= g.min()
    g *= np.float32(1.0 / max(1e-6, float(g.max())))
    img = c1 + g[..., None] * (c2 - c1)
    img += rng.integers(-5, 6, size=(size, size, 1), dtype=np.int8)
    return img


@lru_cache(maxsize=64)
def _texture(background: str, phase_x: int, phase_y: int, size: int) -> np.ndarray:
    """(size, size, 1) brightness factor of a background texture: a square wave of period 4 px at 128 px. Cached
    like ``_pattern``: 49 distinct textures per image size, read only by ``render``."""
    if background == "plain":
        return np.ones((size, size, 1), dtype=np.float32)
    half = 2.0 * size / 128
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    sx = np.floor((x + phase_x) / half).astype(np.int64) % 2
    sy = np.floor((y + phase_y) / half).astype(np.int64) % 2
    wave = {"horizontal": sy, "vertical": sx, "checks": (sx + sy) % 2}[background]
    return (1.0 + BACKGROUND_CONTRAST * (2.0 * wave - 1.0)).astype(np.float32)[..., None]


def _sample_scene(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """One object, centred in one cell of a 3x3 grid (its position label). A list, so that ``render`` takes any
    scene."""
    pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
    scene = list(SCENES)[int(rng.integers(len(SCENES)))]
    size_word = SIZES[int(rng.integers(len(SIZES)))]
    col, row = _CELL[pos]
    dx, dy = rng.uniform(-_JITTER, _JITTER, 2)
    return [{
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "colour": COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
        "pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
        "size": size_word,
        "position": pos,
        "scene": scene,
        "cx": (_ANCHORS[col] + dx) * size,
        "cy": (_ANCHORS[row] + dy) * size,
        "r": size * rng.uniform(*_RADIUS[size_word]),
        "angle": float(rng.uniform(-0.25, 0.25)),
        "brightness": float(rng.uniform(0.85, 1.1)),
        "variant": int(rng.integers(4)),
    }]


def render(objects: list[dict[str, Any]], rng: np.random.Generator, size: int,
           texture: np.ndarray | None = None) -> np.ndarray:
    img = _background(rng, size, objects[0]["scene"])
    if texture is not None:
        img *= texture
    for obj in reversed(objects):  # main object last = on top
        base = np.clip(np.array(COLOURS[obj["colour"]], dtype=np.float32) * np.float32(obj["brightness"]), 0, 255)
        other = _contrast(base)
        # composite only inside the object's bounding box: most of the image is background
        pad = obj["r"] * 1.1 + 2
        x0, y0 = max(0, int(obj["cx"] - pad)), max(0, int(obj["cy"] - pad))
        x1, y1 = min(size, int(obj["cx"] + pad) + 1), min(size, int(obj["cy"] + pad) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        tex = _pattern(obj["pattern"], obj["variant"], size)[y0:y1, x0:x1]
        layer = np.where(tex[..., None], base, other)
        m = _mask(obj["shape"], obj["cx"], obj["cy"], obj["r"], obj["angle"], size)[y0:y1, x0:x1, None]
        region = img[y0:y1, x0:x1]
        region += m * (layer - region)
    img += 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def caption_for(objects: list[dict[str, Any]], rng: np.random.Generator) -> str:
    """A caption for the scene's object: colour, position and scene in most captions, the rest less often.

    Colour (~71 % of captions), position (~71 %) and scene (~61 %) are named most often (measured over 3,000 rows);
    shape (~57 %), size and pattern less. One caption in five takes the short form ("a red shape", "a star",
    "something in the centre", "a shape at night"), so the zero-shot prompts are in distribution. Words are fixed per
    value (the colour's name, the position's and the scene's phrases): the zero-shot classes use the same ones. The
    scene comes first half the time ("in fog, a red star ..."), because the 32 px phase keeps 14 tokens of a caption.
    """
    obj = objects[0]
    colour, shape = obj["colour"], obj["shape"]
    where = _pick(rng, _POSITION_WORDS[obj["position"]])
    scene = SCENE_CLASSES[list(SCENES).index(obj["scene"])]
    if rng.random() < _SHORT:
        prefix = _pick(rng, _PREFIXES)
        return prefix + _pick(rng, [f"a {colour} shape", _a(shape), f"a shape {where}", f"something {colour}",
                                    f"{_a(colour)} {shape}", f"something {where}", f"a shape {scene}",
                                    f"something {scene}"])
    named = {a for a, p in _NAMED.items() if rng.random() < p}
    if not named & {"colour", "position"}:
        named.add(_pick(rng, ["colour", "position"]))
    adjs = [_pick(rng, _SIZE_WORDS[obj["size"]])] if "size" in named else []
    with_pattern = ""
    if "pattern" in named:
        if rng.random() < 0.5:
            adjs.append(_pick(rng, _PATTERN_ADJ[obj["pattern"]]))
        else:
            with_pattern = f" with {_pick(rng, _PATTERN_WITH[obj['pattern']])}"
    if "colour" in named:
        adjs.append(colour)
    noun = _a(" ".join(adjs + [shape if "shape" in named else _pick(rng, ["shape", "object"])]))
    where = f" {where}" if "position" in named else ""
    template = int(rng.integers(4))
    if template == 0:
        text = f"{noun}{with_pattern}{where}"
    elif template == 1:
        text = f"there is {noun}{with_pattern}{where}"
    elif template == 2:
        text = f"{_pick(rng, _PREFIXES[2:])}{noun}{with_pattern}{where}"
    else:
        text = f"{where.strip()} there is {noun}{with_pattern}" if where else f"{noun}{with_pattern}"
    if "scene" not in named:
        return text
    # first half the time: the 32 px phase keeps 14 tokens of a caption, so a long one loses its end
    return f"{scene}, {text}" if rng.random() < 0.5 else f"{text} {scene}"


# -------------------------------------------------------------------------------------------------- shards


def make_row(seed: int, split: str, row: int, image_size: int = IMAGE_SIZE, textured: bool = False) -> dict[str, Any]:
    """One sample, a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], row])
    objects = _sample_scene(rng, image_size)
    background, texture = "plain", None
    if textured:
        trng = np.random.default_rng([seed, SPLITS[split], row, 1])
        background = BACKGROUNDS[int(trng.integers(len(BACKGROUNDS)))]
        texture = _texture(background, int(trng.integers(4)), int(trng.integers(4)), image_size)
    pixels = render(objects, rng, image_size, texture)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    main = objects[0]
    caption = caption_for(objects, rng)
    if textured and trng.random() < 0.8:
        caption += " on " + _pick(trng, BACKGROUND_PHRASES[background])
    row_dict = {
        "key": f"{split}-{row:08d}",
        "image": buf.getvalue(),
        "caption": caption,
        "width": image_size,
        "height": image_size,
        "label": SHAPES.index(main["shape"]),
        "label_pattern": PATTERNS.index(main["pattern"]),
        "label_colour": COLOUR_NAMES.index(main["colour"]),
        "label_position": POSITIONS.index(main["position"]),
        "label_scene": list(SCENES).index(main["scene"]),
    }
    if textured:
        row_dict["label_background"] = BACKGROUNDS.index(background)
    return row_dict


def _write_shard(task: tuple[str, str, int, int, int, int, int, bool]) -> int:
    import pyarrow as pa

    from reclip_ray.data.shards import write_parquet_atomic

    out_dir, split, seed, start, stop, index, image_size, textured = task
    rows = [make_row(seed, split, r, image_size, textured) for r in range(start, stop)]
    columns = {
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], pa.binary()),
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
    }
    if split == "eval":
        columns["label"] = pa.array([r["label"] for r in rows], pa.int32())
        columns["label_pattern"] = pa.array([r["label_pattern"] for r in rows], pa.int32())
        columns["label_colour"] = pa.array([r["label_colour"] for r in rows], pa.int32())
        columns["label_position"] = pa.array([r["label_position"] for r in rows], pa.int32())
        columns["label_scene"] = pa.array([r["label_scene"] for r in rows], pa.int32())
        if textured:
            columns["label_background"] = pa.array([r["label_background"] for r in rows], pa.int32())
    from reclip_ray.storage import join

    write_parquet_atomic(pa.table(columns), join(out_dir, f"shard-{index:05d}.parquet"))
    return len(rows)


def _dataset_json(split: str, rows: int, seed: int, image_size: int, textured: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "rows": rows,
        "source": "synthetic:captioned-shapes",
        "split": split,
        "seed": seed,
        "image_size": image_size,
        "attributes": {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS,
                       "scene": list(SCENES), "pattern": PATTERNS},
    }
    if textured:
        meta["source"] = "synthetic:captioned-shapes-textured"
        meta["attributes"]["background"] = BACKGROUNDS
    if split == "eval":
        meta["classes"] = list(SHAPES)
        meta["templates"] = list(SHAPE_TEMPLATES)
        meta["label_sets"] = {
            "shape": {"column": "label", "classes": list(SHAPES), "templates": list(SHAPE_TEMPLATES)},
            "pattern": {"column": "label_pattern", "classes": list(PATTERNS), "templates": list(PATTERN_TEMPLATES)},
            # the easy sets: colour and scene (global colour, learned in the default job); position, shape harder
            "colour": {"column": "label_colour", "classes": list(COLOUR_NAMES), "templates": list(COLOUR_TEMPLATES)},
            "position": {"column": "label_position", "classes": list(POSITION_CLASSES),
                         "templates": list(POSITION_TEMPLATES)},
            "scene": {"column": "label_scene", "classes": list(SCENE_CLASSES), "templates": list(SCENE_TEMPLATES)},
        }
        if textured:
            meta["label_sets"]["background"] = {"column": "label_background", "classes": list(BACKGROUND_CLASSES),
                                                "templates": list(BACKGROUND_TEMPLATES)}
    return meta


def make_synthetic(
    out: str | os.PathLike,
    train: int = 20000,
    eval: int = 1000,
    seed: int = 0,
    shard_rows: int = 1000,
    image_size: int = IMAGE_SIZE,
    workers: int | None = None,
    textured: bool = False,
) -> dict:
    """Write ``out/train`` and ``out/eval`` (Parquet shards + dataset.json); returns a summary."""

    if not 32 <= image_size <= 256:
        raise DataError(f"synthetic image_size must be between 32 and 256, got {image_size}")
    if train < 0 or eval < 0 or train + eval == 0:
        raise DataError(f"need a positive number of rows (train={train}, eval={eval})")
    if shard_rows <= 0:
        raise DataError(f"shard_rows must be positive, got {shard_rows}")
    from reclip_ray import storage

    out = storage.normalize(str(out))
    start_time = time.perf_counter()
    tasks = []
    for split, rows in (("train", train), ("eval", eval)):
        if rows == 0:
            continue
        split_dir = storage.join(out, split)
        if storage.local_path(split_dir):  # an object store has no folders to make
            os.makedirs(split_dir, exist_ok=True)
        for stale in storage.list_files(split_dir):  # a rerun with fewer rows must not keep old shards
            name = storage.name(stale)
            if storage.parent(stale) == split_dir and name.startswith("shard-") and name.endswith(".parquet"):
                storage.delete_file(stale)
        for index, start in enumerate(range(0, rows, shard_rows)):
            tasks.append((split_dir, split, seed, start, min(rows, start + shard_rows), index, image_size,
                          textured))
    if workers is None:
        workers = min(len(tasks), os.cpu_count() or 1) if train + eval >= 4000 else 1
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            list(pool.imap_unordered(_write_shard, tasks))
    else:
        for task in tasks:
            _write_shard(task)
    summary: dict[str, Any] = {"out": out}
    for split, rows in (("train", train), ("eval", eval)):
        if rows == 0:
            continue
        shards = math.ceil(rows / shard_rows)
        meta = _dataset_json(split, rows, seed, image_size, textured)
        storage.write_json(storage.join(out, split, "dataset.json"), meta, sort_keys=False)
        summary[split] = {"path": storage.join(out, split), "rows": rows, "shards": shards}
    summary["seconds"] = round(time.perf_counter() - start_time, 2)
    return summary
