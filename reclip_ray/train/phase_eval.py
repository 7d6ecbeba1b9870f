"""The evaluations in a training run: at phase ends and at compute milestones, on every rank (each encodes its share
of the eval rows), and what of them goes into a report, the console and eval.json.
"""

from __future__ import annotations

from typing import Any

import torch

from reclip_ray.config import Config, full_image_size, full_text_length
from reclip_ray.run_names import EVAL_ERROR, full_view


def skip_reason(cfg: Config, at_phase_end: bool) -> str | None:
    """Why this evaluation does not run (None: it does)."""
    if not cfg.data.eval:
        return "no evaluation: data.eval is empty"
    if at_phase_end and not cfg.eval.at_phase_end:
        return "no evaluation: eval.at_phase_end is false"
    return None


def evaluate_phase(cfg: Config, model: torch.nn.Module, tokenizer: Any, plan: Any, device: torch.device,
                   rank: int = 0, world: int = 1, own: bool = True) -> dict[str, float]:
    """Zero-shot + retrieval at full resolution and (``own``) at the phase's resolution, if different. With
    ``world`` > 1 every rank calls it and encodes its share of the rows; all return the same metrics. The towers run
    at the training precision (``train.precision``: bf16 autocast on a GPU by default), as in the steps."""
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.evaluation.dataset import evaluate_dataset
    from reclip_ray.evaluation.eval_set import eval_columns
    from reclip_ray.train.step import autocast_dtype_for

    full_size = full_image_size(cfg)
    # At the full image size the full text length wins: a phase at that size with shorter texts (a sweep trial
    # without its finetune) is scored on the run's task, under the one name eval/<size>px.
    sizes = {plan.image_size: plan.text_length} if own and plan.image_size != full_size else {}
    sizes[full_size] = full_text_length(cfg)
    out: dict[str, float] = {}
    for image_size, text_length in sizes.items():
        metrics = evaluate_dataset(
            model,
            tokenizer,
            cfg.data.eval,
            image_size=image_size,
            text_length=text_length,
            batch_size=cfg.eval.batch_size,
            columns=eval_columns(cfg.data.eval, ColumnMap.from_config(cfg.data)),
            device=device,
            rank=rank,
            world_size=world,
            autocast_dtype=autocast_dtype_for(cfg.train.precision, device),
        )
        out.update({f"eval/{image_size}px/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def eval_report(rank: int, cfg: Config, metrics: dict[str, float], error: str | None) -> dict[str, Any]:
    """The evaluation part of a report that may reach Tune (a compute milestone, a phase end, the final report).

    The metrics, with the full-resolution ones again under ``eval/full/...`` (one name for a sweep's metric whatever
    each trial's full size is); or, when this evaluation failed or did not run, why (``eval_error``): a sweep then
    reports its metric as NaN for this trial here (``sweep.tune_result``) instead of failing Tune's metric check.
    Only rank 0's report reaches Tune; the other ranks' carry neither.
    """
    if rank != 0:
        return {}
    if error is not None:
        return {EVAL_ERROR: error}
    return {**metrics, **full_view_of(cfg, metrics)}


def full_view_of(cfg: Config, eval_metrics: dict[str, float]) -> dict[str, float]:
    """``run_names.full_view`` at this run's full resolution (``config.full_image_size``)."""
    return full_view(full_image_size(cfg), eval_metrics)


def eval_line(metrics: dict[str, float]) -> str:
    """``32px: colour 0.61 (chance 0.10), shape 0.18 (0.10), i2t R@1 0.05 | 64px: ...`` for the console."""
    parts = []
    sizes = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.split("/")[1] != "full"},
                   key=lambda s: int(s.rstrip("px")))
    for size in sizes:
        prefix = f"eval/{size}/"
        sets = [k[len(prefix):-len("/top1")] for k in metrics if k.startswith(prefix) and k.endswith("/top1")]
        items = [f"{s} {metrics[prefix + s + '/top1']:.2f} (chance {metrics.get(prefix + s + '/chance_top1', 0):.2f})"
                 for s in sets]
        for key, label in (("image_to_text_r@1", "i2t R@1"), ("text_to_image_r@1", "t2i R@1")):
            if prefix + key in metrics:
                items.append(f"{label} {metrics[prefix + key]:.2f}")
        parts.append(f"{size}: " + ", ".join(items))
    return " | ".join(parts)
