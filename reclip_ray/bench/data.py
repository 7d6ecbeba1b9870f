"""Decode + resize throughput, one process: the project's draft-mode path vs. full decode then resize.

At 64 px the model step is fast enough that the CPU decode sets the pace, so images/s per core is the number to
watch. Sources are 512 px photo-like JPEGs made in memory (gradients + noise + shapes, quality 90), so the JPEG
sizes and entropy-decode cost are realistic and the benchmark needs no files.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reclip_ray.data.images import decode_image, reference_decode


def make_sources(n: int, size: int = 512, seed: int = 0, quality: int = 90) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        img = a * (1 - xx[..., None]) + b * xx[..., None] * (1 - yy[..., None]) + c * yy[..., None] * xx[..., None]
        img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 12))):
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
            w, h = rng.uniform(0.05, 0.5, 2) * size
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.0))
        arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _rates(paths: dict[str, Callable[[bytes, int], np.ndarray]], sources: list[bytes], size: int,
           repeats: int) -> dict[str, float]:
    """Median images/s per path; the paths alternate within each repeat so a busy neighbour hits both alike."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            for data in sources:
                fn(data, size)
            samples[name].append(len(sources) / (time.perf_counter() - start))
    return {name: statistics.median(rates) for name, rates in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reclip-ray bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline", action="store_true",
                        help="the Ray Data phase pipeline at --sizes (default 32,64,112,224), full image vs. shrunk "
                             "copy, plus decode cores per GPU (starts a local Ray)")
    parser.add_argument("--rows", type=int, default=4000, help="--pipeline: rows streamed per measurement")
    parser.add_argument("--device-side", action="store_true",
                        help="--pipeline: also stream each copy through the CPU side of data.decode_device=cuda")
    parser.add_argument("--copy", type=int, default=0,
                        help="--device: decode shrunk copies with this shorter side (as `data shrink` writes them) "
                             "instead of the --source-size originals")
    parser.add_argument("--device", default="", help="time data.decode_device on this device (e.g. cuda): "
                                                       "decode + crop + resize of --images JPEGs in one batch")
    args = parser.parse_args(list(argv or []))
    if args.device:
        return _device_rates(args)
    if args.pipeline:
        from reclip_ray.bench.pipeline import run

        sizes = [int(s) for s in (args.sizes if args.sizes != "64,128,224" else "32,64,112,224").split(",")]
        run(sizes, make_sources(args.images), rows=args.rows, repeats=max(1, min(args.repeats, 3)),
            device_side=args.device_side)
        return 0
    sources = make_sources(args.images, args.source_size)
    mean_kb = sum(map(len, sources)) / len(sources) / 1024
    paths = {
        "reclip (draft + box resize)": lambda d, s: decode_image(d, s, train=False),
        "baseline (full decode + resize)": reference_decode,
    }
    for size in (int(s) for s in args.sizes.split(",")):
        for fn in paths.values():
            fn(sources[0], size)  # warm up
        rates = _rates(paths, sources, size, args.repeats)
        for name, rate in rates.items():
            print(json.dumps({"bench": "data_decode", "path": name, "target_px": size, "source_px": args.source_size,
                              "source_kb": round(mean_kb, 1), "images_per_s_per_core": round(rate, 1)}))
        names = list(rates)
        print(json.dumps({"bench": "data_decode", "target_px": size,
                          "speedup": round(rates[names[0]] / rates[names[1]], 2)}))
    return 0


def _device_rates(args: argparse.Namespace) -> int:
    """Images/s of ``device_decode.decode_on_device`` (one batch of --images) vs one CPU core's decode_image."""
    import torch

    from reclip_ray.data.device_decode import decode_jpegs, decode_on_device
    from reclip_ray.data.images import make_copy, plan_crop

    sources = make_sources(args.images, args.source_size)
    if args.copy:
        sources = [make_copy(d, args.copy) for d in sources]
    rng = np.random.default_rng(0)
    device = torch.device(args.device)

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return len(sources) / statistics.median(times)

    for size in (int(s) for s in args.sizes.split(",")):
        boxes = np.asarray([plan_crop(d, train=True, rng=rng)[1] for d in sources], dtype=np.float32)
        decode_on_device(sources[:8], boxes[:8], size, args.device)  # warm up (nvJPEG handles, kernels)
        device_rate = timed(lambda: decode_on_device(sources, boxes, size, args.device))
        decode_rate = timed(lambda: decode_jpegs(sources, device))
        cpu_rate = _rates({"cpu": lambda d, s: decode_image(d, s, train=True, rng=rng)}, sources, size, 1)["cpu"]
        print(json.dumps({"bench": "data_decode_device", "device": args.device, "target_px": size,
                          "source_px": args.copy or args.source_size, "images": len(sources),
                          "images_per_s_device": round(device_rate, 1),
                          "decode_only_per_s_device": round(decode_rate, 1),
                          "images_per_s_per_cpu_core": round(cpu_rate, 1),
                          "cpu_cores_replaced": round(device_rate / cpu_rate, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
