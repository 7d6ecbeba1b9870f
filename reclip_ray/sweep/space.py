"""A search space: the YAML file (``tune_spaces/*.yaml``) read and checked, and its domains in Ray Tune's terms.

Every mistake in the file is a one-line ``ConfigError`` naming the key, found before Ray starts.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reclip_ray.config import TRIAL_SUFFIX_BYTES, ConfigError, check_run_name
from reclip_ray.run_names import FULL

FINETUNE_FRACTION = "finetune_fraction"  # a parameter that is no config key: the last phase's share of the budget
SPACE_KEYS = {"name", "base", "set", "params", "metric", "mode", "budget", "scheduler", "num_samples",
              "max_concurrent_trials", "resources_per_trial_cpu"}
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
# ASHA on a compute axis (see asha.asha_axis): rungs at grace, grace * rf, ... GFLOPs, grace = grace_fraction x the
# largest trial's GFLOPs unless grace_gflops is given; metric: what ASHA compares (default: see asha.asha_metric).
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
    raw = _read(p)
    base = str(raw.get("base", "tiny"))
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base = str((p.parent / base).resolve())
    params = _check_params(p, raw.get("params") or {})
    budget = _check_budget(p, raw.get("budget") or {})
    _check_metric(p, "metric", raw.get("metric"))
    _check_metric(p, "scheduler.metric", (raw.get("scheduler") or {}).get("metric"))
    # Unset, the metric's own direction: the default max on a loss made the worst trial the best (and best.yaml)
    mode = raw.get("mode", "min" if str(raw.get("metric")) == "loss" else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{p}: mode must be max or min, got {mode!r}")
    if mode == "max" and str(raw.get("metric")) == "loss":  # the trial that learned nothing would rank best
        raise ConfigError(f"{p}: mode max with metric loss ranks the trial that learned least best: use mode: min "
                          "(the default for loss)")
    scheduler = _check_scheduler(p, raw.get("scheduler") or {})
    name = str(raw.get("name") or p.stem)
    check_run_name(name, f"{p}: name", TRIAL_SUFFIX_BYTES)  # the sweep folder's name, and its trials' prefix
    return Space(
        name=name,
        base=base,
        overrides=[str(s) for s in raw.get("set") or []],
        params=params,
        metric=str(raw.get("metric", "eval/full/shape/top1")),
        mode=mode,
        budget={k: float(v) for k, v in budget.items()},
        scheduler=scheduler,
        num_samples=_check_num_samples(p, raw.get("num_samples", 1)),
        max_concurrent_trials=int(raw.get("max_concurrent_trials", 1)),
        resources_per_trial_cpu=float(raw.get("resources_per_trial_cpu", 0.1)),
    )


def _read(p: Path) -> dict[str, Any]:
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
    return raw


def _check_params(p: Path, params: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{p}: 'params' must map config paths to domains like {{grid: [32, 64]}}")
    for key, dom in params.items():
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
            raise ConfigError(f"{p}: params.{key} must be one of {{{' | '.join(d + ': ...' for d in DOMAINS)}}}")
        kind, value = next(iter(dom.items()))
        if kind in ("grid", "choice") and (not isinstance(value, list) or not value):
            raise ConfigError(f"{p}: params.{key}.{kind} must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and (not isinstance(value, list) or len(value) != 2
                                                             or not all(_is_number(v) for v in value)):
            raise ConfigError(f"{p}: params.{key}.{kind} must be [low, high], two numbers")
    return params


def _is_number(value: Any) -> bool:
    """A number, or one as PyYAML hands ``1e-3`` over (a string)."""
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _check_num_samples(p: Path, value: Any) -> int:
    """Tune's ``num_samples``: how many times the grid runs (each time with new draws of the other domains). Tune
    takes -1 as forever and 0 as no trial, and ``int`` made 2.5 two."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise ConfigError(f"{p}: num_samples must be a whole number >= 1 (how many times the grid runs), got {value!r}")
    return int(value)


def _check_budget(p: Path, budget: Any) -> dict[str, Any]:
    if budget and (not isinstance(budget, dict) or set(budget) - {"gflops", "samples"} or len(budget) != 1):
        raise ConfigError(f"{p}: budget must be {{gflops: N}} or {{samples: N}}")
    return budget


def _check_metric(path: Path, where: str, metric: Any) -> None:
    """An evaluation metric must be one every trial reports at every rung and at its end: ``eval/full/...``."""
    if metric is None or not str(metric).startswith("eval/") or str(metric).startswith(FULL):
        return
    raise ConfigError(f"{path}: {where} {metric!r}: a sweep compares evaluations at full resolution only "
                      f"(every trial's final metric, and what ASHA compares at its rungs): use "
                      f"{FULL}{str(metric).split('/', 2)[-1]}")


