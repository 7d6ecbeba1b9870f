"""ASHA on a compute axis: trials are compared at equal training GFLOPs, on one task, and survive failed evaluations.

A RECLIP trial (90% of its budget at 32 px, then 64 px) and a full-resolution baseline (64 px throughout) spend the
same GFLOPs budget at different GFLOPs per step. Each trial is the worker's own loop, run from its entry point
(``worker.train_loop_per_worker``, one rank): ``Worker`` builds its tiny model, walks the phases' step loops with
their GFLOPs accounting and rung checks (``Worker.compute_milestone``), ends each phase (checkpoint, evaluation,
report) and makes the final report, each report through ``Worker.report`` (which adds ``gflops_total``, ASHA's time).
Stand-ins sit at the edges only (see ``Trial``): Ray Train's context and ``report``, MLflow, the data feed (which
counts the rows each phase trains: the reference for the GFLOPs spent), the optimisation step, the export, and
``evaluate_dataset``, so the real ``phase_eval.evaluate_phase`` picks the resolutions. The reports pass the sweep's
Tune filter (``sweep.tune_result``) into the scheduler the sweep builds (``sweep.make_scheduler``: Ray Tune's
ASHAScheduler, driven through its public ``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete``, with the
``training_iteration`` Tune adds to every result; no Ray cluster, the trials are stand-ins). The tests read ASHA's
decisions (STOP / CONTINUE), never its state.

The stubbed metric grows with the GFLOPs the trial trained (counted from the rows the feed served, not from the
worker's own count) and depends on the resolution evaluated: below the full resolution a model scores
``OWN_RES_FACTOR`` of its full-resolution value, so a RECLIP trial still at 32 px scores under the baseline at its
own resolution and above it at full resolution. ASHA comparing anything but the full-resolution metric at equal
GFLOPs stops the wrong trial.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reclip_ray.config import apply_overrides, from_dict, load_raw
from reclip_ray.flops import run_flops, train_flops_per_sample
from reclip_ray.schedule import Schedule
from reclip_ray.sweep import asha_axis, asha_metric, load_space, make_scheduler, trial_raw, tune_result
from reclip_ray.train.run_state import final_eval

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
WORDS = ["<pad>", "<start_of_text>", "<end_of_text>", "<unk>", "red", "star"]  # the model's tokenizer: ids only


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "axis.yaml"
    path.write_text(SPACE)
    return load_space(path)


def _configs(space):
    base = apply_overrides(load_raw(space.base), space.overrides)
    return {name: from_dict(trial_raw(base, params, space.budget)) for name, params in TRIALS.items()}


def sample_gflops(cfg) -> list[float]:
    """GFLOPs of one trained sample of each phase, from its image size, text length and global batch."""
    return [train_flops_per_sample(cfg.model, p.image_size, p.text_length, p.batch_size) / 1e9
            for p in Schedule.from_config(cfg).phases]


def step_gflops(cfg) -> list[float]:
    """GFLOPs of one full step of each phase (what the worker adds to gflops_total per step)."""
    return [g * p.batch_size for g, p in zip(sample_gflops(cfg), Schedule.from_config(cfg).phases)]


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")).to_str()


class _Feed:
    """A phase's data feed as the step loop takes from it (``rank_data.open_feed``), with rows of no content (the
    optimisation step is a stand-in); it counts the rows each phase served."""

    recorded = available = bad = 0
    example = ""

    def __init__(self, phase: int, served: Counter) -> None:
        self.phase, self.served = phase, served

    def take(self, n: int) -> dict[str, np.ndarray]:
        self.served[self.phase] += n
        return {"image": np.zeros((n, 1, 1, 3), np.uint8), "tokens": np.zeros((n, 1), np.int64)}

    def absent_in_flight(self) -> int:
        return 0

    def close(self) -> None:  # the phase end's (PhaseFeed.close): nothing to stop here
        pass


class Trial:
    """One trial: the worker's loop run by its entry point (rank 0 of one), and everything it reported.

    Real: ``worker.train_loop_per_worker`` and ``Worker`` (its tiny model, schedule, step loop with the GFLOPs
    accounting, rung checks, phase ends with their checkpoints, final report), ``phase_eval``. Stand-ins: Ray
    Train's context (rank 0 of 1 on the CPU, no checkpoint to restore) and ``ray.train.report`` (records each
    report and the GFLOPs trained by then, ``spent``), MLflow, the data feed (``_Feed``) and its bookkeeping at
    checkpoints, the optimisation step, the export, and ``evaluate_dataset``, which records each evaluation as
    (compute milestone or phase name, image size, text length) in ``asked``.
    """

    def __init__(self, name: str, cfg, milestones: list[float], monkeypatch, *, eval_set: str = "stub",
                 fail: set = frozenset(), slope: float | None = None, run_dir: str | None = None,
                 restore: str | None = None, in_mlflow: dict | None = None, step=None) -> None:
        """``fail``: the evaluations that raise, as compute-milestone GFLOPs or phase names. ``run_dir``: the run
        folder, where the export is real (the model and eval.json; MLflow's copies are stand-ins) and each reported
        checkpoint is kept (``checkpoints``); without it, a temporary folder and a stand-in export. ``restore``: a
        checkpoint folder this attempt resumes from (a restart). ``in_mlflow``: what MLflow's ``latest_metric``
        answers, by key (else None); the metrics the worker logs are kept in ``logged``, as (step, metrics).
        ``step``: the optimisation step's stand-in (else one returning a loss and a logit scale of 1.0)."""
        import ray
        import ray.train
        import ray.train.torch

        from reclip_ray import tracking, tracking_relay
        from reclip_ray.evaluation import dataset as eval_dataset
        from reclip_ray.evaluation import eval_set as eval_set_module
        from reclip_ray.train import worker

        self.name, self.reports, self.spent, self.asked, self.exported = name, [], [], [], 0
        self.checkpoints: list[str] = []
        self.saved: list[int] = []  # the step of each report with a checkpoint
        self.handed: list[tuple[str, list[str], dict]] = []  # each checkpoint's folder, its files then, report kwargs
        self.logged: list[tuple[int, dict]] = []
        slope = SLOPE[name] if slope is None else slope
        cfg.eval.at_gflops = list(milestones)
        cfg.data.eval = eval_set
        self.cfg, served = cfg, Counter()
        per_sample = sample_gflops(cfg)
        full_size = cfg.phases[-1].image_size
        trial = self

        def trained() -> float:
            """The GFLOPs of the rows the feed served, each at its phase's cost: what the trial spent."""
            return sum(per_sample[phase] * rows for phase, rows in served.items())

        def evaluate_dataset(model, tokenizer, path, *, image_size, text_length, **_):
            state = trial.worker.state  # the phase end or rung the worker is at, by its own count
            at = cfg.phases[state.phase].name if state.phase_done else max(m for m in milestones if m <= state.gflops)
            self.asked.append((at, image_size, text_length))
            if at in fail:
                raise RuntimeError(f"no readable rows in {path}")
            factor = 1.0 if image_size >= full_size else OWN_RES_FACTOR
            return {"shape/top1": factor * slope * trained() / BUDGET}

        def report(metrics, checkpoint=None, **kwargs):
            self.reports.append(metrics)
            self.spent.append(trained())
            if checkpoint is not None:
                self.saved.append(metrics["step"])
                self.handed.append((checkpoint.path, sorted(os.listdir(checkpoint.path)), kwargs))
            if checkpoint is not None and run_dir is not None:  # Ray Train keeps what the worker reports
                kept = f"{run_dir}/kept"  # shared with the run's later attempts
                self.checkpoints.append(shutil.copytree(checkpoint.path, f"{kept}/{len(glob.glob(f'{kept}/*'))}"))

        class Watched(worker.Worker):
            """The worker, unchanged; the stubbed evaluation reads its run state to name each evaluation."""

            def __init__(self, loop_config: dict) -> None:
                trial.worker = self
                super().__init__(loop_config)

        monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(  # no storage: a local run folder
            get_world_rank=lambda: 0, get_world_size=lambda: 1, get_storage=lambda: None))
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train, "get_checkpoint",
                            lambda: restore and ray.train.Checkpoint.from_directory(restore))
        monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
        monkeypatch.setattr(ray.train, "report", report)
        for call, result in {"set_tags": None, "last_logged_step": -1}.items():
            monkeypatch.setattr(tracking, call, lambda *a, _result=result, **k: _result)
        monkeypatch.setattr(tracking, "latest_metric", lambda uri, run, key: (in_mlflow or {}).get(key))
        monkeypatch.setattr(tracking, "log_metrics", lambda uri, run, metrics, step: self.logged.append((step, metrics)))
        monkeypatch.setattr(worker, "open_feed", lambda cfg, plan, *a: _Feed(plan.index, served))
        monkeypatch.setattr(worker, "settle_data", lambda *a: None)  # the feed's position at checkpoints
        monkeypatch.setattr(worker, "train_step", step or (lambda *a, **k: {"loss": 1.0, "logit_scale": 1.0}))
        if run_dir is None:
            monkeypatch.setattr(worker, "export_run", lambda *a, **k: setattr(self, "exported", self.exported + 1))
        for call in ("log_artifacts", "log_artifact"):
            monkeypatch.setattr(tracking, call, lambda *a, **k: None)
        monkeypatch.setattr(eval_dataset, "evaluate_dataset", evaluate_dataset)
        monkeypatch.setattr(eval_set_module, "eval_columns", lambda *a: None)
        monkeypatch.setattr(worker, "Worker", Watched)
        # The worker declares itself one to tracking_relay (use_relay): undone with the test, as its environment is
        monkeypatch.setattr(tracking_relay, "_WORKER", False)
        monkeypatch.setattr(tracking_relay, "_RELAY", None)
        monkeypatch.setattr(tracking_relay, "_WRITER", None)  # and its write thread
        for key in tracking_relay.WORKER_HTTP_DEFAULTS:
            monkeypatch.delenv(key, raising=False)
        threads = torch.get_num_threads()  # the worker sets its CPU threads (scaling.cpus_per_worker)
        try:
            with tempfile.TemporaryDirectory(prefix="axis-run-") as tmp:
                worker.train_loop_per_worker({
                    "config": cfg.to_dict(), "config_yaml": cfg.to_yaml(), "tokenizer_json": _tokenizer_json(),
                    "tracking_uri": "", "mlflow_run_id": "run", "run_dir": run_dir or tmp, "missing_actor": None,
                    "board": None, "tracking_relay": None})
        finally:
            torch.set_num_threads(threads)
        self.worker_mode = tracking_relay._WORKER  # its failed MLflow writes would be warnings (tracking_relay)

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

    # The worker's gflops_total is the compute the rows it trained cost, each at its phase's image size and text
    # length, in every report; the run spends its budget and ends with the final report and the export.
    for t in trials.values():
        assert [r["gflops_total"] for r in t.reports] == pytest.approx(t.spent, rel=1e-9)
        assert t.spent[-1] == pytest.approx(BUDGET, rel=0.01)
        assert t.reports[-1].get("done") == 1 and t.reports[-1]["samples"] == t.cfg.train.samples and t.exported == 1

    # One task at every rung: the RECLIP trial, still at 32 px, is evaluated as its final metric is (64 px, the
    # finetune's 32 tokens); its phase end also evaluates at its own resolution (logged, not compared).
    reclip = trials["reclip"]
    assert [a for a in reclip.asked if a[0] in axis["milestones"]] == [(1500.0, 64, 32), (3000.0, 64, 32)]
    assert [a for a in reclip.asked if a[0] == "lowres"] == [("lowres", 32, 16), ("lowres", 64, 32)]
    # The baseline (no finetune; its one phase has 16 tokens) is scored on that task too: 64 px, 32 tokens
    assert {(size, length) for _, size, length in trials["baseline"].asked} == {(64, 32)}
    metric = asha_metric(space)
    assert metric == space.metric == "eval/full/shape/top1"
    for t in trials.values():
        rungs = [r for r in t.to_tune([metric]) if "compute_round" in r]
        assert [r["compute_milestone"] for r in rungs] == [1500.0, 3000.0]  # 6000: the budget is never exceeded
        spent = [g for r, g in zip(t.reports, t.spent) if "compute_round" in r]
        for r, g in zip(rungs, spent):  # at the first step past each milestone
            assert r["compute_milestone"] <= g < r["compute_milestone"] + step[t.name]
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
                                                                                             tmp_path, case):
    """Tune fails the whole sweep on a result without its metric (its strict metric check): a trial whose
    evaluation failed or did not run reports the metric as NaN, with the reason, and trains on. Its eval.json (the
    launcher's final metrics) gives the same reason, not the main phase's evaluation, which was of another model."""
    cfg = _configs(space)["reclip"]
    milestones = asha_axis(space, [BUDGET])["milestones"]
    if case == "at_phase_end_false":
        cfg.eval.at_phase_end = False
    trial = Trial("reclip", cfg, milestones, monkeypatch, eval_set="" if case == "no_eval_set" else "stub",
                  fail={1500.0, "finetune"} if case == "fails" else set(), run_dir=str(tmp_path / "run"))
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
    assert trial.reports[-1]["done"] == 1 and final["samples"] == cfg.train.samples  # it trained to its end
    assert "done" not in final  # Tune would stop the trial there, before it has closed its run (tune_result)
    reason = {"fails": "evaluation after 'finetune' failed: RuntimeError: no readable rows in stub",
              "at_phase_end_false": "no evaluation: eval.at_phase_end is false",
              "no_eval_set": "no evaluation: data.eval is empty"}[case]
    assert final["eval_error"] == reason and math.isnan(final[space.metric])
    assert final_eval(str(tmp_path / "run")) == {"eval_error": reason}
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()  # the model is exported all the same
    assert trial.worker_mode  # and an MLflow write that fails in a worker is a warning (test_tracking.py)
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


