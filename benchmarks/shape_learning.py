"""How fast does the tiny preset learn the synthetic set's shape labels? (issue 16, item 3: a default job that shows
learning beyond colour). Single process, no Ray: the default job's two phases (90 % at 32 px, 10 % at 64 px) or any
schedule given with --set, on the synthetic set or a variant of its generator; evaluates zero-shot top-1 of every
label set at 32 and 64 px every 16,000 samples of the first phase and at each phase end.

    python benchmarks/shape_learning.py base 1e-3 64000 base_lr1e-3                     # the default data
    python benchmarks/shape_learning.py big1 1e-3 64000 big1 train.batch_size=32         # + any --set override

Variants of the generator (``synth._sample_scene`` patched): ``base`` (as shipped), ``big`` (objects ~25 % larger,
80 % single-object scenes), ``big1`` (one large object per image). Data goes to /tmp/shape_learning/data_VARIANT
(made once, 20,000 + 1,000 rows); results to benchmarks/results/shape_learning_TAG.jsonl.
benchmarks/results/shape_learning.jsonl holds the runs of 2026-11-29 (BENCHMARKS.md, "Shape learning"), made with
this code under another file name before it was added here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import reclip_ray.data.synth as synth
from reclip_ray.config import load_config
from reclip_ray.data.local import iter_local_batches
from reclip_ray.data.tokenizer import train_tokenizer
from reclip_ray.evaluation.dataset import evaluate_dataset
from reclip_ray.model import build_model
from reclip_ray.schedule import Schedule, build_optimizer
from reclip_ray.train.step import train_step

VARIANTS = {
    "base": None,
    "big": {"large": (0.34, 0.42), "small": (0.24, 0.29), "objects": [0.8, 0.15, 0.05]},
    "big1": {"large": (0.34, 0.42), "small": (0.26, 0.32), "objects": [1.0, 0.0, 0.0]},
}


def patch_generator(variant: str) -> None:
    spec = VARIANTS[variant]
    if spec is None:
        return
    original = synth._sample_scene

    def scene(rng: np.random.Generator, size: int) -> list[dict]:
        objects = original(rng, size)[: int(rng.choice([1, 2, 3], p=spec["objects"]))]
        for obj in objects:
            lo, hi = spec["large"] if obj["size"] == "large" else spec["small"]
            obj["r"] = size * rng.uniform(lo, hi)
        return objects

    synth._sample_scene = scene


def main(argv: list[str]) -> None:
    variant, lr, total, tag, extra = argv[0], float(argv[1]), int(argv[2]), argv[3], argv[4:]
    patch_generator(variant)
    data = f"/tmp/shape_learning/data_{variant}"
    if not os.path.exists(f"{data}/eval/dataset.json"):
        synth.make_synthetic(data, train=20000, eval=1000, workers=1)
    cfg = load_config("tiny", [f"data.train={data}/train", f"data.eval={data}/eval", f"optim.lr={lr}",
                               f"train.samples={total}"] + extra)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(cfg.data.train, vocab_size=1024)
    model = build_model(cfg.model, tokenizer=tokenizer)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule.from_config(cfg)
    batch_size = cfg.train.batch_size
    out_path = Path(__file__).resolve().parent / "results" / f"shape_learning_{tag}.jsonl"
    out = out_path.open("w")
    samples, epoch, t0 = 0, 0, time.time()

    def evaluate(at: str) -> None:
        row = {"at": at, "samples": samples, "seconds": round(time.time() - t0), "variant": variant, "lr": lr,
               "batch": batch_size, "set": extra}
        for size, text_length in ((32, 16), (64, 32)):
            metrics = evaluate_dataset(model.eval(), tokenizer, cfg.data.eval, image_size=size,
                                       text_length=text_length)
            row.update({f"{k.split('/')[0]}@{size}": round(v, 3) for k, v in metrics.items() if k.endswith("/top1")})
        model.train()
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    ends = np.cumsum(cfg.phase_samples())
    for index, phase in enumerate(cfg.phases):
        while samples < ends[index]:
            for batch in iter_local_batches(cfg.data.train, image_size=phase.image_size,
                                            text_length=phase.text_length, tokenizer=tokenizer,
                                            batch_size=batch_size, train=True, seed=epoch):
                if len(batch["tokens"]) < batch_size:
                    continue
                train_step(model, optimizer, torch.from_numpy(batch["image"]), torch.from_numpy(batch["tokens"]),
                           lr=schedule.lr_at(samples))
                samples += batch_size
                if index == 0 and samples % 16000 < batch_size:
                    evaluate("mid")
                if samples >= ends[index]:
                    break
            epoch += 1
        evaluate(phase.name)


if __name__ == "__main__":
    main(sys.argv[1:])
