"""Ray Tune sweeps over RECLIP schedules at equal compute.

A search space is a YAML file (``tune_spaces/*.yaml``)::

    name: smoke
    base: tiny                       # preset name or config path (relative to the space file)
    set: ["train.batch_size=64"]     # overrides for every trial
    params:                          # dotted config paths (as --set), plus finetune_fraction
      phases.0.image_size: {grid: [32, 48]}
      finetune_fraction: {grid: [0.1, 0.25]}
      phases.1.lr: {loguniform: [1.0e-5, 1.0e-3]}
    metric: eval/full/shape/top1     # eval/full/... = evaluated at the run's full resolution
    mode: max
    budget: {gflops: 40}             # or {samples: 20000}: each trial's phase lengths are derived from it
    scheduler: {name: asha, grace_fraction: 0.25, reduction_factor: 2}   # time axis: training GFLOPs spent
    num_samples: 1
    max_concurrent_trials: 2

Each trial is a function trainable that builds and fits a ``TorchTrainer`` (Ray Train V2's way of nesting Train in
Tune); ``TuneReportCallback`` forwards what rank 0 reports at every phase end and at every compute milestone
(``tune_result``: a report whose evaluation failed carries the metric as NaN, so the sweep goes on).
Compute is the fair axis twice over: with a GFLOPs budget a 32 px main phase gets more samples than a 64 px one,
and ASHA compares trials at equal GFLOPs spent (``asha_axis``), not at phase ends, which fall at very different
compute for a RECLIP schedule and a full-resolution baseline; and at one resolution, the full one (``asha_metric``).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reclip_ray import storage
from reclip_ray.config import ConfigError, apply_overrides, from_dict, load_raw, set_path
from reclip_ray.run_names import EVAL_ERROR, FULL, TIME_ATTR


FINETUNE_FRACTION = "finetune_fraction"
SPACE_KEYS = {"name", "base", "set", "params", "metric", "mode", "budget", "scheduler", "num_samples",
              "max_concurrent_trials", "resources_per_trial_cpu"}
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
# ASHA on a compute axis (see asha_axis): rungs at grace, grace * rf, ... GFLOPs, grace = grace_fraction x the
# largest trial's GFLOPs unless grace_gflops is given; metric: what ASHA compares (default: see asha_metric).
SCHEDULER_DEFAULTS = {"name": "asha", "grace_fraction": 0.25, "reduction_factor": 2}
SCHEDULER_KEYS = {"name", "metric", "grace_fraction", "grace_gflops", "reduction_factor", "max_gflops"}


@dataclass
class Space:
    name: str
    base: str
    overrides: list[str]
    params: dict[str, dict[str, Any]]
    metric: str = "eval/full/shape/top1"
    mode: str = "max"
    budget: dict[str, float] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_DEFAULTS))
    num_samples: int = 1
    max_concurrent_trials: int = 1
    resources_per_trial_cpu: float = 0.1


def load_space(path: str | os.PathLike) -> Space:
    """Read and check a search-space YAML; every mistake is a one-line ConfigError naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a search space must be a YAML mapping")
    unknown = set(raw) - SPACE_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; valid: {sorted(SPACE_KEYS)}")
    base = str(raw.get("base", "tiny"))
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base = str((p.parent / base).resolve())
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{p}: 'params' must map config paths to domains like {{grid: [32, 64]}}")
    for key, dom in params.items():
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            raise ConfigError(f"{p}: params.{key} must be one of {{{' | '.join(d + ': ...' for d in DOMAINS)}}}")
        kind, value = next(iter(dom.items()))
        if kind in ("grid", "choice") and (not isinstance(value, list) or not value):
            raise ConfigError(f"{p}: params.{key}.{kind} must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and (not isinstance(value, list) or len(value) != 2):
            raise ConfigError(f"{p}: params.{key}.{kind} must be [low, high]")
    budget = raw.get("budget") or {}
    if budget and (not isinstance(budget, dict) or set(budget) - {"gflops", "samples"} or len(budget) != 1):
        raise ConfigError(f"{p}: budget must be {{gflops: N}} or {{samples: N}}")
    _check_metric(p, "metric", raw.get("metric"))
    _check_metric(p, "scheduler.metric", (raw.get("scheduler") or {}).get("metric"))
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{p}: mode must be max or min, got {mode!r}")
    scheduler = {**SCHEDULER_DEFAULTS, **(raw.get("scheduler") or {})}
    if scheduler["name"] not in ("asha", "fifo"):
        raise ConfigError(f"{p}: scheduler.name must be asha or fifo, got {scheduler['name']!r}")
    if "grace_period" in scheduler:
        raise ConfigError(f"{p}: scheduler.grace_period (evaluation rounds) is gone: ASHA's time axis is training "
                          "GFLOPs now; use scheduler.grace_fraction (of the budget, default 0.25) or grace_gflops")
    unknown = set(scheduler) - SCHEDULER_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown scheduler key(s) {sorted(unknown)}; valid: {sorted(SCHEDULER_KEYS)}")
    for key in ("grace_fraction", "grace_gflops", "max_gflops"):
        if key in scheduler and not (isinstance(scheduler[key], (int, float)) and scheduler[key] > 0):
            raise ConfigError(f"{p}: scheduler.{key} must be a positive number, got {scheduler[key]!r}")
    if not 0 < float(scheduler["grace_fraction"]) <= 1:
        raise ConfigError(f"{p}: scheduler.grace_fraction must be in (0, 1], got {scheduler['grace_fraction']!r}")
    if not (isinstance(scheduler["reduction_factor"], (int, float)) and scheduler["reduction_factor"] > 1):
        raise ConfigError(f"{p}: scheduler.reduction_factor must be > 1, got {scheduler['reduction_factor']!r}")
    return Space(
        name=str(raw.get("name") or p.stem),
        base=base,
        overrides=[str(s) for s in raw.get("set") or []],
        params=params,
        metric=str(raw.get("metric", "eval/full/shape/top1")),
        mode=mode,
        budget={k: float(v) for k, v in budget.items()},
        scheduler=scheduler,
        num_samples=int(raw.get("num_samples", 1)),
        max_concurrent_trials=int(raw.get("max_concurrent_trials", 1)),
        resources_per_trial_cpu=float(raw.get("resources_per_trial_cpu", 0.1)),
    )


def _check_metric(path: Path, where: str, metric: Any) -> None:
    """An evaluation metric must be one every trial reports at every rung and at its end: ``eval/full/...``."""
    if metric is None or not str(metric).startswith("eval/") or str(metric).startswith(FULL):
        return
    raise ConfigError(f"{path}: {where} {metric!r}: a sweep compares evaluations at full resolution only "
                      f"(every trial's final metric, and what ASHA compares at its rungs): use "
                      f"{FULL}{str(metric).split('/', 2)[-1]}")


# ------------------------------------------------------------------------------------------ trial configs


def _phase_fractions(raw: dict[str, Any]) -> list[float]:
    """Each phase's share of the run's samples, from fractions or absolute counts."""
    total = float(raw["train"]["samples"])
    counts = [float(ph["samples"]) * total if isinstance(ph["samples"], float) and ph["samples"] <= 1.0 else float(ph["samples"])
              for ph in raw["phases"]]
    s = sum(counts)
    return [c / s for c in counts]


def trial_raw(base_raw: dict[str, Any], params: dict[str, Any], budget: dict[str, float]) -> dict[str, Any]:
    """The full raw config of one trial: params applied, then the budget turned into absolute phase lengths.

    ``finetune_fraction`` f gives the last phase a share f and scales the others to 1 - f; f = 0 drops the finetune
    (the low-resolution-only ablation) but still evaluates at the finetune's resolution.
    """
    from reclip_ray.config import _resolve_model
    from reclip_ray.flops import train_flops_per_sample
    from reclip_ray.config import ModelConfig, TrainConfig, _build

    raw = copy.deepcopy(base_raw)
    for key, value in params.items():
        if key != FINETUNE_FRACTION:
            set_path(raw, key, value)
    fractions = _phase_fractions(raw)
    if FINETUNE_FRACTION in params:
        f = float(params[FINETUNE_FRACTION])
        if not 0.0 <= f < 1.0 or len(raw["phases"]) < 2:
            raise ConfigError(f"finetune_fraction {f} needs 0 <= f < 1 and at least two phases")
        head = sum(fractions[:-1])
        fractions = [x / head * (1.0 - f) for x in fractions[:-1]] + [f]
    full = raw["phases"][-1]
    if fractions[-1] == 0.0:
        raw.setdefault("eval", {})["full_image_size"] = int(full["image_size"])
    keep = [(ph, fr) for ph, fr in zip(raw["phases"], fractions) if fr > 0.0]
    model_cfg = _build(ModelConfig, _resolve_model(raw.get("model")), "model")
    if "gflops" in budget:
        batch = int(raw.get("train", {}).get("batch_size") or TrainConfig.batch_size)  # logits: as gflops_total
        per_sample = sum(fr * train_flops_per_sample(model_cfg, int(ph["image_size"]), int(ph["text_length"]),
                                                     int(ph.get("batch_size") or batch),
                                                     patch_dropout=float(ph.get("patch_dropout") or 0.0))
                         for ph, fr in keep) / 1e9
        total = budget["gflops"] / per_sample
    elif "samples" in budget:
        total = budget["samples"]
    else:
        total = float(raw["train"]["samples"])
    counts = [int(math.floor(fr * total)) for _, fr in keep]
    raw["phases"] = []
    for (ph, _), n in zip(keep, counts):
        if n <= 0:
            raise ConfigError(f"budget {budget} leaves phase '{ph.get('name')}' with no samples")
        raw["phases"].append({**ph, "samples": n})
    raw["train"]["samples"] = sum(counts)
    return raw


def _tune_domain(spec: dict[str, Any]):
    from ray import tune

    kind, value = next(iter(spec.items()))
    return {
        "grid": lambda: tune.grid_search(list(value)),
        "choice": lambda: tune.choice(list(value)),
        "uniform": lambda: tune.uniform(float(value[0]), float(value[1])),
        "loguniform": lambda: tune.loguniform(float(value[0]), float(value[1])),
        "randint": lambda: tune.randint(int(value[0]), int(value[1])),
    }[kind]()


def _param_key(key: str) -> str:
    return key.replace(".", "/")  # Tune's config keys stay flat and readable in results.csv


# ------------------------------------------------------------------------------------------ the compute axis

def asha_metric(space: Space) -> str:
    """What ASHA compares at its rungs: ``scheduler.metric``, else the sweep's metric itself.

    With an ``eval/full/...`` metric every trial is evaluated at a rung as its final metric is: at full resolution
    and the last phase's text length (``worker._compute_milestone``), so ASHA compares all trials on one task. For
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


def tune_result(report: dict[str, Any], metrics: list[str]) -> dict[str, Any] | None:
    """What of a trial's Ray Train report reaches Tune: None for a mid-phase checkpoint report (no evaluation,
    no round); a phase end, compute milestone or final report as it is, except that a report whose evaluation
    failed or did not run (``eval_error``) gets each of ``metrics`` (the ones Tune checks) as NaN.

    Tune fails the whole sweep on a result without its metric. NaN keeps the trial going (RELIABILITY.md: an
    evaluation failure never costs the training): ASHA records it at the rung without comparing it (its cutoff is a
    ``nanpercentile`` and ``NaN < cutoff`` is false), and the trial's row in results.csv says why it has no metric.
    A report that was evaluated but lacks the metric (a misspelt label set) still fails loudly.
    """
    if "eval_round" not in report and "compute_round" not in report:
        return None
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
    """The Tune scheduler of a space: ASHA on ``asha_axis`` comparing ``asha_metric``, or FIFO."""
    from ray import tune

    if space.scheduler["name"] != "asha" or axis is None:
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(
        time_attr=TIME_ATTR, metric=asha_metric(space), mode=space.mode, max_t=axis["max_t"],
        grace_period=axis["grace"], reduction_factor=axis["reduction_factor"], stop_last_trials=False,
    )


# ------------------------------------------------------------------------------------------ the trainable


def _run_trial(config: dict[str, Any]) -> None:
    """One trial: the base config + this trial's parameters, under the budget, trained by Ray Train."""
    import ray.tune

    from reclip_ray.train.launch import run_training

    setup = config["_setup"]
    params = {k.replace("/", "."): v for k, v in config.items() if k != "_setup"}
    raw = trial_raw(setup["base_raw"], params, setup["budget"])
    trial_id = ray.tune.get_context().get_trial_id()
    raw["run"]["name"] = f"{setup['sweep']}-{trial_id}"
    raw["run"]["storage_path"] = setup["trials_dir"]
    raw.setdefault("tracking", {})["experiment"] = setup["experiment"]
    raw.setdefault("eval", {})["at_gflops"] = list(setup.get("milestones") or [])  # report at ASHA's rungs
    cfg = from_dict(raw)
    run_training(cfg, callbacks=[_tune_reports(setup.get("checked_metrics") or [])],
                 parent_run_id=setup["parent_run_id"],
                 tags={"reclip.sweep": setup["sweep"], "reclip.trial_id": trial_id,
                       "reclip.budget": json.dumps(setup["budget"])})


