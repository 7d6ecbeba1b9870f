"""ASHA on a compute axis: trials are compared at equal training GFLOPs, on one task, and survive failed evaluations.

A RECLIP trial (90% of its budget at 32 px, then 64 px) and a full-resolution baseline (64 px throughout) spend the
same GFLOPs budget at different GFLOPs per step. Their reports are made by the worker's own loop, run from its entry
point (``worker.train_loop_per_worker``): the step loop's GFLOPs accounting and rung check, the phase end with its
checkpoint report and the final report, each through ``_Worker.report`` (which adds ``gflops_total``, ASHA's time)
with only Ray's ``ray.train.report`` replaced (the model, data feed and optimisation step are stubs: see ``Trial``). The evaluation is stubbed at ``evaluate_dataset``, so the real
``worker._evaluate_phase`` picks the resolutions. The reports pass the sweep's Tune filter (``sweep.tune_result``)
into the scheduler the sweep builds (``sweep.make_scheduler``: Ray Tune's ASHAScheduler, driven through its public
``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete``, with the ``training_iteration`` Tune adds to every
result; no Ray cluster, the trials are stand-ins). The tests read ASHA's decisions (STOP / CONTINUE), never its
state.

The stubbed metric grows with the GFLOPs spent and depends on the resolution evaluated: below the full resolution
a model scores ``OWN_RES_FACTOR`` of its full-resolution value, so a RECLIP trial still at 32 px scores under the
baseline at its own resolution and above it at full resolution. ASHA comparing anything but the full-resolution
metric at equal GFLOPs stops the wrong trial.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from reclip_ray.config import apply_overrides, from_dict, load_raw
from reclip_ray.flops import run_flops, train_flops_per_sample
from reclip_ray.schedule import Schedule
from reclip_ray.sweep import asha_axis, asha_metric, load_space, make_scheduler, trial_raw, tune_result

BUDGET = 6000.0
SPACE = f"""
name: axis
base: tiny
params:
  phases.0.image_size: {{grid: [32, 64]}}
  finetune_fraction: {{grid: [0.1, 0.0]}}
metric: eval/full/shape/top1
mode: max
budget: {{gflops: {BUDGET:g}}}
scheduler: {{name: asha, grace_fraction: 0.25, reduction_factor: 2}}
"""
TRIALS = {"reclip": {"phases.0.image_size": 32, "finetune_fraction": 0.1},
          "baseline": {"phases.0.image_size": 64, "finetune_fraction": 0.0}}
SLOPE = {"reclip": 0.8, "baseline": 0.5}  # the stubbed metric per GFLOP: RECLIP learns more for its compute
OWN_RES_FACTOR = 0.375  # the RECLIP trial at 32 px: 0.3 per GFLOP, below the baseline's 0.5


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "axis.yaml"
    path.write_text(SPACE)
    return load_space(path)


def _configs(space):
    base = apply_overrides(load_raw(space.base), space.overrides)
    return {name: from_dict(trial_raw(base, params, space.budget)) for name, params in TRIALS.items()}


def step_gflops(cfg) -> list[float]:
    """GFLOPs of one full step of each phase (what the worker adds to gflops_total per step)."""
    return [train_flops_per_sample(cfg.model, p.image_size, p.text_length, p.batch_size) / 1e9 * p.batch_size
            for p in Schedule.from_config(cfg).phases]


class _Feed:
    """A phase's data feed as the step loop uses it, without rows (the step itself is stubbed)."""

    recorded = available = bad = 0
    example = None

    def take(self, n: int) -> dict[str, np.ndarray]:
        return {"image": np.zeros((n, 1, 1, 3), np.uint8), "tokens": np.zeros((n, 1), np.int64)}

    def absent_in_flight(self) -> int:
        return 0


