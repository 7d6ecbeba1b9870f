"""One trial's config: the base config with the trial's parameters applied, and the sweep's budget (GFLOPs or
samples) turned into absolute phase lengths, so a 32 px main phase gets more samples than a 64 px one; and its input
paths given relative kept so in the config Tune saves, and resolved against the current launch's folder when the
trial starts (``keep_relative_inputs``, ``resolve_inputs``)."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from reclip_ray.config import ConfigError, TrainConfig, absolute, model_config, set_path
from reclip_ray.data.clip_bpe import CLIP_NAME
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


# The keys that name files a run reads (``train.prepare`` makes them absolute against the working directory). Its
# outputs (run.storage_path, tracking.uri, a tokenizer trained at launch) are not among them: see keep_relative_inputs.
INPUT_KEYS = ("data.train", "data.eval", "data.tokenizer", "model.init_from")


def launch_relative(value: Any) -> bool:
    """A local path that names a place relative to the launch's working directory (not ``~/x``, not a URI)."""
    return isinstance(value, str) and value != "" and "://" not in value \
        and not os.path.isabs(os.path.expanduser(value))


def keep_relative_inputs(prepared: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``prepared`` (a base config after ``prepare``, its paths absolute) with each input that ``given`` (the same
    config before it) named relative put back as given: the base config Tune saves with the sweep.

    Under ``ray job submit --working-dir``, a relative input resolves inside Ray's copy of the working dir, a folder
    named by a hash of the files: the next submit of the sweep (after any edit) runs in another, and Ray may have
    deleted the first by then. Tune resumes every trial with the config saved at the sweep's start, so an absolute
    path there would send a resumed trial to the old copy; kept relative, each trial resolves it against the folder
    of the launch that runs it (``resolve_inputs``). Outputs stay as ``prepare`` made them (in a job with a working
    dir, under ``$RECLIP_RAY_HOME``): a resumed trial goes on in the run folder and MLflow store its checkpoints and
    run belong to."""
    out = copy.deepcopy(prepared)
    for key in INPUT_KEYS:
        value, now = _get(given, key), _get(prepared, key)
        if launch_relative(value) and now == absolute(value):  # prepare took it from the relative one
            set_path(out, key, value)
    return out


def resolve_inputs(raw: dict[str, Any], launch_dir: str) -> dict[str, Any]:
    """``raw`` with its relative input paths made absolute against ``launch_dir`` (the working directory of the
    launch that runs the trial), as ``prepare`` does in the launch itself: a trial runs in Tune's trial folder, where
    a relative path would name nothing. ``data.tokenizer: clip`` is OpenAI's tokenizer, unless a file of that name is
    in the launch's folder (``clip_bpe.selects_clip_bpe``)."""
    out = copy.deepcopy(raw)
    for key in INPUT_KEYS:
        value = _get(out, key)
        if not launch_relative(value):
            continue
        full = absolute(value, launch_dir)
        if key == "data.tokenizer" and value == CLIP_NAME and not os.path.exists(full):
            continue
        set_path(out, key, full)
    return out


def _get(raw: Any, dotted: str) -> Any:
    """The value at a dotted path of a raw config, None where there is none (``model`` may be a preset's name)."""
    for part in dotted.split("."):
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw
