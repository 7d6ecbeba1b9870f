"""Image bytes -> fixed-size uint8 RGB arrays, cheaply and without surprises.

The RECLIP main phase trains at 32-64 px from sources of 256-1024 px, so a full JPEG decode wastes most of its
work. JPEG can decode at 1/2, 1/4 or 1/8 scale inside the IDCT (``Image.draft``), which is what makes small-image
training fast on the CPU side; we pick the largest reduction that still leaves at least ``size`` pixels across the
crop, so quality matches a full decode followed by a resize.

Crop policy: train = random resized crop (area 0.9-1.0, aspect 3/4-4/3) and no flips, because captions name left
and right; eval = resize the shorter side, centre crop (or, for an open_clip model that asks for it, the whole image
squashed to the square, or fitted into it by its longer side and padded: ``EvalResize``). Each is done by one
``Image.resize(box=...)`` call, so the crop never materialises an intermediate image; but an open_clip model's
shortest-side crop, made as torchvision makes it (``EvalResize.open_clip``), so that it gets its own pixels.

Colour policy: everything ends as 8-bit RGB. Transparent images (LA, RGBA, P with transparency) are composited
onto white, which is how a browser or a caption writer saw them (a large one after a premultiplied reduction, so
that the composite is not made at full size: ``_rgb_reduced``). 16-bit and integer images are scaled to 8 bits
(not clipped; a strip at a time, and a large one reduced the same way first), CMYK goes through PIL's conversion.
That is training's policy and reclip-ray's own models' eval. An open_clip folder's eval (``EvalResize.open_clip``)
takes open_clip's instead, so that it is scored on its own ``preprocess``'s pixels: the image is resized, cropped
and padded in the mode it decoded to (PIL's own resize per mode: premultiplied for RGBA and LA, nearest for P and
1), then PIL's ``convert("RGB")`` (``open_clip_rgb``): alpha dropped, not composited, 16-bit clipped to 255, not
scaled.

Bad input: undecodable, truncated or too-large (PIL's ``Image.MAX_IMAGE_PIXELS`` decompression-bomb limit, which we
keep) images raise :class:`BadImage` with a short reason, so callers can skip and count them.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Random resized crop ranges. Narrow on purpose: a synthetic object "on the left" must stay on the left.
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
RESAMPLE = Image.Resampling.BICUBIC
# What an eval resize may be (``EvalResize``), named as open_clip's preprocess_cfg names them.
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "squash", "longest")


@dataclass(frozen=True)
class EvalResize:
    """How ``decode_image`` makes an eval image square: ``shortest`` resizes the shorter side and centre-crops
    (CLIP's transform; reclip-ray's own models are scored so), ``squash`` resizes the whole image, aspect ratio lost,
    ``longest`` resizes the longer side to the square's (aspect kept) and centre-pads the rest with ``fill`` (RGB);
    with bicubic or bilinear interpolation. An open_clip folder's ``preprocess_cfg`` picks them
    (``openclip.eval_resize``): a model trained on squashed or padded images, scored on centre crops, loses what the
    crop cuts off and sees other shapes.

    ``open_clip`` (what ``openclip.eval_resize`` sets): make the pixels open_clip's ``preprocess`` makes. For
    ``shortest`` that is torchvision's ``Resize(size)`` and ``CenterCrop(size)`` on the PIL image
    (``shortest_resize``: the long side rounded down, the crop at whole pixels), not the exact centre square:
    without it an open_clip folder was fed pixels up to 0.475 of the range away from its own transform's (a 100 x
    137 PNG at 64 px). For every mode it is open_clip's colour handling: resized (and padded) in the image's own
    mode, then ``convert("RGB")`` (``open_clip_rgb``): an RGBA PNG's fully transparent pixels are black once resized
    (PIL resizes premultiplied) and keep their hidden colour where the image is already the size, where the composite
    gave white, 255 of 255 apart. reclip-ray's own models keep the exact centre and the composite, which their
    published numbers were measured with."""

    mode: str = "shortest"
    interpolation: str = "bicubic"
    fill: tuple[int, int, int] = (0, 0, 0)
    open_clip: bool = False


EVAL_RESIZE = EvalResize()

_BAD_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
               Image.DecompressionBombError, Image.DecompressionBombWarning)


class BadImage(Exception):
    """An image that cannot be used; ``str(exc)`` is the reason (e.g. "cannot identify image")."""


def _open(data: bytes) -> Image.Image:
    """Open without decoding pixels; enforces the decompression-bomb limit as an error, not a warning."""
    if not data:
        raise BadImage("empty image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImage("cannot identify image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except _BAD_ERRORS as exc:
            if "truncated" in str(exc).lower():
                raise BadImage(f"truncated image: {exc}") from None
            raise BadImage(f"cannot open image: {exc}") from None
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:  # PIL only warns between 1x and 2x the limit; treat both as bad
        raise BadImage(f"decompression bomb: {w}x{h} exceeds Image.MAX_IMAGE_PIXELS={limit}")
    if w <= 0 or h <= 0:
        raise BadImage(f"empty image {w}x{h}")
    return img


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only; raises BadImage when the header is unreadable."""
    return _open(data).size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (alpha onto white, 16/32-bit scaled to 8-bit)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        if mode in ("RGBa", "La"):
            img = img.convert(mode.replace("a", "A"))
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if _is_wide(img):
        return _eight_bit(img, _spans_16_bits(img)).convert("RGB")
    return img.convert("RGB")