class Trial:
    """One trial's worker (rank 0 of one), run by the worker's entry point, and everything it reported.

    ``worker.train_loop_per_worker`` runs its real loop: the phases' step loops with their GFLOPs accounting and
    rung checks, the phase ends, the final report, each report through ``_Worker.report``. Stubbed: the state a
    ``_Worker`` builds (model, Ray context), the data feed, the optimisation step, checkpoint writing, MLflow, the
    export, and ``evaluate_dataset``, which records each evaluation as (milestone or phase, image size, text length).
    """

    def __init__(self, name: str, cfg, milestones: list[float], monkeypatch, *, eval_set: str = "stub",
                 fail: set = frozenset(), slope: float | None = None) -> None:
        """``fail``: the evaluations that raise, as compute-milestone GFLOPs or phase names."""
        import ray.train

        from reclip_ray import evaluate, tracking
        from reclip_ray.train import step, worker
        from reclip_ray.train.checkpoint import TrainState

        self.name, self.reports, self.asked = name, [], []
        slope = SLOPE[name] if slope is None else slope
        cfg.eval.at_gflops = list(milestones)
        cfg.data.eval = eval_set
        self.cfg = cfg
        state = TrainState(mlflow_run_id="run")
        full_size = cfg.phases[-1].image_size

        def evaluate_dataset(model, tokenizer, path, *, image_size, text_length, **_):
            at = cfg.phases[state.phase].name if state.phase_done else max(m for m in milestones if m <= state.gflops)
            self.asked.append((at, image_size, text_length))
            if at in fail:
                raise RuntimeError(f"no readable rows in {path}")
            factor = 1.0 if image_size >= full_size else OWN_RES_FACTOR
            return {"shape/top1": factor * slope * state.gflops / BUDGET}

        monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
        monkeypatch.setattr(evaluate, "eval_columns", lambda *a: None)
        monkeypatch.setattr(tracking, "log_metrics", lambda *a, **k: None)
        monkeypatch.setattr(tracking, "set_tags", lambda *a, **k: None)
        monkeypatch.setattr(worker, "save_checkpoint", lambda *a, **k: None)
        monkeypatch.setattr(worker, "_settle_data", lambda w: None)  # the data feed's bookkeeping: not under test
        monkeypatch.setattr(worker, "_open_feed", lambda w, plan, local_batch: _Feed())
        monkeypatch.setattr(step, "train_step", lambda *a, **k: {"loss": 1.0, "logit_scale": 1.0})
        monkeypatch.setattr(worker, "_export", lambda *a, **k: None)
        monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, **k: self.reports.append(metrics))
        attrs = dict(cfg=cfg, state=state, rank=0, world=1, gflops_reported=0.0, model=None, ddp_model=None,
                     optimizer=None, tokenizer=None, device="cpu", autocast=None, local_loss=False,
                     schedule=Schedule.from_config(cfg), board=None, missing_actor=None, tracking_uri="", run_id="run",
                     run_dir="", already_logged=-1, fault_marker="", final_loss=1.0, eval_error="not evaluated yet")

        class StandIn(worker._Worker):
            """The worker with what its ``__init__`` builds for rank 0 of one, minus the model and Ray's context."""

            def __init__(self, loop_config: dict) -> None:
                self.__dict__.update(attrs, loop_config=loop_config)

        monkeypatch.setattr(worker, "_Worker", StandIn)
        worker.train_loop_per_worker({"run_dir": "", "config_yaml": ""})

    def to_tune(self, metrics: list[str]) -> list[dict]:
        """What the sweep's Tune callback forwards."""
        return [r for r in (tune_result(r, metrics) for r in self.reports) if r is not None]


def run_asha(space, trials: dict[str, Trial], order: list[str]) -> dict[str, dict]:
    """Feed the trials (each run to its end or its STOP, in ``order``, as with max_concurrent_trials: 1) to the
    sweep's scheduler through its public API; return the result each stopped trial was stopped at."""
    from ray.tune.schedulers import TrialScheduler

    axis = asha_axis(space, [run_flops(t.cfg)["total_train_gflops"] for t in trials.values()])
    scheduler = make_scheduler(space, axis)
    stand_ins = {name: SimpleNamespace(trial_id=name) for name in trials}
    for t in stand_ins.values():
        scheduler.on_trial_add(None, t)
    stops: dict[str, dict] = {}
    for name in order:
        results = [{**r, "training_iteration": i + 1} for i, r in enumerate(trials[name].to_tune([asha_metric(space)]))]
        for result in results:
            if scheduler.on_trial_result(None, stand_ins[name], result) == TrialScheduler.STOP:
                stops[name] = result
                break
        else:
            scheduler.on_trial_complete(None, stand_ins[name], results[-1])
    return stops


