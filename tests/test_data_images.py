"""decode_image: sizes, draft decoding, colour modes and every kind of bad image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reclip_ray.data import images
from reclip_ray.data.images import BadImage, decode_image, reference_decode


def _photo(size=(512, 384), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    arr = np.stack([xx * 255, yy * 255, (1 - xx) * 200], -1) + rng.normal(0, 4, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return _encode(Image.fromarray(_photo()), "JPEG", quality=90)


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("train", [False, True])
def test_decode_shape_dtype(jpeg, size, train):
    out = decode_image(jpeg, size, train=train, rng=np.random.default_rng(0))
    assert out.shape == (size, size, 3) and out.dtype == np.uint8


def test_draft_decodes_fewer_pixels_and_matches_reference(jpeg):
    img = Image.open(io.BytesIO(jpeg))
    scale = images._draft(img, images._crop_box(*img.size, train=False, rng=None), 64)
    img.load()
    assert scale == 4 and img.size == (128, 96)  # 384 / 64 = 6 -> largest DCT scale <= 6 is 4
    for size in (48, 64, 128):
        fast = decode_image(jpeg, size, train=False).astype(np.int16)
        ref = reference_decode(jpeg, size).astype(np.int16)
        assert np.abs(fast - ref).mean() < 2.0  # same picture, only the decoder's scaling differs


def _corner_jpeg(width: int, height: int) -> bytes:
    """Black, with a white bottom-right rectangle from (0.6 W, 0.55 H): two straight edges at known places."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[int(height * 0.55):, int(width * 0.6):] = 255
    return _encode(Image.fromarray(arr), "JPEG", quality=95)


