"""JPEG decode on the training device (``data.decode_device: cuda``).

At 224 px a CPU decodes a few hundred web JPEGs per second per core (``reclip-ray bench data``), while one H100
trains a vit-b-16 on ~3,500 samples/s: ~10 cores per GPU just for decoding. At 64 px, even from 80 px shrunk
copies, a core decodes ~2,000-3,000 images/s against ~30,000 samples/s per GPU. nvJPEG on the GPU (through
``torchvision.io.decode_jpeg(device="cuda")``) moves that work next to the model; what is left on the CPU is reading
the frame header (``images.jpeg_frame``, no PIL), drawing the crop box and tokenizing.

The split keeps the augmentation identical to the CPU path:
* the Ray Data task still reads the shard, checks each image's header (an unreadable one is a bad row, counted as
  always), draws the row's crop box with the same per-row RNG as ``images.decode_image`` and sends the JPEG bytes
  and the box instead of pixels (``pipeline.decode_batch(..., on_device=True)``);
* an image that is not a JPEG (PNG, WebP: a few percent of web data) or a JPEG nvJPEG does not take (CMYK,
  12-bit) is decoded and cropped on the CPU as usual and sends the result re-encoded as a quality-95 JPEG with a full-image box;
* the worker decodes the batch on the device and crops and resizes all boxes at once with ``roi_align``, an area
  filter (``decode_on_device``). A JPEG that the device decoder rejects (a corrupt tail the header check
  did not see) is decoded by PIL on the CPU instead; if PIL fails too the row trains as a black image and is
  counted (``failed`` in the returned stats), because by then it is already part of the step's batch.
Pixels differ from the CPU path only by resampling details (draft-mode DCT scaling and PIL's bicubic against a
full decode and an area filter): ``tests/test_device_decode.py`` bounds the difference.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch

REENCODE_QUALITY = 95


def _pil_decode(data: bytes) -> torch.Tensor | None:
    from PIL import Image

    from reclip_ray.data.images import to_rgb

    try:
        img = to_rgb(Image.open(io.BytesIO(data)))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    except Exception:  # noqa: BLE001 - any decoder failure becomes a counted black row
        return None


def decode_jpegs(jpegs: Sequence[bytes], device: torch.device) -> tuple[list[torch.Tensor | None], int]:
    """CHW uint8 images (None where nothing could decode) and how many rows the CPU fallback decoded. Decode only:
    ``decode_on_device`` adds the crop and resize (``bench data --device`` times the two apart)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    if device.type == "cuda":
        # nvJPEG writes the outputs from its own stream without waiting for ours, into blocks the caching allocator
        # hands out as soon as they are freed on ours: kernels still queued there (the step before) may read them
        # and would read the decoder's pixels instead (pytorch/vision#9606, not merged: 134 of 200 iterations
        # corrupted on an H100). So the host waits for our stream first; the GPU decode gives up the host's lead.
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)), 0
    except torch.OutOfMemoryError:
        raise  # not the images' fault: a per-image retry and PIL would hide it behind a crawling step
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    fallback = 0
    for data, tensor in zip(jpegs, raw):
        try:
            out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            img = _pil_decode(bytes(data))
            fallback += img is not None  # one PIL cannot read either is a failed row, counted apart
            out.append(img.to(device) if img is not None else None)
    return out, fallback


PAD_ELEMENTS = 1 << 26  # float elements of one padded crop batch (256 MB): bounds the memory of huge sources


def _chunks(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices grouped so each group padded to its largest height and width stays under PAD_ELEMENTS; sorted by
    area first, so one 4000 px photo pads only itself, not the 255 thumbnails beside it."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
    groups: list[list[int]] = []
    h = w = 0
    for i in order:
        nh, nw = max(h, shapes[i][0]), max(w, shapes[i][1])
        if groups and 3 * nh * nw * (len(groups[-1]) + 1) <= PAD_ELEMENTS:
            groups[-1].append(i)
            h, w = nh, nw
        else:
            groups.append([i])
            h, w = shapes[i]
    return groups


def _crop_resize(images: list[torch.Tensor], boxes: np.ndarray, size: int) -> torch.Tensor:
    """CHW uint8 images + boxes (left, top, right, bottom, in source pixels) -> (N, 3, size, size) float.

    One ``roi_align`` per padded group instead of a resize per image: on a GPU a 64 px batch costs kernel launches,
    not arithmetic. Each output pixel averages ceil(box / size)^2 bilinear samples of its bin, an area filter, so a
    downscale does not alias; against the CPU path's draft decode + PIL bicubic this differs by about one level of
    255 on average (``tests/test_device_decode.py``), closer than a per-image antialiased bicubic resize was."""
    from torchvision.ops import roi_align

    device = images[0].device
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    all_rois = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    groups = _chunks([tuple(img.shape[-2:]) for img in images])
    # Every group's rois (batch index, box) and output rows in one queued copy: a copy from pageable host memory,
    # or an index given as a list, waits on the host for the kernels queued before it.
    order = torch.tensor([i for group in groups for i in group])
    rois = torch.cat([torch.cat([torch.arange(len(g), dtype=torch.float32) for g in groups])[:, None],
                      all_rois[order]], dim=1)
    if device.type == "cuda":
        rois, order = rois.pin_memory(), order.pin_memory()
    rois, order = rois.to(device, non_blocking=True), order.to(device, non_blocking=True)
    start = 0
    for group in groups:
        h = max(images[i].shape[-2] for i in group)
        w = max(images[i].shape[-1] for i in group)
        batch = torch.zeros((len(group), 3, h, w), dtype=torch.float32, device=device)
        for j, i in enumerate(group):
            batch[j, :, : images[i].shape[-2], : images[i].shape[-1]] = images[i]
        end = start + len(group)
        out.index_copy_(0, order[start:end], roi_align(batch, rois[start:end], output_size=size, spatial_scale=1.0,
                                                       sampling_ratio=-1, aligned=True))
        start = end
    return out


def decode_on_device(jpegs: Sequence[bytes], boxes: np.ndarray, size: int,
                     device: str | torch.device) -> tuple[torch.Tensor, dict[str, int]]:
    """JPEG bytes + crop boxes (from ``decode_batch(..., on_device=True)``) -> uint8 NHWC images on ``device``,
    plus ``{"fallback": rows decoded by PIL, "failed": rows that trained as black images}``."""
    device = torch.device(device)
    images, fallback = decode_jpegs(jpegs, device)
    failed = [i for i, img in enumerate(images) if img is None]
    blank = torch.zeros((3, 1, 1), dtype=torch.uint8, device=device)
    out = _crop_resize([blank if img is None else img for img in images], boxes, size) if images else \
        torch.zeros((0, 3, size, size), device=device)
    if failed:
        out[failed] = 0
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), \
        {"fallback": fallback, "failed": len(failed)}


def encode_for_device(pixels: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A CPU-decoded (size, size, 3) crop as JPEG bytes + its full-image box, for a row nvJPEG cannot decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=REENCODE_QUALITY, subsampling=0)
    s = pixels.shape[0]
    return buf.getvalue(), np.asarray([0.0, 0.0, float(s), float(s)], dtype=np.float32)