def test_asha_compares_a_reclip_and_a_baseline_trial_at_equal_gflops_at_full_resolution(space, monkeypatch):
    configs = _configs(space)
    assert [(p.image_size, p.text_length) for p in configs["reclip"].phases] == [(32, 16), (64, 32)]
    assert [p.image_size for p in configs["baseline"].phases] == [64]
    axis = asha_axis(space, [run_flops(c)["total_train_gflops"] for c in configs.values()])
    assert axis["milestones"] == [1500.0, 3000.0, 6000.0]  # 1/4, 1/2 and all of the budget
    trials = {name: Trial(name, cfg, axis["milestones"], monkeypatch) for name, cfg in configs.items()}
    main = {name: step_gflops(cfg)[0] for name, cfg in configs.items()}
    assert main["baseline"] > 2 * main["reclip"]  # different GFLOPs per step: the point of the test
    step = {name: max(step_gflops(cfg)) for name, cfg in configs.items()}

    # One task at every rung: the RECLIP trial, still at 32 px, is evaluated as its final metric is (64 px, the
    # finetune's 32 tokens); its phase end also evaluates at its own resolution (logged, not compared).
    reclip = trials["reclip"]
    assert [a for a in reclip.asked if a[0] in axis["milestones"]] == [(1500.0, 64, 32), (3000.0, 64, 32)]
    assert [a for a in reclip.asked if a[0] == "lowres"] == [("lowres", 32, 16), ("lowres", 64, 32)]
    metric = asha_metric(space)
    assert metric == space.metric == "eval/full/shape/top1"
    for t in trials.values():
        rungs = [r for r in t.to_tune([metric]) if "compute_round" in r]
        assert [r["compute_milestone"] for r in rungs] == [1500.0, 3000.0]  # 6000: the budget is never exceeded
        for r in rungs:
            assert r["compute_milestone"] <= r["gflops_total"] < r["compute_milestone"] + step[t.name]
            assert r[metric] == r["eval/64px/shape/top1"] and "eval/32px/shape/top1" not in r

    # Phase ends (the old time axis) fall at very different compute: after the RECLIP main phase, the baseline has
    # already finished its whole budget.
    first_end = {n: next(r["gflops_total"] for r in t.reports if r.get("eval_round") == 1) for n, t in trials.items()}
    assert first_end["baseline"] - first_end["reclip"] > 0.1 * BUDGET

    # RECLIP first: the baseline is compared with it at 1500 GFLOPs (within one of its steps) and stopped there,
    # long before its first phase end.
    stops = run_asha(space, trials, ["reclip", "baseline"])
    assert set(stops) == {"baseline"}
    stop = stops["baseline"]
    assert 1500.0 <= stop["gflops_total"] < 1500.0 + step["baseline"]
    assert stop["compute_round"] == 1 and stop["eval_round"] == 0  # a milestone report, mid-phase
    # Baseline first: the RECLIP trial, better at equal compute, survives both rungs. Had ASHA recorded the
    # baseline after 1.6x a rung's GFLOPs (0.5 x 1.6 = 0.8 per GFLOP: its phase end at 6000, say), it would not.
    assert run_asha(space, trials, ["baseline", "reclip"]) == {}


@pytest.mark.parametrize("case", ["fails", "at_phase_end_false", "no_eval_set"])
def test_every_report_tune_sees_carries_the_metric_when_an_evaluation_fails_or_does_not_run(space, monkeypatch,
                                                                                             case):
    """Tune fails the whole sweep on a result without its metric (its strict metric check): a trial whose
    evaluation failed or did not run reports the metric as NaN, with the reason, and trains on."""
    cfg = _configs(space)["reclip"]
    milestones = asha_axis(space, [BUDGET])["milestones"]
    if case == "at_phase_end_false":
        cfg.eval.at_phase_end = False
    trial = Trial("reclip", cfg, milestones, monkeypatch, eval_set="" if case == "no_eval_set" else "stub",
                  fail={1500.0, "finetune"} if case == "fails" else set())
    checked = sorted({asha_metric(space), space.metric, "loss"})
    results = trial.to_tune(checked)
    assert len(results) == len(milestones) - 1 + len(cfg.phases) + 1  # rungs, phase ends, the final report
    dropped = [r for r in trial.reports if tune_result(r, checked) is None]
    assert len(dropped) + len(results) == len(trial.reports) and len(dropped) >= len(cfg.phases)
    assert not any("eval_round" in r or "compute_round" in r for r in dropped)  # checkpoint reports only
    assert all(m in r for r in results for m in checked)
    measured = [r for r in results if not math.isnan(r[space.metric])]
    unmeasured = [r for r in results if math.isnan(r[space.metric])]
    assert all(r["eval_error"] for r in unmeasured) and not any("eval_error" in r for r in measured)
    final = results[-1]
    assert final["done"] == 1 and final["samples"] == cfg.train.samples  # it trained to its end
    reason = {"fails": "evaluation after 'finetune' failed: RuntimeError: no readable rows in stub",
              "at_phase_end_false": "no evaluation: eval.at_phase_end is false",
              "no_eval_set": "no evaluation: data.eval is empty"}[case]
    assert final["eval_error"] == reason and math.isnan(final[space.metric])
    if case == "fails":  # the other evaluations worked: the 3000 GFLOPs rung, the main phase's end
        assert [r.get("compute_milestone") for r in unmeasured] == [1500.0, None, None]
        assert unmeasured[0]["eval_error"].startswith("evaluation at 1,500 GFLOPs failed: RuntimeError")
        assert [r.get("compute_milestone") for r in measured] == [3000.0, None]
    elif case == "at_phase_end_false":  # the rungs still evaluate: ASHA can compare the trial
        assert [r.get("compute_milestone") for r in measured] == [1500.0, 3000.0]
    else:
        assert not measured
    # Without ASHA, Tune checks the sweep's metric: the same reports carry it.
    assert all(space.metric in r for r in trial.to_tune([space.metric]))