@pytest.mark.parametrize("fails", [False, True])
def test_an_attempt_restarted_at_the_runs_last_checkpoint_evaluates_the_final_model_again(space, monkeypatch,
                                                                                            tmp_path, fails):
    """The run's last checkpoint is written before the final evaluation: an attempt restarted from it (the one
    before died in that evaluation or in the export) evaluates the final model again, so the export carries its
    evaluation, or why it has none, never the checkpoint's (the main phase's model's). It reports the last step's
    loss, which the checkpoint keeps (a sweep ranked by loss read NaN there)."""
    from reclip_ray.train.checkpoint import read_state

    cfg = _configs(space)["reclip"]
    run_dir = str(tmp_path / "run")
    first = Trial("reclip", cfg, [], monkeypatch, run_dir=run_dir)
    assert [at for at, _, _ in first.asked] == ["lowres", "lowres", "finetune"]  # main phase: 32 and 64 px
    last = read_state(first.checkpoints[-1])
    assert (last.phase, last.phase_done, last.samples) == (1, True, cfg.train.samples)  # the run's last checkpoint
    assert "eval/64px/shape/top1" in last.eval  # the main phase's evaluation: the final one comes after
    again = Trial("reclip", cfg, [], monkeypatch, run_dir=run_dir, restore=first.checkpoints[-1],
                  fail={"finetune"} if fails else set())
    assert again.asked == [("finetune", 64, 32)] and again.spent[-1] == 0  # evaluated again, nothing trained
    final = again.reports[-1]
    assert final["done"] == 1 and final["loss"] == first.reports[-1]["loss"] == 1.0
    if fails:
        reason = "evaluation after 'finetune' failed: RuntimeError: no readable rows in stub"
        assert final["eval_error"] == reason and final_eval(run_dir) == {"eval_error": reason}
    else:
        assert "eval_error" not in final
        exported = final_eval(run_dir)
        assert exported["eval/full/shape/top1"] == final["eval/full/shape/top1"]  # this attempt's evaluation
        assert {k for k in exported if k.startswith("eval/")} == {k for k in final if k.startswith("eval/")}