def _tune_reports(checked: list[str]):
    """Ray Tune's report callback, forwarding what ``tune_result`` lets through (``checked``: the metrics Tune
    checks)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # Ray passes these by keyword
            result = tune_result(metrics[0], checked) if metrics else None
            if result is not None:
                super().after_report(run_context=run_context, metrics=[result, *metrics[1:]], checkpoint=checkpoint)

    return TuneReports()


class _Progress:
    """A Tune callback: one line per finished trial."""

    def __new__(cls, metric: str, n_phases: int):
        from ray.tune import Callback

        class Progress(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                self._line(trial, "done")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._line(trial, "error")

            def _line(self, trial, how):
                r = trial.last_result or {}
                rounds = r.get("eval_round", 0)  # phases finished (a compute-milestone report sits mid-phase)
                early = how == "done" and rounds < r.get("eval_rounds_planned", n_phases)
                print(
                    f"[sweep] trial {trial.trial_id} {'stopped early' if early else how}: "
                    f"{metric}={r.get(metric, float('nan')):.4f} GFLOPs {r.get('gflops_total', float('nan')):.1f} "
                    f"samples {r.get('samples', 0)} params {json.dumps(_public(trial.config))}"
                    + (f" ({r[EVAL_ERROR]})" if r.get(EVAL_ERROR) else ""),
                    flush=True,
                )

        return Progress()


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("/", "."): v for k, v in config.items() if k != "_setup"}


# ------------------------------------------------------------------------------------------ the sweep


def run_sweep(space_path: str, config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; writes results.csv, pareto.png and best.yaml in the sweep folder."""
    from ray import tune

    from reclip_ray import tracking
    from reclip_ray.train.launch import init_ray, prepare

    space = load_space(space_path)
    base_raw = apply_overrides(load_raw(config or space.base), space.overrides + list(overrides or []))
    base_cfg = from_dict(base_raw)
    # Check every trial's config (and its budget) before Ray starts: a bad grid value is a one-line error now.
    from reclip_ray.flops import run_flops

    corners = [from_dict(trial_raw(base_raw, combo, space.budget)) for combo in _grid_corners(space)]
    check_trials_evaluate(space, corners)
    totals = [run_flops(cfg)["total_train_gflops"] for cfg in corners]
    axis = asha_axis(space, totals) if space.scheduler["name"] == "asha" else None

    sweep_name = space.name
    base_cfg.run.name = sweep_name
    prep = prepare(base_cfg)  # data (synthetic if missing), tokenizer, tracking URI, absolute paths
    sweep_dir = prep.run_dir  # a local folder or a URI (storage.py): Tune, the trials and the outputs all go there
    if storage.local_path(sweep_dir):
        storage.makedirs(sweep_dir)
    base_raw = prep.cfg.to_dict()
    base_raw["data"]["synth_if_missing"] = False
    experiment = prep.cfg.tracking.experiment or f"sweep-{sweep_name}"

    state_path = storage.join(sweep_dir, "sweep_state.json")
    state = storage.read_json(state_path, default={})
    parent = tracking.start_or_resume_run(
        prep.tracking_uri, experiment, sweep_name, state.get("parent_run_id"), prep.cfg,
        tags={"reclip.sweep": sweep_name, "reclip.space": Path(space_path).read_text()[:5000]},
    )
    storage.write_json(state_path, {"parent_run_id": parent, "experiment": experiment})
    tracking.log_params(prep.tracking_uri, parent, {f"space.{k}": json.dumps(v) for k, v in space.params.items()}
                        | {"space.budget": json.dumps(space.budget), "space.metric": space.metric})

    status = "FAILED"
    try:
        init_ray(prep.cfg)
        setup = {
            "base_raw": base_raw,
            "budget": space.budget,
            "sweep": sweep_name,
            "trials_dir": storage.join(sweep_dir, "trials"),
            "experiment": experiment,
            "parent_run_id": parent,
            "milestones": axis["milestones"] if axis else [],
            # Tune checks ASHA's metric (and, without ASHA, the sweep's) in every result (tune_result)
            "checked_metrics": sorted({space.metric, asha_metric(space)} if axis else {space.metric}),
        }
        param_space = {_param_key(k): _tune_domain(v) for k, v in space.params.items()}
        param_space["_setup"] = setup
        n_phases = len(base_cfg.phases)
        scheduler = make_scheduler(space, axis)
        if axis:
            print(f"[sweep] ASHA on training GFLOPs: compares {asha_metric(space)} at "
                  f"{', '.join(f'{m:,.0f}' for m in axis['milestones'])} GFLOPs", flush=True)
        trainable = tune.with_resources(_run_trial, {"cpu": space.resources_per_trial_cpu})
        tune_dir = storage.join(sweep_dir, "tune")
        run_config = tune.RunConfig(
            name="tune", storage_path=sweep_dir, callbacks=[_Progress(space.metric, n_phases)], verbose=0,
        )
        if tune.Tuner.can_restore(tune_dir):
            print(f"[sweep] resuming {tune_dir}", flush=True)
            tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, restart_errored=True,
                                       param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(  # ASHA has its own metric (asha_metric); Tune refuses two
                    metric=None if axis else space.metric, mode=None if axis else space.mode, scheduler=scheduler,
                    num_samples=space.num_samples, max_concurrent_trials=space.max_concurrent_trials,
                ),
                run_config=run_config,
            )
        grid = tuner.fit()
        rows = _rows(grid, space, n_phases)
        _close_trial_runs(prep.tracking_uri, parent, rows)
        summary = _write_outputs(rows, space, sweep_dir, base_raw, prep, parent)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(prep.tracking_uri, parent, status)