def test_a_trial_whose_rung_evaluation_failed_is_not_compared_there_and_does_not_shift_the_cutoff(space, monkeypatch):
    configs = _configs(space)
    milestones = asha_axis(space, [BUDGET])["milestones"]
    trials = {"good": Trial("reclip", configs["reclip"], milestones, monkeypatch, slope=0.8),
              "failed": Trial("reclip", configs["reclip"], milestones, monkeypatch, slope=0.1, fail={1500.0}),
              "worse": Trial("baseline", configs["baseline"], milestones, monkeypatch, slope=0.5)}
    # The failed trial would be stopped at 1500 GFLOPs on its metric (0.1 < 0.8 per GFLOP) had it one; NaN is not
    # compared. The next trial is compared with the measured trial alone (nanpercentile): 0.5 < 0.8, stopped.
    stops = run_asha(space, trials, ["good", "failed", "worse"])
    assert set(stops) == {"worse", "failed"}
    assert stops["worse"]["compute_round"] == 1
    assert stops["failed"]["compute_round"] == 2  # measured again at 3000 GFLOPs, and behind there


def test_scheduler_keys_are_checked(tmp_path):
    from reclip_ray.config import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text(SPACE.replace("grace_fraction: 0.25", "grace_period: 1"))
    with pytest.raises(ConfigError, match="grace_period .* is gone.*grace_fraction"):
        load_space(path)
    path.write_text(SPACE.replace("grace_fraction: 0.25", "grace_fraction: 2"))
    with pytest.raises(ConfigError, match="grace_fraction must be in"):
        load_space(path)
    path.write_text(SPACE.replace("grace_fraction: 0.25", "metric: eval/current/shape/top1"))
    with pytest.raises(ConfigError, match="scheduler.metric 'eval/current/shape/top1'.*full resolution.*"
                                          "use eval/full/shape/top1"):
        load_space(path)
    path.write_text(SPACE.replace("metric: eval/full/shape/top1", "metric: eval/32px/shape/top1"))
    with pytest.raises(ConfigError, match="metric 'eval/32px/shape/top1'"):
        load_space(path)
    path.write_text(SPACE.replace("grace_fraction: 0.25", "grace_gflops: 600, metric: loss"))
    space = load_space(path)
    assert asha_metric(space) == "loss"
    assert asha_axis(space, [BUDGET])["milestones"] == [600.0, 1200.0, 2400.0, 4800.0]


def test_a_trial_stopped_at_a_compute_milestone_is_stopped_early(space):
    """ASHA can now stop a trial mid-phase, before its first phase end (eval_round 0 = phases finished)."""
    from reclip_ray.sweep import _rows

    def result(metrics, error=None):
        return SimpleNamespace(metrics=metrics, config={"phases/0/image_size": 32}, error=error)

    grid = [result({"eval_round": 0, "eval_rounds_planned": 2, "compute_round": 1, "gflops_total": 1510.0}),
            result({"eval_round": 1, "eval_rounds_planned": 2, "gflops_total": 4400.0}),
            result({"eval_round": 2, "eval_rounds_planned": 2, "gflops_total": 5999.0, "done": 1,
                    "eval_error": "evaluation after 'finetune' failed: X"}),
            result({}, error=RuntimeError("(pid=1) ray::ImplicitFunc.train()\n  File x\nValueError: boom"))]
    rows = _rows(grid, space, 2)
    assert [r["status"] for r in rows] == ["stopped_early", "stopped_early", "completed", "error"]
    assert [r["eval_error"] for r in rows] == ["", "", "evaluation after 'finetune' failed: X", ""]
    assert rows[3]["error"] == "ValueError: boom"  # the line that says what failed, not Ray's actor banner