@pytest.mark.parametrize("evaluated", [False, True])
def test_an_attempt_restored_at_an_earlier_phases_end_evaluates_it_again_unless_mlflow_says_it_was(
        space, monkeypatch, tmp_path, evaluated):
    """A phase's end checkpoint is written before its evaluation. The attempt before died in that evaluation (its
    eval/32px and eval/64px points, the phase's report to Tune and its console line lost), or after it, early in
    the next phase: MLflow's ``phases_evaluated`` tells which. The restored attempt evaluates the phase again only in
    the first case (in the second the points are in MLflow: a second evaluation would log them twice), then trains
    the next phase."""
    from reclip_ray.train.checkpoint import read_state
    from reclip_ray.train.worker import PHASES_EVALUATED

    cfg = _configs(space)["reclip"]
    run_dir = str(tmp_path / "run")
    first = Trial("reclip", cfg, [], monkeypatch, run_dir=run_dir)
    marks = [(step, m[PHASES_EVALUATED]) for step, m in first.logged if PHASES_EVALUATED in m]
    lowres_end = next(c for c in first.checkpoints if (read_state(c).phase, read_state(c).phase_done) == (0, True))
    ends = [r for r in first.reports if "eval_round" in r and "compute_milestone" not in r][:2]
    assert marks == [(ends[0]["step"], 1), (ends[1]["step"], 2)]  # each phase end, once its evaluation has ended

    again = Trial("reclip", cfg, [], monkeypatch, run_dir=run_dir, restore=lowres_end,
                  in_mlflow={PHASES_EVALUATED: 1.0} if evaluated else {})
    lowres = [("lowres", 32, 16), ("lowres", 64, 32)]
    assert again.asked == ([] if evaluated else lowres) + [("finetune", 64, 32)]
    rounds = [r["eval_round"] for r in again.reports if "eval_round" in r]
    assert rounds == ([2, 2] if evaluated else [1, 2, 2])  # the phase's report to Tune, then the finetune's and final
    assert again.spent[-1] == pytest.approx(first.spent[-1] - first.spent[first.reports.index(ends[0])], rel=1e-9)


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


