"""ASHA on a compute axis: trials are compared at equal training GFLOPs, not at phase ends.

A RECLIP trial (90% of its budget at 32 px, then 64 px) and a full-resolution baseline (64 px throughout) spend the
same GFLOPs budget at different GFLOPs per step. Their report streams are made by the worker's own milestone code
(``worker._compute_milestone``, with the evaluation stubbed) plus the phase-end and final reports, filtered as the
sweep's Tune callback filters them (``sweep.forward_to_tune``), and fed to the scheduler the sweep builds
(``sweep.make_scheduler``: Ray Tune's ASHAScheduler; no Ray cluster, the trials are lightweight stand-ins). The
test reads which result ASHA recorded at each rung from the scheduler's bracket (a private attribute of Ray's
ASHA, ``_trial_info[trial_id]._rungs``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reclip_ray.config import apply_overrides, from_dict, load_raw
from reclip_ray.flops import run_flops, train_flops_per_sample
from reclip_ray.schedule import Schedule
from reclip_ray.sweep import asha_axis, asha_metric, forward_to_tune, load_space, make_scheduler, trial_raw

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


def quality(name: str, gflops: float) -> float:
    """The stubbed eval metric: the RECLIP trial learns more per GFLOP (what the sweep should find)."""
    return (0.8 if name == "reclip" else 0.5) * gflops / BUDGET


def report_stream(name: str, cfg, milestones: list[float], monkeypatch) -> list[dict]:
    """What rank 0 of a trial reports, in order: the worker's milestone reports, the mid-phase checkpoint reports
    (no metric), the phase-end reports and the final report, each with ``gflops_total`` as ``_Worker.report`` adds."""
    from reclip_ray import tracking
    from reclip_ray.train import worker

    reports: list[dict] = []
    state = SimpleNamespace(gflops=0.0, samples=0, step=0)

    def report(metrics, save):
        reports.append({**metrics, "gflops_total": state.gflops, "samples": state.samples})

    def fake_eval(cfg_, model, tok, plan, schedule, device, rank, world, with_full=True):
        assert not with_full  # a milestone evaluates at the phase's resolution only
        return {f"eval/{plan.image_size}px/shape/top1": quality(name, state.gflops)}

    monkeypatch.setattr(worker, "_evaluate_phase", fake_eval)
    monkeypatch.setattr(tracking, "log_metrics", lambda *a, **k: None)
    cfg.eval.at_gflops = list(milestones)
    cfg.data.eval = "stub"
    w = SimpleNamespace(cfg=cfg, state=state, rank=0, world=1, gflops_reported=0.0, report=report, model=None,
                        tokenizer=None, device="cpu", schedule=Schedule.from_config(cfg), say=print,
                        tracking_uri="", run_id="")
    n = len(w.schedule.phases)
    for plan in w.schedule.phases:
        per_sample = train_flops_per_sample(cfg.model, plan.image_size, plan.text_length, plan.batch_size) / 1e9
        while state.samples < plan.end_sample:  # the step loop of worker._run_phase, without the training
            step = plan.batch_at(state.samples)
            state.samples += step
            state.step += 1
            state.gflops += per_sample * step
            if state.step % 7 == 0:
                report({"loss": 1.0}, True)  # a mid-phase checkpoint report: no metric, never reaches Tune
            worker._compute_milestone(w, plan, {"loss": 1.0})
        value = quality(name, state.gflops)
        report({"loss": 1.0, f"eval/{plan.image_size}px/shape/top1": value, "eval/current/shape/top1": value,
                "eval_round": plan.index + 1, "eval_rounds_planned": n}, False)
    report({"done": 1, "eval/current/shape/top1": quality(name, state.gflops), "eval_round": n,
            "eval_rounds_planned": n}, False)
    return reports


def run_asha(space, streams: dict[str, list[dict]], order: list[str]):
    """Feed the streams (each trial run to completion, in ``order``, as with max_concurrent_trials: 1) to the
    sweep's scheduler; return {trial: {milestone: gflops of the result recorded there}} and the STOP decisions."""
    from ray.tune.schedulers import TrialScheduler

    configs = _configs(space)
    axis = asha_axis(space, [run_flops(c)["total_train_gflops"] for c in configs.values()])
    scheduler = make_scheduler(space, axis)
    metric = asha_metric(space)
    trials = {name: SimpleNamespace(trial_id=name) for name in streams}
    for t in trials.values():
        scheduler.on_trial_add(None, t)
    recorded: dict[str, dict[float, float]] = {name: {} for name in streams}
    stops: dict[str, dict] = {}
    for name in order:
        rungs = scheduler._trial_info[name]._rungs
        for result in streams[name]:
            if not forward_to_tune(result, metric):
                continue
            before = {m for m, rec in rungs if name in rec}
            decision = scheduler.on_trial_result(None, trials[name], result)
            for m, rec in rungs:
                if name in rec and m not in before:
                    recorded[name][m] = result["gflops_total"]
            if decision == TrialScheduler.STOP:
                stops[name] = result
                break
    return axis, scheduler, recorded, stops


