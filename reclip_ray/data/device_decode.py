"""JPEG decode on the training device (``data.decode_device: cuda``), for the full-resolution phase.

At 224 px a CPU decodes a few hundred web JPEGs per second per core (``reclip-ray bench data``), while one H100
trains a vit-b-16 on ~3,500 samples/s: ~10 cores per GPU just for decoding. nvJPEG on the GPU (through
``torchvision.io.decode_jpeg(device="cuda")``) moves that work next to the model.

The split keeps the augmentation identical to the CPU path:
* the Ray Data task still reads the shard, checks each image's header (an unreadable one is a bad row, counted as
  always), draws the row's crop box with the same per-row RNG as ``images.decode_image`` and sends the JPEG bytes
  and the box instead of pixels (``pipeline.decode_batch(..., on_device=True)``);
* an image that is not a JPEG (PNG, WebP: a few percent of web data) cannot go to nvJPEG, so the task decodes and
  crops it on the CPU as usual and sends the result re-encoded as a quality-95 JPEG with a full-image box;
* the worker decodes the batch on the device, crops each box and resizes it with antialiased bicubic
  interpolation (``decode_on_device``). A JPEG that the device decoder rejects (CMYK, a corrupt tail the header
  check did not see) is decoded by PIL on the CPU instead; if PIL fails too the row trains as a black image and is
  counted (``failed`` in the returned stats), because by then it is already part of the step's batch.
Pixels differ from the CPU path only by resampling details (draft-mode DCT scaling and PIL's filter against a
full decode and torch's filter): ``tests/test_device_decode.py`` bounds the difference.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

REENCODE_QUALITY = 95


def _pil_decode(data: bytes) -> torch.Tensor | None:
    from PIL import Image

    from reclip_ray.data.images import to_rgb

    try:
        img = to_rgb(Image.open(io.BytesIO(data)))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    except Exception:  # noqa: BLE001 - any decoder failure becomes a counted black row
        return None


def _decode_all(jpegs: Sequence[bytes], device: torch.device) -> tuple[list[torch.Tensor | None], int]:
    """CHW uint8 images (None where nothing could decode) and how many rows needed the CPU fallback."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)), 0
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    fallback = 0
    for data, tensor in zip(jpegs, raw):
        try:
            out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            fallback += 1
            img = _pil_decode(bytes(data))
            out.append(img.to(device) if img is not None else None)
    return out, fallback


def _crop_resize(img: torch.Tensor, box: Sequence[float], size: int) -> torch.Tensor:
    """CHW uint8 -> (size, size, 3) uint8: the box (left, top, right, bottom, in source pixels) rounded outwards to
    whole pixels, then an antialiased bicubic resize (as PIL's ``resize(box=...)`` does for a downscale)."""
    h, w = img.shape[-2:]
    left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(w, max(left + 1, math.ceil(box[2]))), min(h, max(top + 1, math.ceil(box[3])))
    crop = img[:, top:bottom, left:right].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def decode_on_device(jpegs: Sequence[bytes], boxes: np.ndarray, size: int,
                     device: str | torch.device) -> tuple[torch.Tensor, dict[str, int]]:
    """JPEG bytes + crop boxes (from ``decode_batch(..., on_device=True)``) -> uint8 NHWC images on ``device``,
    plus ``{"fallback": rows decoded by PIL, "failed": rows that trained as black images}``."""
    device = torch.device(device)
    images, fallback = _decode_all(jpegs, device)
    out = torch.zeros((len(jpegs), size, size, 3), dtype=torch.uint8, device=device)
    failed = 0
    for i, (img, box) in enumerate(zip(images, np.asarray(boxes, dtype=np.float64))):
        if img is None:
            failed += 1
            continue
        out[i] = _crop_resize(img, box, size)
    return out, {"fallback": fallback, "failed": failed}


def encode_for_device(pixels: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A CPU-decoded (size, size, 3) crop as JPEG bytes + its full-image box, for a row nvJPEG cannot decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=REENCODE_QUALITY, subsampling=0)
    s = pixels.shape[0]
    return buf.getvalue(), np.asarray([0.0, 0.0, float(s), float(s)], dtype=np.float32)