def check_trials_evaluate(space: Space, configs: list[Any]) -> None:
    """A sweep that compares evaluations needs trials that evaluate: one line before Ray, not a NaN row per trial
    after all their training (a trial whose evaluation fails at run time still trains on: ``tune_result``)."""
    needs_eval = [m for m in (space.metric, asha_metric(space)) if m.startswith(FULL)]
    for cfg in configs:
        if needs_eval and not cfg.data.eval:
            raise ConfigError(f"metric {needs_eval[0]} needs an eval set, but data.eval is empty")
        if space.metric.startswith(FULL) and not cfg.eval.at_phase_end:
            raise ConfigError(f"metric {space.metric} is each trial's evaluation at its end, but "
                              "eval.at_phase_end is false")


def _close_trial_runs(tracking_uri: str, parent: str, rows: list[dict[str, Any]]) -> None:
    """Make each trial's MLflow status say what Tune saw: completed -> FINISHED, stopped early -> KILLED,
    error -> FAILED. No MLflow run may stay RUNNING after the sweep.

    Tune stops a trial by tearing down its actor, sometimes while the trial is still writing its final report or
    export (ASHA also stops a trial that reaches the last round): its own ``end_run`` then never runs, or records
    the teardown as FAILED.
    """
    from reclip_ray import tracking

    wanted = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED"}
    by_run = {r["mlflow_run_id"]: wanted[r["status"]] for r in rows if r.get("mlflow_run_id")}
    c = tracking.client(tracking_uri)
    exp = c.get_run(parent).info.experiment_id
    for run in c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'"):
        status = by_run.get(run.info.run_id, "KILLED")
        if run.info.status != status and run.info.status in ("RUNNING", "FAILED", "KILLED"):
            tracking.end_run(tracking_uri, run.info.run_id, status)


