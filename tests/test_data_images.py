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


def _transparent(width: int, height: int, mode: str, seed: int = 0) -> bytes:
    """A detailed image with alpha from 0 to 255 (hard and soft edges) as a PNG of ``mode`` (RGBA, LA or P with a
    transparent palette entry)."""
    rgb = _photo((width, height), seed)
    yy, xx = np.mgrid[0:height, 0:width]
    alpha = np.clip((np.sin(xx / 37) + np.cos(yy / 23)) * 64 + 128, 0, 255).astype(np.uint8)
    alpha[: height // 5] = 0
    alpha[height // 2:height // 2 + 40] = np.random.default_rng(seed).integers(0, 256, (40, width))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode != "P":
        return _encode(rgba.convert(mode), "PNG")
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    index = np.asarray(p).copy()
    index[alpha < 100] = 255
    out = Image.fromarray(index, "P")
    out.putpalette(p.getpalette())
    return _encode(out, "PNG", transparency=255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_transparent_image_is_reduced_before_it_is_flattened_with_the_same_crop(mode):
    """The crop of a large image with alpha is the crop of the image composited onto white at full size (the
    reference here), up to rounding: it is reduced premultiplied first (images._rgb_reduced). Same crop box for
    the same generator, drawn before anything is decoded."""
    import random

    data = _transparent(1200, 1000, mode)
    for size, train in ((32, True), (64, True), (64, False), (96, False)):
        rng = random.Random(3)
        out = decode_image(data, size, train=train, rng=rng)
        ref_rng = random.Random(3)
        full = Image.open(io.BytesIO(data))
        box = images._crop_box(*full.size, train=train, rng=ref_rng)
        assert rng.random() == ref_rng.random()  # the row's generator drew exactly the crop box
        assert images._rgb_reduced(full, box, size)[1] >= 2  # the reduced path is what is tested
        ref = np.asarray(images.to_rgb(full).resize((size, size), images.RESAMPLE, box=box)).astype(np.int16)
        diff = np.abs(out.astype(np.int16) - ref)
        assert diff.max() <= 8 and diff.mean() < 0.8, (mode, size, train, diff.max(), diff.mean())


@pytest.mark.parametrize("mode", ["La", "RGBa", "PA"])
def test_premultiplied_and_palette_alpha_modes_are_reduced_like_the_rest(mode):
    """PIL decodes a TIFF with associated alpha as La / RGBa (premultiplied), which ``Image.convert`` cannot take
    to RGBA directly: the reduction failed on them ("conversion from La to L not supported") where ``to_rgb``, at
    small sizes, handled them."""
    rgba = Image.open(io.BytesIO(_transparent(640, 480, "RGBA")))
    img = rgba.convert(mode)
    reduced, k = images._rgb_reduced(img, (0.0, 0.0, 640.0, 480.0), 32)
    assert k == 5 and reduced.mode == "RGB"  # 480 px // (3 x 32)
    ref = np.asarray(images.to_rgb(img).reduce(k)).astype(np.int16)
    assert np.abs(np.asarray(reduced).astype(np.int16) - ref).max() <= 3


def _decode_peak(path, size: int = 64) -> tuple[int, np.ndarray]:
    """(growth of the peak RSS while ``decode_image`` turns the file into a ``size`` px crop, the crop), measured in
    a fresh process: PIL allocates outside Python's allocator (tracemalloc sees none). From /proc's VmHWM, the
    high-water mark of the process's own memory: ``ru_maxrss`` starts a child at its parent's peak (pytest's,
    hundreds of MB), which hid any growth below it."""
    from child import run_python

    script = (
        "import random, sys\n"
        "from reclip_ray.data.images import decode_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = hwm()\n"
        "out = decode_image(data, int(sys.argv[2]), train=True, rng=random.Random(0))\n"
        "sys.stdout.buffer.write((hwm() - before).to_bytes(8, 'little') + out.tobytes())\n")
    done = run_python(script, str(path), str(size), timeout=60)
    done.check_returncode()
    return int.from_bytes(done.stdout[:8], "little"), np.frombuffer(done.stdout[8:], np.uint8).reshape(size, size, 3)


def test_a_large_transparent_png_decodes_without_full_size_composites(tmp_path):
    """A 4000 x 4000 RGBA PNG (64 MB decoded) took 2.7-5x its decoded size at peak to become a 64 px crop: the
    composite onto white, its background and conversions were all full size. Now only the decoded image is (1.2x).
    Measured as the peak RSS of a fresh process (``_decode_peak``)."""
    from PIL import ImageDraw

    side = 4000
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        draw.ellipse((i * 250, i * 200, i * 250 + 900, i * 200 + 700), fill=(200, 20 * i, 50, 100 + 12 * i))
    path = tmp_path / "big.png"
    img.save(path, "PNG", compress_level=1)
    del img, draw
    peak, out = _decode_peak(path)
    mean = int(out.mean())
    decoded = side * side * 4
    assert peak < 1.4 * decoded, f"peak {peak / 1e6:.0f} MB for a {decoded / 1e6:.0f} MB decoded image"
    assert 128 < mean < 255  # mostly white background, some colour


def test_multi_picture_jpeg_is_draft_decoded_like_a_jpeg(monkeypatch):
    """Phone cameras write MPO (a JPEG with more pictures after it); PIL opens it as format "MPO", which skipped
    the scaled decode. Frame 0 is decoded, at the JPEG's reduced scale, to the JPEG's pixels."""
    from PIL import JpegImagePlugin

    first = Image.fromarray(_photo())
    second = Image.fromarray(255 - _photo(seed=1))
    mpo = _encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    jpeg = _encode(first, "JPEG", quality=90)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"

    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        drafted.append((self.format, result is not None))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for size, train in ((64, False), (48, True)):
        drafted.clear()
        out = decode_image(mpo, size, train=train, rng=np.random.default_rng(5))
        assert drafted == [("MPO", True)]
        assert np.array_equal(out, decode_image(jpeg, size, train=train, rng=np.random.default_rng(5)))
    assert np.abs(decode_image(mpo, 64, train=False).astype(np.int16) - reference_decode(mpo, 64)).mean() < 2.0
    copy = Image.open(io.BytesIO(images.make_copy(mpo, 40)))
    assert drafted[-1] == ("MPO", True) and copy.format == "JPEG" and min(copy.size) == 40


def _old_eight_bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """The float formula ``to_rgb`` scaled wide pixels with before it worked in strips (the reference)."""
    if mode.startswith("I;16") or arr.dtype == np.uint16 or arr.max() > 255:
        arr = np.clip(arr.astype(np.float32), 0, 65535) * (255.0 / 65535.0)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def test_wide_pixels_become_the_same_8_bits_a_strip_at_a_time(monkeypatch):
    """Every 16-bit value, 32-bit integers and floats above and within 0-255 give the float formula's pixels
    exactly, in strips of a few rows (so strips that hold no value above 255 are scaled as the whole image is)."""
    monkeypatch.setattr(images, "STRIP_PIXELS", 256 * 3)
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    low_first = np.concatenate([np.full((100, 256), 7, np.int32), every.astype(np.int32) * 2 - 900])
    cases = [every, low_first, every.astype(np.int32) % 256 - 20,
             every.astype(np.float32) * 1.37 - 50, (every.astype(np.float32) % 256) * 0.999]
    for arr in cases:
        img = Image.fromarray(arr)
        out = images.to_rgb(img)
        assert out.mode == "RGB" and out.size == img.size
        expected = _old_eight_bit(np.asarray(img), img.mode)
        assert np.array_equal(np.asarray(out)[..., 0], expected), (img.mode, arr.dtype)
        assert np.array_equal(np.asarray(out)[..., 1], expected)


def _grey16(width: int, height: int, seed: int = 0) -> bytes:
    """A 16-bit grey PNG (PIL mode I;16) with edges, gradients and noise across the full 16-bit range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    arr = 5000 + 50000 * xx + 8000 * np.sin(yy * 30) + rng.normal(0, 600, (height, width)).astype(np.float32)
    for _ in range(6):
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        arr[y:y + height // 4, x:x + width // 5] = rng.integers(0, 65536)
    return _encode(Image.fromarray(np.clip(arr, 0, 65535).astype(np.uint16)), "PNG", compress_level=1)


def test_a_large_16_bit_image_is_reduced_in_8_bits_with_the_same_crop():
    """A 16-bit image that is much larger than its crop is reduced strip by strip (images._rgb_reduced) like one
    with alpha: its crop is the full-size 8-bit image's crop (the reference) up to rounding, from the same crop box
    drawn before anything is decoded."""
    import random

    data = _grey16(1200, 1000)
    full = Image.open(io.BytesIO(data))
    assert full.mode == "I;16"
    for size, train in ((32, True), (64, True), (64, False), (96, False)):
        rng, ref_rng = random.Random(3), random.Random(3)
        out = decode_image(data, size, train=train, rng=rng)
        box = images._crop_box(*full.size, train=train, rng=ref_rng)
        assert rng.random() == ref_rng.random()  # the row's generator drew exactly the crop box
        assert images._rgb_reduced(full, box, size)[1] >= 2  # the reduced path is what is tested
        ref = np.asarray(images.to_rgb(full).resize((size, size), images.RESAMPLE, box=box)).astype(np.int16)
        diff = np.abs(out.astype(np.int16) - ref)
        assert diff.max() <= 8 and diff.mean() < 0.8, (size, train, diff.max(), diff.mean())
        assert (out[..., 0] == out[..., 2]).all()  # grey stays grey


def test_a_large_16_bit_png_decodes_without_full_size_copies(tmp_path):
    """A 4000 x 4000 16-bit grey PNG (32 MB decoded) took 7x its decoded size at peak to become a 64 px crop: a
    full-size uint16 copy, three float32 ones and the 8-bit grey and RGB images. Now only the decoded image is full
    size (about 1.6x with the decoder's buffers). Peak RSS of a fresh process (``_decode_peak``)."""
    side = 4000
    path = tmp_path / "big16.png"
    path.write_bytes(_grey16(side, side, seed=1))
    peak, out = _decode_peak(path)
    spread = int(out.std())
    decoded = side * side * 2
    assert peak < 2.5 * decoded, f"peak {peak / 1e6:.0f} MB for a {decoded / 1e6:.0f} MB decoded image"
    assert spread > 10  # the picture, not a flat or clipped one
