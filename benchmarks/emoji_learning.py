"""How many samples does a resolution need to learn the emoji data? (issue 23: size the RECLIP experiment's budget.)
Single process, no Ray: one phase at ``--size`` px under one warmup + cosine over ``--samples`` (the experiment's
baseline schedule), zero-shot top-1 of every label set and R@5 both ways on each eval split at ``--eval-size`` px
every ``--every`` samples and at the end. A mid-run evaluation is taken at a higher LR than a run of that length
would end at, so it understates what a run of that length reaches.

    python benchmarks/emoji_learning.py --data /tmp/emoji --size 128 --samples 24000 --every 6000
    python benchmarks/emoji_learning.py --data /tmp/emoji --size 32 --samples 24000 --every 6000 --eval-size 128

Rows (one JSON line per evaluation): benchmarks/results/emoji_learning_TAG.jsonl (``--tag``, default s<size>).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reclip_ray.config import load_config
from reclip_ray.data.local import iter_local_batches
from reclip_ray.data.tokenizer import train_tokenizer
from reclip_ray.evaluation.dataset import evaluate_dataset
from reclip_ray.model import build_model
from reclip_ray.schedule import Schedule, build_optimizer
from reclip_ray.train.step import train_step

KEEP = ("/top1", "image_to_text_r@5", "text_to_image_r@5")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="emoji_data.py's output folder")
    p.add_argument("--splits", default="eval_style,eval_emoji")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=0, help="default --size")
    p.add_argument("--text-length", type=int, default=32)
    p.add_argument("--samples", type=int, default=24000)
    p.add_argument("--every", type=int, default=6000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--tag", default="")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    eval_size = args.eval_size or args.size
    cfg = load_config("tiny", [
        f"data.train={args.data}/train", f"train.samples={args.samples}", f"train.batch_size={args.batch}",
        f"optim.lr={args.lr}", "optim.warmup_samples=0.05", f"model.vision.base_image_size={eval_size}",
        f"phases=[{{name: one, image_size: {args.size}, text_length: {args.text_length}, samples: 1.0}}]",
        *args.set])
    torch.manual_seed(cfg.train.seed)
    tokenizer = train_tokenizer(cfg.data.train, vocab_size=args.vocab_size)
    model = build_model(cfg.model, tokenizer=tokenizer)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule.from_config(cfg)
    out = Path(__file__).resolve().parent / "results" / f"emoji_learning_{args.tag or f's{args.size}'}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples, epoch, t0 = 0, 0, time.perf_counter()
    eval_s = [0.0]  # time spent evaluating, not training (decode + step are both training)
    with out.open("w") as f:
        def evaluate() -> None:
            train_s = time.perf_counter() - t0 - eval_s[0]
            row = {"samples": samples, "size": args.size, "eval_size": eval_size, "lr": args.lr,
                   "batch": args.batch, "train_s": round(train_s, 1), "samples_per_s": round(samples / train_s, 1),
                   "set": args.set}
            for split in args.splits.split(","):
                start = time.perf_counter()
                metrics = evaluate_dataset(model, tokenizer, f"{args.data}/{split}", image_size=eval_size,
                                           text_length=args.text_length)
                row.update({f"{split}/{k}": round(v, 4) for k, v in metrics.items() if k.endswith(KEEP)})
                row[f"{split}/eval_s"] = round(time.perf_counter() - start, 1)
                eval_s[0] += row[f"{split}/eval_s"]
            model.train()
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()

        while samples < args.samples:
            for batch in iter_local_batches(cfg.data.train, image_size=args.size, text_length=args.text_length,
                                            tokenizer=tokenizer, batch_size=args.batch, train=True, seed=epoch):
                if len(batch["tokens"]) < args.batch:
                    continue
                train_step(model, optimizer, torch.from_numpy(batch["image"]), torch.from_numpy(batch["tokens"]),
                           lr=schedule.lr_at(samples))
                samples += args.batch
                if samples % args.every < args.batch or samples >= args.samples:
                    evaluate()
                if samples >= args.samples:
                    break
            epoch += 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