def test_asha_compares_a_reclip_and_a_baseline_trial_at_equal_gflops(space, monkeypatch):
    configs = _configs(space)
    assert [p.image_size for p in configs["reclip"].phases] == [32, 64]
    assert [p.image_size for p in configs["baseline"].phases] == [64]
    axis = asha_axis(space, [run_flops(c)["total_train_gflops"] for c in configs.values()])
    assert axis["milestones"] == [1500.0, 3000.0, 6000.0]  # 1/4, 1/2 and all of the budget
    streams = {name: report_stream(name, cfg, axis["milestones"], monkeypatch) for name, cfg in configs.items()}
    main = {name: step_gflops(cfg)[0] for name, cfg in configs.items()}
    assert main["baseline"] > 2 * main["reclip"]  # different GFLOPs per step: the point of the test
    step = {name: max(step_gflops(cfg)) for name, cfg in configs.items()}

    # Phase ends (the old time axis) fall at very different compute: after the RECLIP main phase, the baseline has
    # already finished its whole budget.
    first_end = {n: next(r["gflops_total"] for r in s if r.get("eval_round") == 1) for n, s in streams.items()}
    assert first_end["baseline"] - first_end["reclip"] > 0.1 * BUDGET

    # Baseline first: it is recorded at 1500 and 3000 GFLOPs; the RECLIP trial is compared there and survives.
    _, scheduler, recorded, stops = run_asha(space, streams, ["baseline", "reclip"])
    assert sorted(m for m, _ in scheduler._trial_info["reclip"]._rungs) == axis["milestones"]  # same rungs
    assert not stops
    for name in ("baseline", "reclip"):
        assert set(recorded[name]) == {1500.0, 3000.0}
        for milestone, gflops in recorded[name].items():
            assert milestone <= gflops < milestone + step[name], (name, milestone, gflops)

    # RECLIP first: the baseline is compared with it at 1500 GFLOPs (within one of its steps) and stopped there,
    # long before its first phase end.
    _, _, recorded, stops = run_asha(space, streams, ["reclip", "baseline"])
    assert set(stops) == {"baseline"}
    stop = stops["baseline"]
    assert 1500.0 <= stop["gflops_total"] < 1500.0 + step["baseline"]
    assert stop["compute_round"] == 1 and stop["eval_round"] == 0  # a milestone report, mid-phase
    assert abs(recorded["reclip"][1500.0] - recorded["baseline"][1500.0]) < max(step.values())


def test_milestone_reports_carry_the_compared_metric_and_checkpoint_reports_do_not_reach_tune(space, monkeypatch):
    cfg = _configs(space)["reclip"]
    milestones = asha_axis(space, [BUDGET])["milestones"]
    stream = report_stream("reclip", cfg, milestones, monkeypatch)
    metric = asha_metric(space)
    assert metric == "eval/current/shape/top1"
    crossed = [r for r in stream if "compute_round" in r]
    assert [r["compute_milestone"] for r in crossed] == [1500.0, 3000.0]  # 6000: the budget is never exceeded
    assert all(metric in r and r["eval/32px/shape/top1"] == r[metric] for r in crossed)  # both in the main phase
    forwarded = [r for r in stream if forward_to_tune(r, metric)]
    assert all(metric in r for r in forwarded)  # Tune's strict metric check would fail a trial otherwise
    assert len(forwarded) == len(crossed) + len(cfg.phases) + 1
    assert not forward_to_tune({"loss": 1.0, "compute_round": 1}, metric)  # a milestone whose evaluation failed


def test_scheduler_keys_are_checked(tmp_path):
    from reclip_ray.config import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text(SPACE.replace("grace_fraction: 0.25", "grace_period: 1"))
    with pytest.raises(ConfigError, match="grace_period .* is gone.*grace_fraction"):
        load_space(path)
    path.write_text(SPACE.replace("grace_fraction: 0.25", "grace_fraction: 2"))
    with pytest.raises(ConfigError, match="grace_fraction must be in"):
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
            result({"eval_round": 2, "eval_rounds_planned": 2, "gflops_total": 5999.0, "done": 1}),
            result({}, error=RuntimeError("boom"))]
    assert [r["status"] for r in _rows(grid, space, 2)] == ["stopped_early", "stopped_early", "completed", "error"]
