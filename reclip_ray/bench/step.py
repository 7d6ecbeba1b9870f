"""``reclip-ray bench step``: a worker's memory vs. the global batch with micro-batches, and ``train.compile``.

Two questions a 64-GPU run depends on, measured on one process (JSON lines):

* ``memory``: peak RSS (CPU) or peak allocated memory (CUDA) of train steps at several global batches, without
  accumulation and with ``train.micro_batch_size``. Each setting runs in a fresh subprocess, so a peak is that
  setting's alone. With micro-batches the peak should be flat in the global batch: only the features
  (2 x batch x embed_dim floats) and the logits grow with it; without, the activations grow linearly.
* ``compile``: median step time eager vs ``torch.compile`` (the trainer's ``compile_model``), the first compiled
  step's time (the compile), and how many graphs dynamo compiled over two resolutions plus a short batch (the
  "one recompile per resolution at most" promise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _setup(preset: str, device: str, vocab: int = 1024):
    import torch

    from reclip_ray.config import load_config
    from reclip_ray.model import build_model
    from reclip_ray.schedule import build_optimizer

    cfg = load_config("tiny", [f"model={preset}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=vocab).to(device)
    return model, build_optimizer(model, cfg.optim)


def _batch(n: int, px: int, length: int, device: str, vocab: int = 1024):
    import torch

    images = torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8, device=device)
    return images, torch.randint(3, vocab, (n, length), device=device)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_memory(preset: str, global_batch: int, micro_batch: int, px: int, length: int, steps: int,
                   device: str, precision: str) -> dict:
    """One setting, in this process: peak memory of ``steps`` train steps (call in a fresh process)."""
    import torch

    from reclip_ray.train.step import train_step

    model, opt = _setup(preset, device)
    images, tokens = _batch(global_batch, px, length, device)
    cuda = device.startswith("cuda")
    before = _peak_rss_mib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.bfloat16 if precision == "bf16" else None
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, images, tokens, lr=1e-5, autocast_dtype=autocast, micro_batch=micro_batch)
    if cuda:
        torch.cuda.synchronize()
    return {
        "bench": "step_memory", "model": preset, "image_size": px, "text_length": length,
        "global_batch": global_batch, "micro_batch": micro_batch, "steps": steps,
        "step_s": round((time.perf_counter() - t0) / steps, 3),
        "peak_rss_mib": round(_peak_rss_mib(), 1), "rss_before_steps_mib": round(before, 1),
        **({"peak_cuda_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {}),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": precision,
        "threads": torch.get_num_threads(),
    }


def measure_compile(preset: str, batch: int, sizes: Sequence[int], length: int, steps: int, warmup: int,
                    device: str, precision: str, warm_cache: bool = False) -> list[dict]:
    """Eager vs compiled median step time at ``sizes[0]``; compiled graphs over all sizes and a short batch."""
    import torch
    import torch._dynamo

    from reclip_ray.train.step import compile_model, train_step

    autocast = torch.bfloat16 if precision == "bf16" else None
    cuda = device.startswith("cuda")
    rows = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, opt = _setup(preset, device)
        if compiled:
            compile_model(model)
        images, tokens = _batch(batch, sizes[0], length, device)
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            train_step(model, opt, images, tokens, lr=1e-5, autocast_dtype=autocast)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = {"bench": "step_compile", "model": preset, "compile": compiled, "image_size": sizes[0],
               "text_length": length, "batch": batch, "steps_timed": steps,
               "first_step_s": round(times[0], 2), "inductor_cache": "warm" if warm_cache else "cold",
               "step_s_median": round(statistics.median(times[warmup:]), 4),
               "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": precision,
               "threads": torch.get_num_threads()}
        if compiled:
            from torch._dynamo.utils import counters

            # Graphs dynamo built, after the first shape and after each new one: a new resolution, then a short
            # batch (a phase's last step). Automatic dynamic shapes: each changed dimension recompiles once.
            graphs = [int(counters["stats"]["unique_graphs"])]
            first_s = []
            for n, px in [(batch, px) for px in sizes[1:]] + [(batch // 2 or 1, sizes[-1])]:
                t0 = time.perf_counter()
                train_step(model, opt, *_batch(n, px, length, device), lr=1e-5, autocast_dtype=autocast)
                if cuda:
                    torch.cuda.synchronize()
                first_s.append({"batch": n, "image_size": px, "first_step_s": round(time.perf_counter() - t0, 2),
                                "graphs_after": int(counters["stats"]["unique_graphs"])})
            row["graphs_after_first_shape"] = graphs[0]
            row["new_shapes"] = first_s
        rows.append(row)
    eager, comp = rows
    rows.append({"bench": "step_compile_speedup", "model": preset, "image_size": sizes[0], "batch": batch,
                 "speedup": round(eager["step_s_median"] / comp["step_s_median"], 3)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reclip-ray bench step", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["memory", "compile"])
    p.add_argument("--model", default="tiny", help="model preset")
    p.add_argument("--global-batches", type=_ints, default=[64, 128, 256, 512], help="memory: global batches")
    p.add_argument("--micro-batches", type=_ints, default=[0, 32], help="memory: 0 = no accumulation")
    p.add_argument("--batch", type=int, default=64, help="compile: batch")
    p.add_argument("--sizes", type=_ints, default=[64, 32], help="compile: image sizes (the first is timed)")
    p.add_argument("--image-size", type=int, default=64, help="memory: image size")
    p.add_argument("--text-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="compile: untimed steps (the first one compiles)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warm-cache", action="store_true",
                   help="compile: reuse inductor's on-disk cache (default: a fresh one, so the compile is cold)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: GLOBAL,MICRO in this process
    args = p.parse_args(list(argv or []))
    if args.what == "compile" and not args.warm_cache:
        import tempfile

        # Inductor caches compiled graphs under /tmp across processes: a second run would time a cache hit.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="reclip-inductor-")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        global_batch, micro = _ints(args.one)
        print(json.dumps(measure_memory(args.model, global_batch, micro, args.image_size, args.text_length,
                                        args.steps, args.device, args.precision)), flush=True)
        return 0
    if args.what == "compile":
        for row in measure_compile(args.model, args.batch, args.sizes, args.text_length, args.steps, args.warmup,
                                   args.device, args.precision, args.warm_cache):
            print(json.dumps(row), flush=True)
        return 0
    passthrough = ["--model", args.model, "--image-size", str(args.image_size), "--text-length",
                   str(args.text_length), "--steps", str(args.steps), "--device", args.device,
                   "--precision", args.precision, "--threads", str(args.threads)]
    for micro in args.micro_batches:
        for global_batch in args.global_batches:
            cmd = [sys.executable, "-m", "reclip_ray.bench.step", "memory", "--one", f"{global_batch},{micro}",
                   *passthrough]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                print(json.dumps({"bench": "step_memory", "global_batch": global_batch, "micro_batch": micro,
                                  "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
                continue
            print(done.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
