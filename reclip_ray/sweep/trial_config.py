"""One trial's config: the base config with the trial's parameters applied, and the sweep's budget (GFLOPs or
samples) turned into absolute phase lengths, so a 32 px main phase gets more samples than a 64 px one."""

from __future__ import annotations

import copy
import math
from typing import Any

from reclip_ray.config import ConfigError, TrainConfig, model_config, set_path
from reclip_ray.flops import train_flops_per_sample
from reclip_ray.sweep.space import FINETUNE_FRACTION


def trial_raw(base_raw: dict[str, Any], params: dict[str, Any], budget: dict[str, float]) -> dict[str, Any]:
    """The full raw config of one trial: params applied, then the budget turned into absolute phase lengths.

    ``finetune_fraction`` f gives the last phase a share f and scales the others to 1 - f; f = 0 drops the finetune
    (the low-resolution-only ablation) but still evaluates at the finetune's resolution and text length.
    """
    raw = copy.deepcopy(base_raw)
    for key, value in params.items():
        if key != FINETUNE_FRACTION:
            set_path(raw, key, value)
    fractions = _phase_shares(raw, params)
    if fractions[-1] == 0.0:
        full = raw.setdefault("eval", {})
        full["full_image_size"] = int(raw["phases"][-1]["image_size"])
        if "text_length" in raw["phases"][-1]:
            full["full_text_length"] = int(raw["phases"][-1]["text_length"])
    keep = [(ph, fr) for ph, fr in zip(raw["phases"], fractions) if fr > 0.0]
    total = _total_samples(raw, keep, budget)
    counts = [int(math.floor(fr * total)) for _, fr in keep]
    raw["phases"] = []
    for (ph, _), n in zip(keep, counts):
        if n <= 0:
            raise ConfigError(f"budget {budget} leaves phase '{ph.get('name')}' with no samples")
        raw["phases"].append({**ph, "samples": n})
    raw["train"]["samples"] = sum(counts)
    return raw


def _phase_shares(raw: dict[str, Any], params: dict[str, Any]) -> list[float]:
    """Each phase's share of the run's samples: as the config has them, or with the last one set to the trial's
    ``finetune_fraction`` and the others scaled to the rest."""
    fractions = _phase_fractions(raw)
    if FINETUNE_FRACTION not in params:
        return fractions
    f = float(params[FINETUNE_FRACTION])
    if not 0.0 <= f < 1.0 or len(raw["phases"]) < 2:
        raise ConfigError(f"finetune_fraction {f} needs 0 <= f < 1 and at least two phases")
    head = sum(fractions[:-1])
    return [x / head * (1.0 - f) for x in fractions[:-1]] + [f]


def _phase_fractions(raw: dict[str, Any]) -> list[float]:
    """Each phase's share of the run's samples, from fractions or absolute counts."""
    total = float(raw["train"]["samples"])
    counts = [float(ph["samples"]) * total if isinstance(ph["samples"], float) and ph["samples"] <= 1.0 else float(ph["samples"])
              for ph in raw["phases"]]
    s = sum(counts)
    return [c / s for c in counts]


def _total_samples(raw: dict[str, Any], keep: list[tuple[dict[str, Any], float]], budget: dict[str, float]) -> float:
    """The trial's samples: what its GFLOPs budget buys at its phases' mix of per-sample costs, or the samples
    budget, or (no budget) the config's own ``train.samples``."""
    model_cfg = model_config(raw.get("model"))
    if "gflops" in budget:
        batch = int(raw.get("train", {}).get("batch_size") or TrainConfig.batch_size)  # logits: as gflops_total
        per_sample = sum(fr * train_flops_per_sample(model_cfg, int(ph["image_size"]), int(ph["text_length"]),
                                                     int(ph.get("batch_size") or batch),
                                                     patch_dropout=float(ph.get("patch_dropout") or 0.0))
                         for ph, fr in keep) / 1e9
        return budget["gflops"] / per_sample
    if "samples" in budget:
        return budget["samples"]
    return float(raw["train"]["samples"])