def open_clip_rgb(img: Image.Image) -> Image.Image:
    """open_clip's last PIL step (``MaybeConvertMode``, ``_convert_to_rgb`` before it): ``img.convert("RGB")``, after
    its resize and crop. Alpha is dropped, not composited; P maps its palette, its transparency ignored; 16-bit and
    integer values are clipped to 0-255, not scaled. La (a TIFF's premultiplied grey), which that conversion refuses
    ("conversion from La to L not supported", so open_clip cannot preprocess it), is unpremultiplied to LA first."""
    if img.mode == "RGB":
        return img
    if img.mode == "La":
        img = img.convert("LA")
    with warnings.catch_warnings():  # open_clip warns too, once per image: nothing for the eval's user to act on
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        return img.convert("RGB")


def _open_clip_pad(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """open_clip's ``CenterCropOrPad`` of a ``longest`` resize, in the image's own mode as torchvision pads a PIL
    image (``ImageOps.expand`` with its ``fill_color``, every band of it for an integer: a palette index in P), so
    that ``open_clip_rgb`` then gives its pixels. The odd pixel of margin goes after the image. A colour that is not
    one grey on an image without three bands is refused by torchvision ("number of elements in 'fill' does not
    match"); it is padded here after the conversion instead, in that colour."""
    bands = len(img.getbands())
    left, top = (size - img.width) // 2, (size - img.height) // 2
    border = (left, top, size - img.width - left, size - img.height - top)
    if bands != 3 and len(set(fill)) != 1:
        rgb = open_clip_rgb(img)
        return ImageOps.expand(rgb, border=border, fill=fill)
    colour: Any = fill if bands == 3 else fill[0] if bands == 1 else (fill[0],) * bands
    if img.mode == "F":
        colour = float(colour)
    out = ImageOps.expand(img, border=border, fill=colour)
    if img.mode == "P":  # as torchvision does
        out.putpalette(img.getpalette())
    return out


def _is_wide(img: Image.Image) -> bool:
    """Integer or float pixels (16-bit PNG grey, 32-bit TIFF): ``to_rgb`` scales them to 8 bits itself."""
    return img.mode.startswith("I") or img.mode == "F"


def _spans_16_bits(img: Image.Image) -> bool:
    """Whether a wide image's values are scaled from 0-65535 (16-bit modes, or any value above 255) rather than
    kept as 0-255. Decided once for the whole image, never per strip, from PIL's extrema (no copy)."""
    if img.mode.startswith("I;16"):
        return True
    extrema = img.getextrema()
    highest = max(e[1] for e in extrema) if isinstance(extrema[0], tuple) else extrema[1]
    return highest > 255


def _eight_bit(img: Image.Image, wide: bool) -> Image.Image:
    """A wide image as 8-bit ("L", or "RGB" for integer channels): 0-65535 scaled (``wide``) or 0-255 kept, rounded.

    A strip of rows at a time, in integers: round(v * 255 / 65535) is (v + 128) // 257 exactly, as 65535 = 255 *
    257 and v / 257 is never within 1/514 of a half, where float32 was exact too, so the pixels are the float
    formula's. Why: the float copies of a whole image were 2x its 16-bit size each, three of them (an 8000 x 8000
    grey PNG, 122 MB decoded, took 857 MB more at peak to become a 64 px crop; 139 MB now, reduced as well)."""
    w, h = img.size
    rows = max(1, STRIP_PIXELS // w)
    out = None
    for top in range(0, h, rows):
        arr = np.asarray(img.crop((0, top, w, min(h, top + rows))))
        if arr.ndim == 3:  # integer channels (no PIL mode reads so today): the first three
            arr = arr[..., :3]
        if arr.dtype.kind == "f":
            arr = np.clip(arr, 0, 65535) * np.float32(255.0 / 65535.0) if wide else arr
            part = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        elif wide:
            part = ((np.clip(arr, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
        else:
            part = np.clip(arr, 0, 255).astype(np.uint8)
        if out is None:
            out = np.empty((h, *part.shape[1:]), np.uint8)
        out[top:top + part.shape[0]] = part
    return Image.fromarray(out)


# An image with alpha is first reduced (box filter, premultiplied) by the largest integer that leaves its crop at
# least this many times the output size: Pillow's ``reducing_gap``, "indistinguishable" from one resample from 3.0.
REDUCING_GAP = 3.0
STRIP_PIXELS = 1 << 20  # source pixels converted per strip while reducing: ~8 MB of RGBA and its premultiplied copy


def _has_alpha(img: Image.Image) -> bool:
    """Whether ``to_rgb`` composites this image onto white."""
    return img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (img.mode == "P" and "transparency" in img.info)


def _rgb_reduced(img: Image.Image, box: tuple[float, float, float, float],
                 size: int | tuple[int, int]) -> tuple[Image.Image, int]:
    """``to_rgb(img)``, reduced k times when it has alpha or wide pixels (``_is_wide``) and the crop ``box`` spans
    >= 2 * REDUCING_GAP * size px (``size``: the output's side, or its (width, height), axis by axis); returns it and
    k (1: not reduced). A source coordinate x is x / k in the result, as after ``_draft``.

    Why: compositing onto white at full size made four more full-size images (a 9000 x 9000 RGBA PNG of 1.6 MB
    took 1.5 GB to become a 64 px crop, 320 MB this way). Here strips of the image are reduced one at a time, so
    only the decoded image is full size. Reducing premultiplied colour (``Image.reduce`` does), then compositing
    onto white, is compositing then reducing, up to rounding: both are linear in (premultiplied colour, alpha).
    A wide image's strips are made 8-bit (``_eight_bit``, scaled as the whole image is) and then reduced, so its
    8-bit grey and RGB copies are not full size either. An RGB or grey image is resized with no full-size copy
    already."""
    out_w, out_h = _out_size(size)
    k = int(min((box[2] - box[0]) // (REDUCING_GAP * out_w), (box[3] - box[1]) // (REDUCING_GAP * out_h)))
    wide = _is_wide(img)
    if k < 2 or not (wide or _has_alpha(img)):
        return to_rgb(img), 1
    w, h = img.size
    out = Image.new("RGB", (-(-w // k), -(-h // k)))
    rows = k * max(1, STRIP_PIXELS // (w * k))  # a multiple of k: strips are whole rows of k x k blocks
    sixteen = wide and _spans_16_bits(img)
    for top in range(0, h, rows):
        strip = img.crop((0, top, w, min(h, top + rows)))
        if wide:
            out.paste(_eight_bit(strip, sixteen).reduce(k).convert("RGB"), (0, top // k))
            continue
        if strip.mode in ("RGBa", "La"):  # premultiplied already (a TIFF's associated alpha): unpremultiply first
            strip = strip.convert(strip.mode.replace("a", "A"))
        if strip.mode not in ("RGBA", "LA"):  # P, PA: Image.reduce premultiplies RGBA and LA itself
            strip = strip.convert("RGBA")
        out.paste(to_rgb(strip.reduce(k)), (0, top // k))
    return out, k


def _crop_box(width: int, height: int, *, train: bool, rng: Any = None) -> tuple[float, float, float, float]:
    """Crop rectangle (left, top, right, bottom) in source pixels. ``rng``: anything with ``uniform(a, b)`` (a
    ``random.Random`` or a numpy Generator)."""
    if not train:
        side = min(width, height)
        left = (width - side) / 2
        top = (height - side) / 2
        return (left, top, left + side, top + side)
    rng = rng if rng is not None else np.random.default_rng()
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * ratio)
        h = math.sqrt(target / ratio)
        if w <= width and h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    # Fallback (very elongated source): the whole image, squeezed to a square like torchvision's fallback.
    return (0.0, 0.0, float(width), float(height))


def _out_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """An output size as (width, height): a square's side, or the pair itself (``longest``'s unpadded resize)."""
    return (size, size) if isinstance(size, int) else size


def fit_longest(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image resized so its longer side is ``size``, aspect kept: open_clip's
    ``ResizeKeepRatio(longest=1)``, rounded as it rounds (Python's ``round``), so the padded image is its pixels; at
    least 1 px, where open_clip would fail on an image 100 times wider than tall."""
    ratio = max(height / size, width / size)
    return max(1, round(width / ratio)), max(1, round(height / ratio))


# An ``EvalResize.open_clip`` shortest resize makes the whole resized image before cropping, as torchvision does:
# size x size * aspect px. When it shrinks the image that is smaller than the decoded image already held; when it
# enlarges a small one (shorter side < size) it is made whole only up to this many px (4M, 12 MB of RGB: an aspect of
# 83 at 224 px, 1024 at 64 px). Past both, the crop alone is resized (one box resize, no intermediate image), and its
# pixels are close to open_clip's, not equal (README, "Use it with open_clip"). Unbounded, a 1 px wide, 89M px tall
# image would become 224 x 20G px at 224.
WHOLE_RESIZE_PIXELS = 1 << 22


def shortest_resize(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(width, height, left, top): the image torchvision's ``Resize(size)`` makes of a PIL image (open_clip's
    ``shortest``: the shorter side ``size``, the longer ``int(size * long / short)``, rounded down) and where its
    ``CenterCrop(size)`` starts (``int(round(margin / 2))``: whole pixels, Python's round, a half to the even one).
    The resized image is never smaller than ``size``, so CenterCrop never pads here."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)  # torchvision's expression, evaluated in the same order
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return new_w, new_h, int(round((new_w - size) / 2)), int(round((new_h - size) / 2))


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int | tuple[int, int]) -> int:
    """Ask the JPEG decoder for the smallest DCT scale that keeps the crop >= size px (``size``: the output's side,
    or its (width, height)); returns the reduction d applied (1, 2, 4 or 8).

    The decoder shrinks each 8 x 8 block to (8/d) x (8/d) pixels, so reduced pixel i covers source pixels
    [d i, d (i + 1)): the reduced image is ceil(W/d) wide, its last column partly the encoder's edge padding, and a
    source coordinate x is x / d in it (PIL's ``draft`` returns that box, (0, 0, W/d, H/d)), not x ceil(W/d) / W.
    """
    if img.format not in ("JPEG", "MPO"):  # MPO: a phone camera's multi-picture JPEG, frame 0 a plain JPEG
        return 1
    out_w, out_h = _out_size(size)
    k = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)  # how much we may shrink and still cover `size`
    if k < 2:
        return 1
    w, h = img.size
    # PIL picks scale = largest of 1/2/4/8 with scale <= min(w // req_w, h // req_h); ceil keeps scale <= k.
    request = (max(1, math.ceil(w / k)), max(1, math.ceil(h / k)))
    drafted = img.draft("RGB", request)  # None when PIL cannot draft this file (then it decodes at full size)
    return 1 if drafted is None else round(w / drafted[1][2])


def decode_image(data: bytes, size: int, *, train: bool, rng: Any = None,
                 resize: EvalResize = EVAL_RESIZE) -> np.ndarray:
    """Decode, crop and resize to a (size, size, 3) uint8 RGB array. Raises BadImage for unusable input. ``resize``:
    how an eval image (``train`` False) is made square; the train crop is always bicubic."""
    img = _open(data)
    src_w, src_h = img.size
    out_size = (size, size)
    as_open_clip = not train and resize.open_clip  # its colour handling too: the mode kept until open_clip_rgb
    whole = None  # (width, height, left, top): resized whole, then cropped (``EvalResize.open_clip``)
    if as_open_clip and resize.mode == "shortest":
        whole = shortest_resize(src_w, src_h, size)
        new_w, new_h, left, top = whole
        sx, sy = src_w / new_w, src_h / new_h  # the crop in source pixels: what _draft and _rgb_reduced keep >= size
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    elif train or resize.mode == "shortest":
        box = _crop_box(src_w, src_h, train=train, rng=rng)
    else:  # the whole image, resized to the square (squash) or into it, to be padded (longest)
        box = (0.0, 0.0, float(src_w), float(src_h))
        if resize.mode == "longest":
            out_size = fit_longest(src_w, src_h, size)
    resample = RESAMPLE if train else INTERPOLATIONS[resize.interpolation]
    try:
        scale = _draft(img, box, out_size)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        if scale != 1:  # the crop in the reduced image: source coordinates / d (_draft)
            box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
        # open_clip resizes the decoded image in its own mode: a reduction first would not be its pixels (P and 1
        # are resized nearest, an RGBA reduced then resized is rounded twice), so it is not made there
        img, k = (img, 1) if as_open_clip else _rgb_reduced(img, box, out_size)
        if k != 1:  # likewise after reducing an image with alpha
            box = (box[0] / k, box[1] / k, box[2] / k, box[3] / k)
        if whole is not None and whole[0] * whole[1] <= max(WHOLE_RESIZE_PIXELS, img.width * img.height):
            # torchvision's two calls, so the pixels are its own (one box resize of the crop is not: Pillow may run
            new_w, new_h, left, top = whole  # its two passes the other way round, 24 of 255 apart measured)
            reduced = scale * k
            source = None if reduced == 1 else (0.0, 0.0, src_w / reduced, src_h / reduced)
            out = img.resize((new_w, new_h), resample, box=source).crop((left, top, left + size, top + size))
        else:
            out = img.resize(out_size, resample, box=box)
        if out_size != (size, size) and as_open_clip:  # padded in its own mode, as open_clip pads
            out = _open_clip_pad(out, size, resize.fill)
        elif out_size != (size, size):  # centred, the odd pixel of padding after the image (CenterCropOrPad's)
            padded = Image.new("RGB", (size, size), resize.fill)
            padded.paste(out, ((size - out_size[0]) // 2, (size - out_size[1]) // 2))
            out = padded
        if as_open_clip:
            out = open_clip_rgb(out)
    except BadImage:
        raise
    except _BAD_ERRORS as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise BadImage(f"truncated image: {msg}") from None
        raise BadImage(f"cannot decode image: {msg}") from None
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # defensive: a decoder plugin returning an odd mode
        raise BadImage(f"decoded to unexpected shape {arr.shape}")
    return arr


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic): they carry the size.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, precision) read from a JPEG's start-of-frame segment, or None when ``data`` is
    not a plain JPEG this walk understands (the caller then asks PIL, which gives the proper BadImage reason).

    Why not PIL: ``Image.open`` costs ~50 us per image in Python-level parsing, most of the CPU time left on the
    device-decode path (``data.decode_device=cuda``), where the CPU only needs the size to draw the crop box. This
    walk reads a few marker headers with ``int.from_bytes`` and stops at the frame header (3-5 us; BENCHMARKS.md).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if length < 8 or i + 10 > n:
                return None
            precision = data[i + 4]
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return width, height, data[i + 9], precision
        i += 2 + length
    return None


def plan_crop(data: bytes, *, train: bool, rng: Any = None) -> tuple[str, tuple[float, float, float, float]]:
    """(format, crop box in source pixels) from the header alone, drawing the box exactly as ``decode_image`` does:
    what ``data.decode_device=cuda`` sends to the device decoder instead of pixels. Raises BadImage like it.

    The format is "JPEG" only for what nvJPEG decodes (8-bit, grey or three-component); a CMYK or 12-bit JPEG is
    reported as "JPEG-other" so the caller decodes it on the CPU. A JPEG whose frame header ``jpeg_frame`` cannot
    read goes through PIL, whose errors name the problem."""
    frame = jpeg_frame(data)
    if frame is not None:
        w, h, components, precision = frame
        limit = Image.MAX_IMAGE_PIXELS
        if w > 0 and h > 0 and not (limit and w * h > limit):
            fmt = "JPEG" if components in (1, 3) and precision == 8 else "JPEG-other"
            return fmt, _crop_box(w, h, train=train, rng=rng)
    img = _open(data)
    fmt = img.format or ""
    if fmt == "JPEG" and img.mode not in ("L", "RGB"):
        fmt = "JPEG-other"
    return fmt, _crop_box(*img.size, train=train, rng=rng)


def min_source_side(size: int, train: bool) -> float:
    """The shorter source side that still leaves ``size`` pixels across every crop (no upsampling).

    Eval crops the full shorter side. A train crop (w, h) fits in the source (W, H) and keeps at least ``s =
    CROP_SCALE[0]`` of its area, so h >= s*W*H / w >= s*H and likewise w >= s*W: its shorter side is at least 0.9
    of the source's, whatever the aspect ratios (the fallback crop is the whole image). A 64 px train crop needs a
    71 px source, a 32 px one 36 px.
    """
    if not train:
        return float(size)
    return size / CROP_SCALE[0]


def make_copy(data: bytes, short_side: int, quality: int = 90) -> bytes:
    """A JPEG copy of ``data`` whose shorter side is ``short_side`` (the shrunk copies of ``data shrink``).

    Draft-decodes (as ``decode_image`` does), converts with the same colour policy and resizes with an antialiased
    filter, so decoding the copy to a size it covers gives nearly the pixels of decoding the original. Chroma is kept
    at full resolution (4:4:4): at 40 px, 4:2:0 would halve the colour detail of a 32 px crop. An image that is
    already no larger than ``short_side`` is returned unchanged (any format). Raises BadImage like decode_image.
    """
    img = _open(data)
    w, h = img.size
    if min(w, h) <= short_side:
        return data
    try:
        d = _draft(img, (0.0, 0.0, float(w), float(h)), short_side)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img, k = _rgb_reduced(img, (0.0, 0.0, w / d, h / d), short_side)
        d *= k  # a draft and a reduction compose: source x is x / (d k) in the result
        scale = short_side / min(w, h)
        size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
        # the whole source in the reduced image, without its padded edge: (0, 0, w/d, h/d) (_draft)
        img = img.resize(size, Image.Resampling.LANCZOS, box=(0.0, 0.0, w / d, h / d) if d != 1 else None)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, subsampling=0)
    except BadImage:
        raise
    except _BAD_ERRORS as exc:
        msg = str(exc) or type(exc).__name__
        raise BadImage(("truncated image: " if "truncated" in msg.lower() else "cannot decode image: ") + msg) from None
    return buf.getvalue()


def reference_decode(data: bytes, size: int) -> np.ndarray:
    """Full decode then the eval crop/resize: the baseline the draft path is measured and tested against."""
    img = Image.open(io.BytesIO(data))
    img = to_rgb(img)
    box = _crop_box(*img.size, train=False, rng=None)
    return np.asarray(img.resize((size, size), RESAMPLE, box=box), dtype=np.uint8)