def _grid_corners(space: Space) -> list[dict[str, Any]]:
    """A few concrete parameter sets covering each domain's extremes (for the up-front config check)."""
    combos: list[dict[str, Any]] = [{}]
    for key, dom in space.params.items():
        kind, value = next(iter(dom.items()))
        options = list(value) if kind in ("grid", "choice") else [value[0], value[1]]
        combos = [{**c, key: o} for c in combos for o in options][:64]
    return combos


def _rows(grid: Any, space: Space, n_phases: int) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        cfg = _public(result.config or {})
        rounds = int(m.get("eval_round", 0) or 0)  # phases finished
        if result.error is not None:
            status = "error"
        elif rounds < int(m.get("eval_rounds_planned", n_phases)):
            status = "stopped_early"
        else:
            status = "completed"
        rows.append({
            "trial_id": m.get("trial_id", ""),
            **{f"param:{k}": v for k, v in cfg.items()},
            "gflops_spent": m.get("gflops_total", float("nan")),
            "budget_gflops": space.budget.get("gflops", ""),
            "samples": m.get("samples", 0),
            "phases": m.get("eval_rounds_planned", ""),
            "eval_rounds": rounds,
            space.metric: m.get(space.metric, float("nan")),
            **{k: v for k, v in sorted(m.items()) if k.startswith("eval/full/") and k != space.metric
               and ("top1" in k or "r@" in k)},
            "mlflow_run_id": m.get("mlflow_run_id", ""),
            "status": status,
            "error": _last_line(result.error) if result.error is not None else "",
            EVAL_ERROR: str(m.get(EVAL_ERROR) or "")[:200],  # why the metric is NaN (a failed/absent evaluation)
        })
    return rows