def _check_scheduler(p: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The scheduler section over its defaults; the GFLOPs keys are ASHA's time axis (``asha.asha_axis``)."""
    scheduler = {**SCHEDULER_DEFAULTS, **given}
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
    return scheduler


CORNERS = 64  # combinations checked before Ray starts (~5 ms each, tiny preset); past them, one set per value


def grid_corners(space: Space) -> list[dict[str, Any]]:
    """Concrete parameter sets covering each domain's extremes (for the up-front config check): the first
    ``CORNERS`` combinations, then, where there are more, every value of every parameter at least once (the i-th
    set takes each parameter's i-th value, wrapping). The first combinations alone all hold the first parameter's
    first values once there are more than ``CORNERS`` of them, and its other values would fail every trial late."""
    options = {key: _corner_values(dom) for key, dom in space.params.items()}
    combos = [dict(zip(options, values)) for values in itertools.islice(itertools.product(*options.values()), CORNERS)]
    if len(combos) == math.prod(len(o) for o in options.values()):
        return combos
    longest = max(len(o) for o in options.values())
    return combos + [{key: o[i % len(o)] for key, o in options.items()} for i in range(longest)]


def _corner_values(dom: dict[str, Any]) -> list[Any]:
    """The values of a domain to check: a list's all; a range's ends as Tune draws them. ``randint`` never draws
    its high end (Tune's is exclusive); ``uniform`` and ``loguniform`` draw floats, so a point inside that is no
    integer is checked too: on an integer key (``phases.0.image_size``) every trial's config would be refused."""
    kind, value = next(iter(dom.items()))
    if kind in ("grid", "choice"):
        return list(value)
    if kind == "randint":
        low, high = int(float(value[0])), int(float(value[1]))
        return [low, max(low, high - 1)]
    low, high = float(value[0]), float(value[1])
    inside = math.sqrt(low * high) if kind == "loguniform" and low > 0 < high else (low + high) / 2
    inside += 0.5 if inside.is_integer() and inside + 0.5 < high else 0.0
    return [low, high, inside]


# ------------------------------------------------------------------------------------------ in Tune's terms


def tune_param_space(space: Space, setup: dict[str, Any], legacy: bool = False) -> dict[str, Any]:
    """Tune's ``param_space``: each parameter's domain under a flat key, and ``_setup``, what every trial shares
    (``trainable.trial_setup``).

    The key is the parameter's place in the space file, then its path (``p01_phases/0/image_size``), because Tune
    expands a grid in the sorted order of its keys, the first varying fastest: with the place first, the grid runs
    in the file's order. Under ``max_concurrent_trials`` that order decides which trials run side by side and meet
    first at an ASHA rung, so it must be the one the user wrote, not the alphabet's.

    ``_setup`` is one JSON string: ``Tuner.restore`` refuses a param_space whose flattened keys differ from the
    original's, and as a nested dict every config key in ``base_raw`` was such a key, so a sweep started before a
    new config key existed could not resume after it. ``legacy``: the format of sweeps started before 2026-12-05
    (bare paths, ``_setup`` a dict), for ``run.restore_tuner``."""
    def key(i: int, path: str) -> str:
        return ("" if legacy else f"p{i:02d}_") + path.replace(".", "/")

    return {**{key(i, k): _tune_domain(v) for i, (k, v) in enumerate(space.params.items())},
            "_setup": setup if legacy else json.dumps(setup)}


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters from its Tune config: dotted config paths again, without ``_setup`` (and without the
    place prefix, which a sweep started before it existed does not have)."""
    return {_PLACE.sub("", k).replace("/", "."): v for k, v in config.items() if k != "_setup"}


def trial_setup_of(config: dict[str, Any]) -> dict[str, Any]:
    """What every trial shares, from a trial's Tune config (a JSON string; a dict in sweeps started before)."""
    setup = config["_setup"]
    return json.loads(setup) if isinstance(setup, str) else setup


_PLACE = re.compile(r"^p\d{2}_")


def _tune_domain(spec: dict[str, Any]):
    from ray import tune

    kind, value = next(iter(spec.items()))
    return {
        "grid": lambda: tune.grid_search(list(value)),
        "choice": lambda: tune.choice(list(value)),
        "uniform": lambda: tune.uniform(float(value[0]), float(value[1])),
        "loguniform": lambda: tune.loguniform(float(value[0]), float(value[1])),
        "randint": lambda: tune.randint(int(float(value[0])), int(float(value[1]))),
    }[kind]()