def test_asha_on_the_loss_of_a_sweep_ranked_by_accuracy_stops_the_trial_with_the_higher_loss(tmp_path):
    """``scheduler.metric: loss`` under ``mode: max`` (the sweep's accuracy): ASHA compares the loss as a loss."""
    from ray.tune.schedulers import TrialScheduler

    path = tmp_path / "s.yaml"
    path.write_text(SPACE.replace("grace_fraction: 0.25", "grace_fraction: 0.25, metric: loss"))
    scheduler = make_scheduler(space := load_space(path), asha_axis(space, [BUDGET]))
    learns, stuck = SimpleNamespace(trial_id="learns"), SimpleNamespace(trial_id="stuck")
    for trial in (stuck, learns):
        scheduler.on_trial_add(None, trial)
    rung = {"gflops_total": 1510.0}
    assert scheduler.on_trial_result(None, stuck, {**rung, "loss": 5.5}) == TrialScheduler.CONTINUE  # the first
    assert scheduler.on_trial_result(None, learns, {**rung, "loss": 2.0}) == TrialScheduler.CONTINUE
    another = SimpleNamespace(trial_id="stuck too")
    scheduler.on_trial_add(None, another)
    assert scheduler.on_trial_result(None, another, {**rung, "loss": 5.4}) == TrialScheduler.STOP