def _edges(arr: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (x, y) of the white rectangle's left and top edges: how much of a row (column) through it is dark."""
    white = arr.astype(np.float64).mean(-1) / 255
    h, w = white.shape
    return w - white[-h // 4:].mean(0).sum(), h - white[:, -w // 4:].mean(1).sum()


@pytest.mark.parametrize("width,height,size,train", [(521, 521, 64, False), (521, 397, 48, True),
                                                     (1001, 1001, 64, True)])
def test_a_draft_decoded_crop_is_the_crop_of_the_full_image(width, height, size, train):
    """At 1/8 scale a width of 8 m + 1 decodes to m + 1 pixels, the last one mostly padding: source x is x / 8
    there, not x (m + 1) / W, which put the edges up to (d - 1) / d reduced pixels off (~0.25-0.5 px here)."""
    data = _corner_jpeg(width, height)
    assert width % 8 and height % 8
    box = images._crop_box(width, height, train=train, rng=np.random.default_rng(1))
    assert images._draft(Image.open(io.BytesIO(data)), box, size) == 8  # the reduced decode is what is tested
    fast = decode_image(data, size, train=train, rng=np.random.default_rng(1))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.resize((size, size), images.RESAMPLE, box=box))
    assert np.abs(np.subtract(_edges(fast), _edges(ref))).max() < 0.15
    assert np.abs(fast.astype(np.int16) - ref).mean() < 0.6

    # A shrunk copy (`data shrink`) draft-decodes the same way, then resizes the whole image.
    copy = np.asarray(Image.open(io.BytesIO(images.make_copy(data, size))).convert("RGB"))
    ref = np.asarray(full.resize(copy.shape[1::-1], Image.Resampling.LANCZOS))
    assert np.abs(np.subtract(_edges(copy), _edges(ref))).max() < 0.15


def test_train_crop_is_random_but_reproducible(jpeg):
    a = decode_image(jpeg, 64, train=True, rng=np.random.default_rng(1))
    b = decode_image(jpeg, 64, train=True, rng=np.random.default_rng(1))
    c = decode_image(jpeg, 64, train=True, rng=np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # no flips: the left edge of the crop stays on the left (red grows to the right in _photo)
    assert a[:, :8, 0].mean() < a[:, -8:, 0].mean()


def test_colour_modes_become_rgb():
    base = Image.fromarray(_photo((64, 64)))
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> composited onto white
    cases = {
        "L": _encode(base.convert("L"), "PNG"),
        "LA": _encode(base.convert("LA"), "PNG"),
        "P": _encode(base.convert("P"), "PNG"),
        "RGBA": _encode(rgba, "PNG"),
        "CMYK": _encode(base.convert("CMYK"), "JPEG", quality=90),
        "I;16": _encode(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257), "PNG"),
    }
    grey = np.asarray(base.convert("L").resize((32, 32), Image.Resampling.BICUBIC)).astype(np.int16)
    for mode, data in cases.items():
        out = decode_image(data, 32, train=False)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, mode
        if mode == "RGBA":
            assert out.min() == 255
        if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped to white
            assert np.abs(out[..., 0].astype(np.int16) - grey).mean() < 3


def test_corrupt_and_truncated_are_bad(jpeg):
    with pytest.raises(BadImage, match="cannot identify"):
        decode_image(b"not an image at all", 32, train=False)
    with pytest.raises(BadImage):
        decode_image(b"", 32, train=False)
    with pytest.raises(BadImage, match="truncated|decode"):
        decode_image(jpeg[: len(jpeg) // 2], 32, train=False)
    png = _encode(Image.fromarray(_photo((64, 64))), "PNG")
    with pytest.raises(BadImage):
        decode_image(png[:-200], 32, train=False)


def test_decompression_bomb_is_bad(jpeg, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 384 // 3)  # > 2x: PIL's own error
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(jpeg, 32, train=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 384 - 1)  # between 1x and 2x: PIL only warns
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(jpeg, 32, train=False)


def test_jpeg_frame_reads_what_pil_reads_and_plan_crop_draws_the_same_box(jpeg):
    """The device path's header walk (no PIL) against PIL's header parser, on the JPEG flavours web data has."""
    import random

    base = Image.fromarray(_photo((300, 200), seed=3))
    exif = Image.Exif()
    exif[0x010F] = "camera"
    variants = {
        "baseline": _encode(base, "JPEG", quality=90),
        "progressive": _encode(base, "JPEG", progressive=True),
        "grey": _encode(base.convert("L"), "JPEG"),
        "cmyk": _encode(base.convert("CMYK"), "JPEG"),
        "exif+icc": _encode(base, "JPEG", exif=exif.tobytes(), icc_profile=b"\0" * 3000),
        "4:4:4": _encode(base, "JPEG", subsampling=0),
    }
    variants["fill bytes"] = variants["baseline"][:2] + b"\xff\xff" + variants["baseline"][2:]
    for name, data in variants.items():
        img = Image.open(io.BytesIO(data))
        w, h, components, precision = images.jpeg_frame(data)
        assert (w, h) == img.size, name
        assert components == len(img.getbands()) and precision == 8, name
        fmt, box = images.plan_crop(data, train=True, rng=random.Random(7))
        assert fmt == ("JPEG-other" if name == "cmyk" else "JPEG"), name
        rng = random.Random(7)
        assert box == images._crop_box(*img.size, train=True, rng=rng), name
    png = _encode(base, "PNG")
    assert images.jpeg_frame(png) is None and images.plan_crop(png, train=False)[0] == "PNG"
    # Cut before the frame header: the walk gives up and PIL names the problem.
    assert images.jpeg_frame(jpeg[:30]) is None
    with pytest.raises(BadImage):
        images.plan_crop(jpeg[:30], train=False)
    assert images.jpeg_frame(b"\xff\xd8\xff\xda\x00\x08") is None  # scan before any frame


def test_plan_crop_applies_the_decompression_bomb_limit(jpeg, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 384 - 1)
    with pytest.raises(BadImage, match="decompression bomb"):
        images.plan_crop(jpeg, train=False)