def _last_line(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong: the last one (the first is Ray's actor banner)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def _best(rows: list[dict[str, Any]], space: Space) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(float(r[space.metric]))]
    if not done:
        return None
    sign = 1 if space.mode == "max" else -1
    return max(done, key=lambda r: sign * float(r[space.metric]))


def pareto_front(points: list[tuple[float, float]], mode: str = "max") -> list[int]:
    """Indices of points not dominated (less compute and better metric) by any other point, by compute."""
    sign = 1 if mode == "max" else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _label(row: dict[str, Any]) -> str:
    return ", ".join(f"{k[6:].split('.')[-1] if k[6:] != FINETUNE_FRACTION else 'ft'}={v}"
                     for k, v in row.items() if k.startswith("param:"))


def _plot(rows: list[dict[str, Any]], space: Space, best: dict[str, Any] | None, out: str) -> None:
    """Left: metric vs training GFLOPs, Pareto front and best marked. Right: every trial's metric, labelled.

    With a GFLOPs budget all trials sit at (almost) the same x; the right panel is where schedules are compared.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [r for r in rows if not math.isnan(float(r["gflops_spent"])) and not math.isnan(float(r[space.metric]))]
    pts = [(float(r["gflops_spent"]), float(r[space.metric])) for r in kept]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, gridspec_kw={"width_ratios": [1, 1.2]})
    colours = {"completed": "tab:blue", "stopped_early": "tab:gray", "error": "tab:red"}
    for status, colour in colours.items():
        xs = [float(r["gflops_spent"]) for r in kept if r["status"] == status]
        ys = [float(r[space.metric]) for r in kept if r["status"] == status]
        if xs:
            ax.scatter(xs, ys, c=colour, label=status.replace("_", " "), zorder=3)
    front = pareto_front(pts, space.mode)
    if front:
        fx, fy = zip(*[pts[i] for i in front])
        ax.step(fx, fy, where="post", c="tab:orange", lw=1.5, label="Pareto front", zorder=2)
    if best is not None:
        ax.scatter([float(best["gflops_spent"])], [float(best[space.metric])], s=160, facecolors="none",
                   edgecolors="tab:orange", lw=2, zorder=4, label=f"best: {_label(best)}")
    if space.budget.get("gflops"):
        ax.axvline(space.budget["gflops"], ls="--", c="k", lw=0.8, label="budget")
    ax.set_xlim(0, max([x for x, _ in pts] + [space.budget.get("gflops", 0)]) * 1.08 if pts else None)
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("training GFLOPs spent")
    ax.set_ylabel(space.metric)
    ax.set_title("accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    order = sorted(kept, key=lambda r: float(r[space.metric]), reverse=space.mode == "max")
    labels = [f"{_label(r)} ({float(r['gflops_spent']):.0f} GF)" for r in order]
    values = [float(r[space.metric]) for r in order]
    cols = ["tab:orange" if best is not None and r is best else colours.get(r["status"], "tab:blue") for r in order]
    bars.barh(range(len(order)), values, color=cols)
    bars.set_yticks(range(len(order)), labels, fontsize=7)
    bars.invert_yaxis()
    for i, v in enumerate(values):
        bars.text(v, i, f" {v:.3f}", va="center", fontsize=7)
    bars.set_xlabel(space.metric)
    bars.set_title("every trial (best first)")
    bars.grid(alpha=0.3, axis="x")
    fig.suptitle(f"sweep '{space.name}'" + (f" at {space.budget['gflops']:.0f} training GFLOPs per trial"
                                            if space.budget.get("gflops") else ""))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _write_outputs(rows, space: Space, sweep_dir: str, base_raw, prep, parent: str) -> dict[str, Any]:
    """results.csv, pareto.png and best.yaml: drawn in a local temp folder, logged to MLflow from there, and each
    written whole into the sweep folder (one PUT each on an object store)."""
    import tempfile

    from reclip_ray import tracking

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    best = _best(rows, space)
    out: dict[str, Any] = {"sweep_dir": sweep_dir, "trials": len(rows),
                           "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
                           "errors": sum(r["status"] == "error" for r in rows), "mlflow_parent_run_id": parent}
    with tempfile.TemporaryDirectory(prefix="reclip-sweep-") as tmp:
        with open(os.path.join(tmp, "results.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        _plot(rows, space, best, os.path.join(tmp, "pareto.png"))
        if best is not None:
            params = {k[6:]: v for k, v in best.items() if k.startswith("param:")}
            raw = trial_raw(base_raw, params, space.budget)
            raw["run"]["name"] = f"{space.name}-best"
            raw["run"]["storage_path"] = prep.cfg.run.storage_path  # a string: a Path would mangle s3://
            cfg = from_dict(raw)
            text = (f"# best trial of sweep '{space.name}': {json.dumps(params)} -> "
                    f"{space.metric}={best[space.metric]:.4f}\n")
            with open(os.path.join(tmp, "best.yaml"), "w") as fh:
                fh.write(text + cfg.to_yaml())
            out["best"] = {"params": params, space.metric: best[space.metric], "gflops": best["gflops_spent"]}
            tracking.log_metrics(prep.tracking_uri, parent, {f"best/{space.metric}": float(best[space.metric]),
                                                              "best/gflops": float(best["gflops_spent"])}, step=0)
        for name in ("results.csv", "pareto.png", "best.yaml"):
            local = os.path.join(tmp, name)
            if os.path.exists(local):
                with open(local, "rb") as fh:
                    storage.write_bytes(storage.join(sweep_dir, name), fh.read())
                tracking.log_artifact(prep.tracking_uri, parent, local)
    _print_table(rows, space)
    return out


def _print_table(rows: list[dict[str, Any]], space: Space) -> None:
    params = [k for k in rows[0] if k.startswith("param:")] if rows else []
    head = [p[6:] for p in params] + ["GFLOPs", "/".join(space.metric.split("/")[-2:]), "status"]
    table = [[str(r[p]) for p in params] + [f"{float(r['gflops_spent']):.1f}", f"{float(r[space.metric]):.4f}", r["status"]]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))


def sweep_from_cli(space: str, config: str | None, overrides: list[str]) -> int:
    summary = run_sweep(space, config, overrides)
    print(json.dumps(summary, indent=2, default=str))
    return 0
