"""``reclip-ray bench model``: train-step throughput vs. resolution, next to the analytical FLOPs (JSON lines).

RECLIP's claim is that a ViT's cost follows its token count. This measures whether the wall clock follows the
FLOPs on the machine at hand (a real train step: normalise, forward both towers, loss, backward, AdamW), and
prints the analytical GFLOPs-per-sample table for the big presets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Sequence


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _measure(preset: str, image_size: int, text_length: int, batch: int, steps: int, warmup: int,
             device: str = "cpu", precision: str = "fp32") -> dict:
    import torch

    from reclip_ray.config import load_config
    from reclip_ray.flops import sample_forward_flops
    from reclip_ray.model import build_model
    from reclip_ray.schedule import build_optimizer
    from reclip_ray.train.step import train_step

    cfg = load_config("tiny", [f"model={preset}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=49408).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    images = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, device=device)
    tokens = torch.randint(3, 49408, (batch, text_length), device=device)
    autocast = torch.bfloat16 if precision == "bf16" else None
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(model, optimizer, images, tokens, lr=1e-5, autocast_dtype=autocast)
        if cuda:
            torch.cuda.synchronize()  # time the kernels, not their launch
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = sample_forward_flops(cfg.model, image_size, text_length)
    return {
        "bench": "model_train_step",
        "model": preset,
        "image_size": image_size,
        "text_length": text_length,
        "batch": batch,
        "steps_timed": steps,
        "step_s_median": round(step_s, 4),
        "images_per_s": round(batch / step_s, 3),
        "train_gflops_per_sample": round(3 * flops["total"] / 1e9, 3),
        "achieved_gflops_per_s": round(3 * flops["total"] * batch / step_s / 1e9, 2),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        **({"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if cuda else {}),
    }


def flops_table(presets: Sequence[str], sizes: Sequence[int], lengths: Sequence[int]) -> list[dict]:
    from reclip_ray.config import MODEL_PRESETS, load_config
    from reclip_ray.flops import image_forward_flops, image_tokens, text_forward_flops

    rows = []
    for preset in presets:
        if preset not in MODEL_PRESETS:
            raise SystemExit(f"unknown preset {preset}")
        m = load_config("tiny", [f"model={preset}"]).model
        for s in sizes:
            rows.append({"bench": "model_flops", "model": preset, "tower": "image", "image_size": s,
                         "tokens": image_tokens(m.vision, s),
                         "fwd_gflops_per_sample": round(image_forward_flops(m.vision, s, m.embed_dim) / 1e9, 3)})
        for n in lengths:
            rows.append({"bench": "model_flops", "model": preset, "tower": "text", "text_length": n, "tokens": n,
                         "fwd_gflops_per_sample": round(text_forward_flops(m.text, n, m.embed_dim) / 1e9, 3)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reclip-ray bench model", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-b-16")
    p.add_argument("--sizes", type=_ints, default=[64, 224], help="image sizes to time (the first is the reference)")
    p.add_argument("--text-length", type=int, default=16, help="same for every size, so only the image changes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, as training on GPU")
    p.add_argument("--flops-only", action="store_true")
    p.add_argument("--table-models", default="vit-b-16,vit-l-16")
    p.add_argument("--table-sizes", type=_ints, default=[64, 96, 128, 160, 224])
    p.add_argument("--table-lengths", type=_ints, default=[16, 32, 77])
    args = p.parse_args(list(argv or []))

    for row in flops_table(args.table_models.split(","), args.table_sizes, args.table_lengths):
        print(json.dumps(row), flush=True)
    if args.flops_only:
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for size in args.sizes:
        r = _measure(args.model, size, args.text_length, args.batch, args.steps, args.warmup, args.device,
                     args.precision)
        results.append(r)
        print(json.dumps(r), flush=True)
    ref = results[0]
    for r in results[1:]:
        print(json.dumps({
            "bench": "model_resolution_ratio",
            "model": args.model,
            "from_px": ref["image_size"],
            "to_px": r["image_size"],
            "measured_speedup": round(ref["images_per_s"] / r["images_per_s"], 2),
            "train_flops_ratio": round(r["train_gflops_per_sample"] / ref["train_gflops_per_sample"], 2),
        }), flush=True)
    return 0