def test_asha_on_an_accuracy_of_a_sweep_ranked_by_loss_stops_the_trial_with_the_lower_accuracy(tmp_path):
    """README: ``scheduler.metric`` is compared in its own direction whatever the sweep's ``mode``; the test above
    checks a loss under ``mode: max``, this one the other way round: an accuracy under ``metric: loss, mode: min``."""
    from ray.tune.schedulers import TrialScheduler

    path = tmp_path / "s.yaml"
    path.write_text(SPACE.replace("metric: eval/full/shape/top1\nmode: max", "metric: loss\nmode: min")
                    .replace("grace_fraction: 0.25", "grace_fraction: 0.25, metric: eval/full/shape/top1"))
    scheduler = make_scheduler(space := load_space(path), asha_axis(space, [BUDGET]))
    assert (space.metric, space.mode, asha_metric(space)) == ("loss", "min", "eval/full/shape/top1")
    learns, stuck = SimpleNamespace(trial_id="learns"), SimpleNamespace(trial_id="stuck")
    for trial in (stuck, learns):
        scheduler.on_trial_add(None, trial)
    rung = {"gflops_total": 1510.0}
    assert scheduler.on_trial_result(None, stuck, {**rung, "eval/full/shape/top1": 0.1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, learns, {**rung, "eval/full/shape/top1": 0.6}) == TrialScheduler.CONTINUE
    another = SimpleNamespace(trial_id="stuck too")
    scheduler.on_trial_add(None, another)
    assert scheduler.on_trial_result(None, another, {**rung, "eval/full/shape/top1": 0.15}) == TrialScheduler.STOP


def test_a_trial_stopped_at_a_compute_milestone_is_stopped_early(space):
    """ASHA can now stop a trial mid-phase, before its first phase end (eval_round 0 = phases finished)."""
    from reclip_ray.sweep import trial_rows

    def result(metrics, error=None):
        return SimpleNamespace(metrics=metrics, config={"phases/0/image_size": 32}, error=error)

    grid = [result({"eval_round": 0, "eval_rounds_planned": 2, "compute_round": 1, "gflops_total": 1510.0}),
            result({"eval_round": 1, "eval_rounds_planned": 2, "gflops_total": 4400.0}),
            result({"eval_round": 2, "eval_rounds_planned": 2, "gflops_total": 5999.0, "done": 1,
                    "eval_error": "evaluation after 'finetune' failed: X"}),
            result({}, error=RuntimeError("(pid=1) ray::ImplicitFunc.train()\n  File x\nValueError: boom"))]
    rows = trial_rows(grid, space, 2)
    assert [r["status"] for r in rows] == ["stopped_early", "stopped_early", "completed", "error"]
    assert [r["eval_error"] for r in rows] == ["", "", "evaluation after 'finetune' failed: X", ""]
    assert rows[3]["error"] == "ValueError: boom"  # the line that says what failed, not Ray's actor banner


def test_each_phase_steps_with_its_own_micro_batch(space, monkeypatch):
    """``phases[i].micro_batch_size``: the worker's loop passes each phase's own to the step (-1: the phase takes
    ``train.micro_batch_size``), so a 224 px phase can accumulate where the 64 px one trains its share whole."""
    cfg = _configs(space)["reclip"]
    cfg.train.micro_batch_size = 96
    cfg.phases[-1].micro_batch_size = 40
    seen: list[int] = []

    def step(model, optimizer, images, tokens, **kwargs):
        seen.append(kwargs["micro_batch"])
        return {"loss": torch.tensor(1.0), "logit_scale": torch.tensor(1.0), "lr": kwargs["lr"]}

    Trial("reclip", cfg, [], monkeypatch, step=step)
    steps = []  # each phase's steps, walked from the schedule
    for plan in Schedule.from_config(cfg).phases:
        samples, n = plan.start_sample, 0
        while samples < plan.end_sample:
            samples, n = samples + plan.batch_at(samples), n + 1
        steps.append(n)
    assert len(steps) > 1 and cfg.phases[0].micro_batch_size == -1
    assert seen == [96] * sum(steps[:-1]) + [40] * steps[-1]


def test_the_step_loop_reads_a_steps_output_only_at_log_windows_checkpoints_and_compute_milestones(space,
                                                                                                   monkeypatch):
    """``train_step`` returns tensors: reading one on the host waits for the step's kernels, and the host could
    have been taking the next batch meanwhile. The worker's loop reads them (``Worker.read``) only at the steps that
    need a number: log windows (every ``train.log_every_steps`` and a phase's last step), periodic checkpoints and
    compute milestones, once per step where several fall on one. Here the step's output records the step at which
    it is read; those steps must be exactly the ones the schedule says, walked here from the samples, not every
    step, each once."""
    cfg = _configs(space)["reclip"]
    cfg.train.log_every_steps, cfg.checkpoint.every_samples = 5, 3 * cfg.train.batch_size + 7
    reads: list[int] = []

    class Value:  # a 0-d tensor of the step's output, as the host reads it (float), at the step it was made
        def __init__(self, step: int) -> None:
            self.step = step

        def __float__(self) -> float:
            reads.append(self.step)
            return 1.0

    made: list[int] = []

    def step(*args, **kwargs):
        made.append(len(made) + 1)
        return {"loss": Value(made[-1]), "logit_scale": Value(made[-1]), "lr": kwargs["lr"]}

    schedule, every = Schedule.from_config(cfg), cfg.checkpoint.every_samples
    windows, checkpoints, gflops, samples, n = set(), set(), [0.0], 0, 0  # gflops[k]: trained after step k
    for plan, per_sample in zip(schedule.phases, sample_gflops(cfg)):
        while samples < plan.end_sample:
            n, before = n + 1, samples
            samples += plan.batch_at(samples)
            gflops.append(gflops[-1] + per_sample * (samples - before))
            if n % 5 == 0 or samples >= plan.end_sample:
                windows.add(n)
            if samples < plan.end_sample and samples // every > before // every:
                checkpoints.add(n)
    # A compute milestone crossed at a step that is neither a window nor a checkpoint, 40% into the run
    at = next(k for k in range(int(0.4 * n), n) if k not in windows | checkpoints)
    milestones = {at}
    trial = Trial("reclip", cfg, [gflops[at] - 1e-6], monkeypatch, step=step)
    assert len(made) == n > 2 * len(windows | checkpoints | milestones), (n, windows, checkpoints)
    assert checkpoints - windows and milestones - windows - checkpoints  # each kind of read is seen on its own
    assert checkpoints & windows  # ... and two on one step
    # Each of those steps' output read once: its two values, once each
    assert sorted(reads) == sorted(2 * list(windows | checkpoints | milestones))
    assert trial.reports[-1]["loss"] == 1.0


@pytest.mark.parametrize("every_samples", [0, 4000])
def test_checkpoint_every_minutes_checkpoints_at_the_first_log_window_that_long_after_the_last(space, monkeypatch,
                                                                                              every_samples):
    """``checkpoint.every_minutes``: a checkpoint at the first log window at least that long (rank 0's clock) after
    the attempt's start or the end of its last checkpoint, whatever wrote that one (``every_samples``, a phase end).
    The clock is a stand-in that each step moves on by 7 s per full batch; the expected steps are walked here from
    the schedule, and ``reclip-ray plan`` (``plan.run_checkpoints``, given each phase's wall time at that speed)
    counts the same checkpoints per phase."""
    from reclip_ray.plan import run_checkpoints
    from reclip_ray.train import checkpoint

    cfg = _configs(space)["reclip"]
    cfg.train.log_every_steps, cfg.checkpoint.every_samples, cfg.checkpoint.every_minutes = 5, every_samples, 1.0
    per_sample = 7.0 / cfg.train.batch_size
    now = [0.0]
    monkeypatch.setattr(checkpoint, "monotonic", lambda: now[0])

    def step(model, optimizer, images, *args, **kwargs):
        now[0] += per_sample * len(images)
        return {"loss": 1.0, "logit_scale": 1.0}

    trial = Trial("reclip", cfg, [], monkeypatch, step=step)
    expected, ends, samples, n, t0 = [], [], 0, 0, 0.0
    plans = Schedule.from_config(cfg).phases
    for plan in plans:
        while samples < plan.end_sample:
            n, before = n + 1, samples
            samples += plan.batch_at(samples)
            end = samples >= plan.end_sample
            due = (n % 5 == 0 or end) and per_sample * samples - t0 >= 60.0
            crossed = every_samples and samples // every_samples > before // every_samples
            if crossed or due or end:
                expected.append(n)
                t0 = per_sample * samples
        ends.append(n)
    assert trial.saved == expected
    mid = [k for k in expected if k not in ends]
    assert len(mid) > 10
    if not every_samples:  # by the clock alone: never sooner than a minute (9 steps) after the last one
        assert all(b - a >= 60 / 7 for a, b in zip(expected, expected[1:]) if b in mid)
    walls = [per_sample * (plan.end_sample - plan.start_sample) for plan in plans]
    per_phase = [sum(first < k <= last for k in expected) for first, last in zip([0] + ends, ends)]
    assert run_checkpoints(cfg, walls) == per_phase


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_an_async_upload_hands_ray_train_a_whole_checkpoint_folder_that_ray_train_deletes(space, monkeypatch, upload):
    """``checkpoint.upload``: ``sync`` reports each checkpoint from a temporary folder that is gone once ``report``
    returns (Ray Train has copied it by then); ``async`` asks Ray Train to copy it in a thread
    (``CheckpointUploadMode.ASYNC``) and to delete the folder after the copy, so the folder must outlive ``report``:
    the worker leaves it (here ``report`` is a stand-in that copies nothing, so the folders are still there). Either
    way the folder is whole when reported: ``meta.json`` (written last) beside the state and the config."""
    import ray.train

    cfg = _configs(space)["reclip"]
    cfg.checkpoint.upload = upload
    trial = Trial("reclip", cfg, [], monkeypatch)
    assert len(trial.handed) == len(trial.saved) == 4  # at 16,000 and 32,000 samples (the preset's), the phase ends
    # MLflow's checkpoint_s: the seconds each checkpoint held the step loop, at its step
    assert [step for step, m in trial.logged if "checkpoint_s" in m] == trial.saved
    assert all(m["checkpoint_s"] > 0 for _, m in trial.logged if "checkpoint_s" in m)
    try:
        for path, files, kwargs in trial.handed:
            assert files == ["config.yaml", "meta.json", "state.pt"], files
            if upload == "sync":
                assert not os.path.exists(path) and kwargs.get("checkpoint_upload_mode") is None, kwargs
            else:
                assert os.path.isdir(path) and sorted(os.listdir(path)) == files
                assert kwargs["checkpoint_upload_mode"] == ray.train.CheckpointUploadMode.ASYNC
                assert kwargs["delete_local_checkpoint_after_upload"] is True
    finally:
        for path, _, _ in trial.handed:
            shutil.rmtree(path, ignore_errors=True)
