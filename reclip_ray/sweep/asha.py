"""ASHA on a compute axis: where trials are compared (rungs in training GFLOPs, ``asha_axis``), on what
(``asha_metric``: the full-resolution evaluation), and what of a trial's reports reaches Tune (``tune_result``).

A RECLIP schedule and a full-resolution baseline end their phases at very different compute; ASHA compares them
at equal GFLOPs spent instead, each trial evaluating when it crosses a rung (``eval.at_gflops``).
"""

from __future__ import annotations

import re
from typing import Any

from reclip_ray.config import ConfigError
from reclip_ray.run_names import EVAL_ERROR, TIME_ATTR
from reclip_ray.sweep.space import Space


# What a trial's reports to Tune carry that a sweep can rank by: the training loss, and the evaluation at full
# resolution (``evaluation/dataset.py``: each label set's top-1, top-5 and mean per-class recall; retrieval R@1, 5
# and 10 both ways).
TUNE_METRIC = re.compile(r"^(loss|eval/full/(.+/(top[15]|mean_per_class_recall)"
                         r"|(image_to_text|text_to_image)_r@(1|5|10)))$")


def check_metric_names(space: Space) -> None:
    """A metric no report carries (``los``, ``lr``, ``eval/full/shape/top-1``) passes every other check, and Tune
    fails the whole sweep at the first trial's first rung or phase end: one line before Ray starts instead. (A
    label set the eval set lacks: ``run.check_metrics_in_eval_set``, once the eval set is read.)"""
    for where, metric in (("metric", space.metric), ("scheduler.metric", space.scheduler.get("metric"))):
        if metric is not None and not TUNE_METRIC.match(str(metric)):
            raise ConfigError(f"{where} {metric!r} is in no trial's report to Tune: use loss, eval/full/<label set>/"
                              "top1 (top5, mean_per_class_recall), or eval/full/image_to_text_r@1 (r@5, r@10; or "
                              "text_to_image_r@...)")


def asha_metric(space: Space) -> str:
    """What ASHA compares at its rungs: ``scheduler.metric``, else the sweep's metric itself.

    With an ``eval/full/...`` metric every trial is evaluated at a rung as its final metric is: at full resolution
    and the last phase's text length (``Worker.compute_milestone``), so ASHA compares all trials on one task. For
    a RECLIP trial still in its low-resolution phase that is its model before the finetune, measured as it is.
    Each trial at the resolution it trains at then is a different task per trial, and misjudges RECLIP trials by no
    fixed amount. BENCHMARKS.md's 32 -> 64 px experiment: the 32 px-only (lowres)
    arm scored 0.177-0.386 shape top-1 at 32 px but about 0.155 at 64 px, where the finetuned RECLIP arm ended
    (0.154). Colour at full resolution before any finetune is behind the finetuned arm, not collapsed: 0.803 vs
    0.853 at 64 px, 0.719 vs 0.798 at 112 px. So the full-resolution value before the finetune is what predicts the
    final metric. What remains is that gap: ASHA may stop a RECLIP trial that trails a full-resolution one at a rung
    by less than its finetune would add (raise ``grace_fraction``, or use ``fifo``, when trials are that close).
    The training loss is one resolution per trial too, and also depends on text length and batch size.
    """
    return str(space.scheduler.get("metric") or space.metric)


def asha_mode(space: Space) -> str:
    """Which way ASHA's metric is better: the sweep's ``mode`` for the sweep's own metric; for another
    ``scheduler.metric``, that metric's: ``loss`` falls, every evaluation metric (top-k, R@k) rises. The sweep's mode
    (max, for an accuracy) on a ``loss`` kept the trials with the highest loss at each rung and stopped the best."""
    metric = asha_metric(space)
    if metric == space.metric:
        return space.mode
    return "min" if metric == "loss" else "max"


def tune_result(report: dict[str, Any], metrics: list[str]) -> dict[str, Any] | None:
    """What of a trial's Ray Train report reaches Tune: None for a mid-phase checkpoint report (no evaluation,
    no round); a phase end, compute milestone or final report as it is, except that a report whose evaluation
    failed or did not run (``eval_error``) gets each of ``metrics`` (the ones Tune checks) as NaN.

    Tune fails the whole sweep on a result without its metric. NaN keeps the trial going (RELIABILITY.md: an
    evaluation failure never costs the training): ASHA records it at the rung without comparing it (its cutoff is a
    ``nanpercentile`` and ``NaN < cutoff`` is false), and the trial's row in results.csv says why it has no metric.
    A report that was evaluated but lacks the metric (a misspelt label set) still fails loudly.

    The final report's ``done`` is dropped: Tune stops a trial the moment a result says ``done``, while the trial
    still has its run to close (the run state's record that it finished, the MLflow run's end and relay tags,
    ray.log to a remote run folder); Tune sees the trial end when its function returns.
    """
    if "eval_round" not in report and "compute_round" not in report:
        return None
    report = {k: v for k, v in report.items() if k != "done"}
    if EVAL_ERROR not in report:
        return report
    return {**{m: float("nan") for m in metrics}, **report}


def asha_milestones(grace: float, max_t: float, reduction_factor: float) -> list[float]:
    """The rungs (GFLOPs) of Ray's ASHA with one bracket: grace * rf**k for k < log(max_t / grace) / log(rf) + 1
    (the same expression as ``ray.tune.schedulers.async_hyperband._Bracket``, so the trials report where it looks)."""
    import numpy as np

    rungs = int(np.log(max_t / grace) / np.log(reduction_factor) + 1)
    return [grace * reduction_factor ** k for k in range(rungs)]


def asha_axis(space: Space, trial_gflops: list[float]) -> dict[str, Any]:
    """ASHA's time axis in training GFLOPs: ``max_t``, ``grace``, ``reduction_factor`` and the rungs' milestones,
    from the space and the trials' total GFLOPs (``flops.run_flops`` of each trial's config).

    max_t: ``scheduler.max_gflops``, else the GFLOPs budget every trial is built to spend, else the largest trial's
    total. grace: ``scheduler.grace_gflops``, else ``grace_fraction`` (default 0.25) of max_t. With the default
    reduction factor 2 the rungs sit at 1/4, 1/2 and all of the budget: past every trial's warmup, and early enough
    that a trial cut at the first rung gives back three quarters of its compute. A trial never stops at max_t
    (``stop_last_trials=False``): it ends by itself, at its budget.
    """
    max_t = float(space.scheduler.get("max_gflops") or space.budget.get("gflops") or max(trial_gflops))
    grace = float(space.scheduler.get("grace_gflops") or float(space.scheduler["grace_fraction"]) * max_t)
    if grace > max_t:
        raise ConfigError(f"scheduler.grace_gflops {grace:g} is above the trials' {max_t:g} training GFLOPs")
    rf = float(space.scheduler["reduction_factor"])
    return {"max_t": max_t, "grace": grace, "reduction_factor": rf, "milestones": asha_milestones(grace, max_t, rf)}


def make_scheduler(space: Space, axis: dict[str, Any] | None):
    """The Tune scheduler of a space: ASHA on ``asha_axis`` comparing ``asha_metric`` (``asha_mode``), or FIFO."""
    from ray import tune

    if space.scheduler["name"] != "asha" or axis is None:
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(
        time_attr=TIME_ATTR, metric=asha_metric(space), mode=asha_mode(space), max_t=axis["max_t"],
        grace_period=axis["grace"], reduction_factor=axis["reduction_factor"], stop_last_trials=False,
    )
