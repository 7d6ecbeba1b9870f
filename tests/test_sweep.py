"""Ray Tune sweeps: equal-compute trial configs (fast) and the smoke space end to end on local Ray (slow)."""

from __future__ import annotations

import contextlib
import csv
import os
import re
from pathlib import Path

import pytest

from reclip_ray.config import ConfigError, apply_overrides, from_dict, full_text_length, load_raw
from reclip_ray.flops import run_flops, train_flops_per_sample
from reclip_ray.sweep import load_space, pareto_front, trial_raw

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


@pytest.mark.parametrize("name", ["smoke", "resolution_budget", "phase_length"])
def test_shipped_spaces_load_and_every_corner_fits_the_budget(name):
    space = load_space(SPACES / f"{name}.yaml")
    base = apply_overrides(load_raw(space.base), space.overrides)
    budget = space.budget["gflops"]
    for size in (32, 48, 64):
        for f in (0.0, 0.1, 0.3):
            cfg = from_dict(trial_raw(base, {"phases.0.image_size": size, "finetune_fraction": f}, space.budget))
            spent = run_flops(cfg)["total_train_gflops"]
            # One batch of the most expensive phase is the allowed overshoot; flooring means we never go over.
            worst = max(train_flops_per_sample(cfg.model, p.image_size, p.text_length) for p in cfg.phases) / 1e9
            assert budget - 2 * cfg.train.batch_size * worst <= spent <= budget + cfg.train.batch_size * worst
            assert len(cfg.phases) == (1 if f == 0.0 else 2)
            # every trial is scored on one task: 64 px and 32 tokens, with or without its finetune
            assert (cfg.eval.full_image_size or cfg.phases[-1].image_size, full_text_length(cfg)) == (64, 32)


def test_equal_compute_gives_small_images_more_samples():
    space = load_space(SPACES / "resolution_budget.yaml")
    base = load_raw(space.base)
    n = {s: from_dict(trial_raw(base, {"phases.0.image_size": s}, space.budget)).train.samples for s in (32, 64)}
    # Reference computed from the per-sample FLOPs directly.
    cfg = from_dict(base)
    per = {s: 0.9 * train_flops_per_sample(cfg.model, s, 16) + 0.1 * train_flops_per_sample(cfg.model, 64, 32)
           for s in (32, 64)}
    assert n[32] / n[64] == pytest.approx(per[64] / per[32], rel=0.01)
    assert n[32] > 2 * n[64]


def test_bad_spaces_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {phases.0.image_size: {range: [1, 2]}}\n")
    with pytest.raises(ConfigError, match="params.phases.0.image_size must be one of"):
        load_space(bad)
    bad.write_text("params: {x: {grid: [1]}}\nbudgett: {gflops: 1}\n")
    with pytest.raises(ConfigError, match="unknown key.*budgett"):
        load_space(bad)
    bad.write_text("params: {data.eval: {uniform: [a, b]}}\n")
    with pytest.raises(ConfigError, match="params.data.eval.uniform must be \\[low, high\\], two numbers"):
        load_space(bad)
    with pytest.raises(ConfigError, match="search space not found"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["..", "a/b", "/abs/sweep", "a\\b", "a%2Fb", "a#b", "x" * 169])
def test_a_space_name_that_is_no_single_folder_name_is_refused(tmp_path, name):
    """The space's name is the sweep folder's (its run.name: ``run.storage_path/<name>``) and its trials' prefix:
    ``..`` or ``/abs`` put the sweep outside the storage path, ``a/b`` below it. Its trials' names
    (``<name>-<trial id>``) must be valid run names too, so a space's name has at most 168 bytes."""
    space = tmp_path / "s.yaml"
    space.write_text(f"name: '{name}'\nparams: {{optim.lr: {{grid: [1.0e-3]}}}}\nmetric: loss\n")
    refused = f"^{re.escape(str(space))}: name '.*' is no folder name for run.storage_path"
    with pytest.raises(ConfigError, match=refused):
        load_space(space)


def test_a_space_without_a_name_takes_its_files_stem_which_must_be_a_folder_name_too(tmp_path):
    for stem, error in (("a?b", True), ("x" * 168, False)):
        space = tmp_path / f"{stem}.yaml"
        space.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: loss\n")
        with pytest.raises(ConfigError, match=r"name 'a\?b' is no folder name") if error else contextlib.nullcontext():
            assert load_space(space).name == stem


@pytest.mark.parametrize("value", ["-1", "0", "2.5", "two", "true", ".inf"])
def test_num_samples_must_be_a_whole_number_of_grid_runs(tmp_path, value):
    """Tune repeats the grid ``num_samples`` times: -1 repeated it forever, 0 ran an empty sweep, 2.5 ran it twice."""
    space = tmp_path / "s.yaml"
    space.write_text(f"params: {{optim.lr: {{grid: [1.0e-3]}}}}\nmetric: loss\nnum_samples: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(space))}: num_samples must be a whole number >= 1 \(how "
                                          r"many times the grid runs\), got "):
        load_space(space)
    for fine, runs in (("1", 1), ("3", 3), ("2.0", 2)):
        space.write_text(f"params: {{optim.lr: {{grid: [1.0e-3]}}}}\nmetric: loss\nnum_samples: {fine}\n")
        assert load_space(space).num_samples == runs


def test_every_value_of_a_large_grid_is_checked_before_ray_starts(tmp_path):
    """128 combinations: the first 64 all hold the first parameter's first two values; its last one (30 px, no
    multiple of the patch size) must still fail at launch, not in every trial that draws it."""
    from reclip_ray.sweep.run import check_trials

    space = tmp_path / "s.yaml"
    space.write_text("params:\n  phases.0.image_size: {grid: [32, 48, 64, 30]}\n"
                     "  optim.lr: {grid: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}\n"
                     "  finetune_fraction: {grid: [0.1, 0.2, 0.3, 0.4]}\n  optim.weight_decay: {grid: [0.1, 0.2]}\n"
                     "metric: loss\nmode: min\nbudget: {gflops: 3000}\n")
    with pytest.raises(ConfigError, match="image_size 30 is not a positive multiple of the patch size 8"):
        check_trials(load_space(space), load_raw("tiny"))


def test_ranges_are_checked_as_tune_draws_them(tmp_path):
    """``uniform`` draws floats: on an integer key every trial would be refused, so the launch refuses it.
    ``randint`` never draws its high end (Tune's is exclusive), so a high end one past the valid range is fine."""
    from reclip_ray.sweep.run import check_trials

    space = tmp_path / "s.yaml"
    space.write_text("params: {phases.0.image_size: {uniform: [32, 64]}}\nmetric: loss\nmode: min\n"
                     "budget: {gflops: 3000}\n")
    with pytest.raises(ConfigError, match=r'sweep trial \{"phases.0.image_size": 48.5\}: .* must be an integer'):
        check_trials(load_space(space), load_raw("tiny"))
    space.write_text("params: {phases.0.text_length: {randint: [8, 33]}}\nmetric: loss\nmode: min\n"
                     "budget: {gflops: 3000}\n")  # tiny's context length is 32: Tune draws 8 ... 32
    check_trials(load_space(space), load_raw("tiny"))


@pytest.mark.parametrize("metric", ["los", "lr", "eval/full/shape/top-1", "eval/full/rows"])
def test_a_metric_no_report_carries_is_refused_before_ray_starts(tmp_path, metric):
    """Tune would fail the whole sweep at the first trial's first rung or phase end (its strict metric check)."""
    from reclip_ray.sweep.run import check_trials

    space = tmp_path / "s.yaml"
    space.write_text(f"params: {{optim.lr: {{grid: [1.0e-3]}}}}\nmetric: {metric}\nmode: min\n"
                     "budget: {gflops: 300}\n")
    with pytest.raises(ConfigError, match=f"metric '{metric}' is in no trial's report to Tune: use loss, eval/full/"):
        check_trials(load_space(space), load_raw("tiny"))
    for fine in ("loss", "eval/full/colour/top5", "eval/full/text_to_image_r@10",
                 "eval/full/shape/mean_per_class_recall"):  # every label set's report carries it (metrics.py)
        space.write_text(f"params: {{optim.lr: {{grid: [1.0e-3]}}}}\nmetric: {fine}\nbudget: {{gflops: 300}}\n")
        check_trials(load_space(space), load_raw("tiny"))


def test_a_loss_without_a_mode_is_minimised(tmp_path):
    """The default ``mode: max`` on ``metric: loss`` ranked the trial that learned nothing best (best.yaml)."""
    from reclip_ray.sweep import best_row

    space = tmp_path / "s.yaml"
    space.write_text("params: {optim.lr: {grid: [1.0e-3, 1.0e-9]}}\nmetric: loss\nbudget: {gflops: 300}\n")
    rows = [{"status": "completed", "loss": 2.1, "param:optim.lr": 1e-3},
            {"status": "completed", "loss": 6.9, "param:optim.lr": 1e-9}]
    assert best_row(rows, load_space(space))["param:optim.lr"] == 1e-3
    space.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nbudget: {gflops: 300}\n")  # eval/full/shape/top1
    assert load_space(space).mode == "max"


def test_a_loss_to_maximise_is_refused(tmp_path):
    """``mode: max`` on ``metric: loss`` made the trial that learned nothing the best (results, best.yaml). Only the
    sweep's own metric ``loss``: ASHA's ``scheduler.metric`` takes its direction from its name, not from ``mode``."""
    space = tmp_path / "s.yaml"
    head = "params: {optim.lr: {grid: [1.0e-3]}}\nbudget: {gflops: 300}\n"
    space.write_text(head + "metric: loss\nmode: max\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(space))}: mode max with metric loss ranks the trial that "
                                          r"learned least best: use mode: min \(the default for loss\)$"):
        load_space(space)
    for fine, mode in (("metric: loss\nmode: min\n", "min"), ("metric: eval/full/shape/top1\nmode: max\n", "max"),
                       ("mode: max\nscheduler: {metric: loss}\n", "max")):
        space.write_text(head + fine)
        assert load_space(space).mode == mode


def test_pareto_front():
    pts = [(1.0, 0.2), (2.0, 0.5), (3.0, 0.4), (4.0, 0.6), (2.5, 0.5)]
    assert pareto_front(pts, "max") == [0, 1, 3]
    assert pareto_front([(1.0, 3.0), (2.0, 1.0)], "min") == [0, 1]


def test_a_grid_runs_in_the_order_the_space_file_lists_it(tmp_path):
    """Tune sorts a grid's keys and varies the first fastest; the sweep keys them by their place in the file, so
    the first listed parameter varies fastest whatever its name. Expanded by Tune's own variant generator."""
    from ray.tune.search.variant_generator import generate_variants

    from reclip_ray.sweep.space import trial_params, tune_param_space

    space = tmp_path / "s.yaml"
    space.write_text("params:\n  optim.lr: {grid: [1.0e-3, 1.0e-9]}\n  data.eval: {grid: [good, broken]}\n"
                     "  finetune_fraction: {grid: [0.1, 0.2]}\nmetric: loss\nmode: min\nbudget: {gflops: 300}\n")
    trials = [trial_params(config) for _, config in generate_variants(tune_param_space(load_space(space), {}))]
    expected = [{"optim.lr": lr, "data.eval": ev, "finetune_fraction": f}
                for f in (0.1, 0.2) for ev in ("good", "broken") for lr in (1e-3, 1e-9)]
    assert trials == expected
    # A sweep started before the place prefix existed resumes with its trials' configs keyed by path alone.
    assert trial_params({"optim/lr": 1e-3, "phases/0/image_size": 32, "_setup": {}}) == {
        "optim.lr": 1e-3, "phases.0.image_size": 32}


@pytest.mark.slow
@pytest.mark.sweep
def test_an_interrupted_sweep_resumes_whichever_keys_it_started_with(ray_session, tmp_path):
    """Tune refuses ``Tuner.restore(param_space=...)`` whose keys differ from the original's: a sweep started in
    the format of earlier versions (bare-path keys, ``_setup`` a dict), and one started in today's (ordered keys,
    ``_setup`` one JSON string, which a config key added since does not change), both resume through
    ``restore_tuner``, their trials' parameters and setup read back alike. A plain trainable stands in for the trials.
    In each first run one trial fails (README: "a finished one is not trained again"): the restored sweep runs that
    trial again and none of the three that finished."""
    from ray import tune

    from reclip_ray.sweep.run import restore_tuner
    from reclip_ray.sweep.space import trial_params, trial_setup_of, tune_param_space

    space_file = tmp_path / "s.yaml"
    space_file.write_text("params:\n  optim.lr: {grid: [1.0e-3, 1.0e-9]}\n  data.eval: {grid: [good, broken]}\n"
                          "metric: score\nmode: max\nbudget: {gflops: 300}\n")
    space = load_space(space_file)

    runs, fail = tmp_path / "runs", tmp_path / "fail"
    runs.mkdir()

    def trainable(config):
        params = trial_params(config)
        name = f"{trial_setup_of(config)['sweep']}-{params['optim.lr']}-{params['data.eval']}"
        with open(runs / name, "a") as f:  # one line per time the trial is trained
            f.write("ran\n")
        if fail.exists() and params == {"optim.lr": 1e-9, "data.eval": "broken"}:
            raise RuntimeError("the trial fails in the sweep's first run")
        tune.report({"score": 1.0})

    expected = sorted((lr, ev) for lr in (1e-3, 1e-9) for ev in ("good", "broken"))
    for legacy in (True, False):
        root = tmp_path / ("legacy" if legacy else "today")
        setup = {"sweep": root.name, "base_raw": {"data": {"train": "d"}}}
        fail.touch()
        first = tune.Tuner(trainable, param_space=tune_param_space(space, setup, legacy=legacy),
                           run_config=tune.RunConfig(name="tune", storage_path=str(root), verbose=0)).fit()
        assert first.num_errors == 1
        fail.unlink()
        # A config key added since the sweep started changes nothing Tune compares (``_setup`` is one JSON leaf)
        newer = {**setup, "base_raw": {"data": {"train": "d", "new_key": 1}}}
        grid = restore_tuner(str(root / "tune"), trainable, space, setup if legacy else newer).fit()
        assert grid.num_errors == 0
        params = [trial_params(r.config) for r in grid]
        assert sorted((p["optim.lr"], p["data.eval"]) for p in params) == expected, (legacy, params)
        assert all(trial_setup_of(r.config)["sweep"] == root.name for r in grid)
        # Every trial, the one run again included, keeps the setup the sweep started with (README: a preset
        # changed by an upgrade does not reach a resumed sweep), not the one given to restore_tuner
        assert all(trial_setup_of(r.config)["base_raw"] == setup["base_raw"] for r in grid)
        trained = {p.name: len(p.read_text().splitlines()) for p in runs.glob(f"{root.name}-*")}
        assert trained == {f"{root.name}-{lr}-{ev}": 2 if (lr, ev) == (1e-9, "broken") else 1
                           for lr, ev in expected}, trained


def _one_trial_sweep(tmp_path: Path, synth_dir: Path, tokenizer_path: Path,
                     storage_path: str) -> tuple[Path, Path, list[str]]:
    """A sweep of one 1,280-sample trial on the tiny model, with 1-step log windows, its folder under
    ``storage_path``: its space file, its MLflow database and the overrides that point it at the suite's data."""
    space = tmp_path / "resume.yaml"
    space.write_text(
        "name: resume\nbase: tiny\n"
        "set: [model.vision.depth=1, model.text.depth=1, train.batch_size=64, train.log_every_steps=1,\n"
        "      checkpoint.every_samples=128, scaling.min_workers=1, scaling.max_workers=1,\n"
        "      scaling.cpus_per_worker=0.5, eval.at_phase_end=false, data.block_mb=0]\n"
        "params: {optim.lr: {grid: [1.0e-3]}}\nmetric: loss\nmode: min\nbudget: {samples: 1280}\n"
        "scheduler: {name: fifo}\n")
    db = tmp_path / "mlflow.db"
    overrides = [f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}",
                 f"data.tokenizer={tokenizer_path}", "data.synth_if_missing=false",
                 f"run.storage_path={storage_path}", f"tracking.uri=sqlite:///{db}"]
    return space, db, overrides


def _trial_folders(sweep_dir: str) -> list[str]:
    """The names of a sweep's trial run folders (on S3, prefixes with files under them)."""
    from reclip_ray import storage

    trials = storage.join(sweep_dir, "trials")
    return sorted({f[len(trials) + 1:].split("/")[0] for f in storage.list_files(trials)})


def _check_resumed_trial(db: Path, sweep_dir: str, parent_id: str, restarts: int) -> None:
    """The one-trial sweep, resumed after its trial stopped midway, finished that trial from a checkpoint: both
    phases trained to their end, an exported model in the trial's one run folder, one MLflow child run, no
    training step logged twice and a restart recorded; the parent and the child FINISHED."""
    import io

    from mlflow.tracking import MlflowClient

    from reclip_ray import storage

    (row,) = csv.DictReader(io.StringIO(storage.read_text(f"{sweep_dir}/results.csv")))
    assert row["status"] == "completed" and row["eval_rounds"] == "2", row  # both phases trained to their end
    assert _trial_folders(sweep_dir) == [f"resume-{row['trial_id']}"]  # the trial's own folder
    assert storage.is_file(f"{sweep_dir}/trials/resume-{row['trial_id']}/model/model.safetensors")

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.info.run_id for c in children] == [row["mlflow_run_id"]]
    assert parent.info.status == children[0].info.status == "FINISHED"
    samples = sorted((m.step, m.value) for m in client.get_metric_history(row["mlflow_run_id"], "samples"))
    steps = [s for s, _ in samples]
    assert steps == sorted(set(steps)) == list(range(1, len(steps) + 1)), steps  # every step logged once
    assert samples[-1][1] == float(row["samples"]) > 512
    logged = client.get_metric_history(row["mlflow_run_id"], "restarts")
    assert logged and max(m.value for m in logged) == restarts  # each attempt after the first restored a checkpoint


@pytest.mark.slow
@pytest.mark.sweep
def test_a_sweep_stopped_by_ctrl_c_ray_job_stop_or_its_trial_failing_resumes_the_trial_when_rerun(
        ray_cluster, tmp_path, synth_dir, tokenizer_path, s3_prefix):
    """README: "Rerunning an interrupted sweep resumes it", for the three ways a one-trial sweep stops midway.
    `reclip-ray sweep` runs in its own process on this cluster (RAY_ADDRESS), the same command each time, with the
    sweep folder (Tune's state, the trial's checkpoints, results.csv, ray.log) on S3:

    1. A SIGINT (Ctrl-C) once its trial has a checkpoint. Tune saves its state, stops the trial and returns as if
       the sweep had ended; the command must not write results for a sweep that has not ended.
    2. A SIGTERM (what `ray job stop` sends the job's processes) once the resumed trial has checkpointed again.
       Ray's driver exits on it from inside Tune's loop.
       After 1 and 2: exit status 130 with how to resume, no results.csv, the parent and the trial's runs KILLED.
    3. The trial dies at 1,088 of its 1,280 samples, before its first phase ends and so before any report to Tune
       (``fault.fail_at_samples``, no Ray Train retries): the sweep finishes with it errored (results.csv says
       why) and says how to resume it.
    4. The trial, resumed under its own id and run folder from its checkpoint each time (never from sample 0),
       finishes: one MLflow parent, one child run, no training step logged twice, 3 restarts.
    The steps of runs 1 and 2 are slowed (1.5 s each, while a flag file exists) so the trial is still training when
    it is stopped: after a SIGINT it trained on for ~10 s (6-7 steps, to 512-576 samples) while Tune stopped it,
    8 steps short of the fault."""
    import contextlib
    import io
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from conftest import s3_checkpoints
    from reclip_ray import storage
    from reclip_ray.cli import main
    from reclip_ray.console import ray_log_file
    from reclip_ray.lease import LEASE_FILE

    space, db, overrides = _one_trial_sweep(tmp_path, synth_dir, tokenizer_path, f"{s3_prefix}/runs")
    slow = tmp_path / "slow-steps"
    slow.touch()
    command = [sys.executable, "-m", "reclip_ray", "sweep", "--space", str(space)]
    command += [a for o in overrides + ["fault.step_delay_s=1.5", f"fault.step_delay_while={slow}",
                                        "fault.fail_at_samples=1088", "run.max_failures=0"] for a in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "OMP_NUM_THREADS": "1"}  # join this session's Ray
    sweep_dir = f"{s3_prefix}/runs/resume"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")

    def statuses() -> dict[str, str]:
        return {r.info.run_name: r.info.status for r in
                client.search_runs([e.experiment_id for e in client.search_experiments()])}

    def checkpoints() -> set[str]:
        return {f"{t}/{c}" for t in _trial_folders(sweep_dir) for c in s3_checkpoints(f"{sweep_dir}/trials/{t}")}

    def stopped(sig: int, log_name: str, rerun: bool = False) -> str:
        """The sweep's output, stopped by ``sig`` once its trial has written a checkpoint it had not before;
        ``rerun``: first, the same command again (in this process: it is refused before Ray), which must refuse."""
        seen = checkpoints()
        log_path = tmp_path / log_name
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 240
            while not checkpoints() - seen and proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            assert proc.poll() is None and checkpoints() - seen, log_path.read_text()[-3000:]
            if rerun:  # a user rerunning the sweep while it runs: one line, and the sweep goes on
                refused = io.StringIO()
                with contextlib.redirect_stderr(refused):
                    assert main(command[3:]) == 2
                said = refused.getvalue()
                assert said.startswith(f"reclip-ray: error: {sweep_dir} is in use by another launch (pid {proc.pid} "
                                       "on "), said
                assert proc.poll() is None
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        text = log_path.read_text()
        assert rc == 130 and "reclip-ray: interrupted" in text, (rc, text[-3000:])
        assert not storage.exists(f"{sweep_dir}/results.csv")  # no results: the sweep has not ended
        assert not storage.exists(f"{sweep_dir}/{LEASE_FILE}")  # the stopped sweep released its folder
        assert statuses() == {"resume": "KILLED", **{t: "KILLED" for t in _trial_folders(sweep_dir)}}  # one trial
        # Tune stopped the trial: its Ray Train workers are gone, not left training beside the next launch
        deadline = time.time() + 60
        while list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
            assert time.time() < deadline, "the stopped sweep's trial left its training workers alive"
            time.sleep(0.5)
        return text

    first = stopped(signal.SIGINT, "first.log", rerun=True)  # what Ctrl-C delivers to the foreground process
    assert "[sweep] interrupted with 1 trial(s) unfinished: run the same command again" in first, first[-3000:]
    # The console has the sweep's own lines; the trial's training log is in the sweep folder's ray.log, once per
    # line and without Ray Data's progress bars (cursor codes that were redrawn around every line); copied to S3
    ray_log = storage.read_text(f"{sweep_dir}/ray.log")
    assert "[reclip] lowres 32px step 2/20 " not in first, first[-3000:]
    # Tune's header and its resume advice for its Python API are not shown, nor any INFO line of Ray's, its start-up
    # lines included (ray.log is open before the sweep's first MLflow call and before Ray is joined; this test's
    # store is a copy of one already made, so MLflow's table lines are the unit test's and the default job's)
    assert "Configuration for experiment" not in first and "tensorboard" not in first, first[-3000:]
    assert "Tuner.restore" not in first and "Tuner.restore" not in ray_log, first[-3000:]
    assert " INFO " not in first and "Wrote the latest version" in ray_log, first[-3000:]
    assert "Connecting to existing Ray cluster" in ray_log, ray_log[:3000]
    assert ray_log.count("[reclip] lowres 32px step 2/20 ") == 1 and "row/s]" not in ray_log, ray_log[-3000:]
    second = stopped(signal.SIGTERM, "second.log")
    assert "[sweep] resuming" in second

    slow.unlink()
    failed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert failed.returncode == 0, (failed.stdout[-3000:], failed.stderr[-3000:])
    assert "1 trial(s) failed (results.csv: status 'error' and why): run the same command again" in failed.stdout
    (row,) = csv.DictReader(io.StringIO(storage.read_text(f"{sweep_dir}/results.csv")))
    assert row["status"] == "error" and "fault injected at 1088 samples" in row["error"], row
    # The trial reported nothing to Tune before it failed: its row and its run are matched by its trial id
    (child,) = client.search_runs([client.get_experiment_by_name("sweep-resume").experiment_id],
                                  f"tags.reclip.trial_id = '{row['trial_id']}'")
    assert row["mlflow_run_id"] == child.info.run_id and row["samples"] == "0", row
    assert statuses() == {"resume": "FINISHED", f"resume-{row['trial_id']}": "FAILED"}

    os.remove(ray_log_file(sweep_dir))  # the last run as if from another machine: no local copy of the log
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    assert "[sweep] resuming" in again.stdout
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'resume'")
    _check_resumed_trial(db, sweep_dir, parent[0].info.run_id, restarts=3)
    # Each run's ray.log copy to S3 kept the earlier runs' lines (the last run started its local log from the copy):
    # the first run's step 2 (once) and the third's fault
    ray_log = storage.read_text(f"{sweep_dir}/ray.log")
    assert ray_log.count("[reclip] lowres 32px step 2/20 ") == 1 and "fault injected at 1088" in ray_log, ray_log[-3000:]
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("s3:*"))  # nothing written locally


@pytest.mark.slow
@pytest.mark.sweep
def test_a_trial_on_another_node_writes_its_mlflow_run_through_a_relay_on_the_sweep_drivers_node(ray_cluster,
                                                                                                  tmp_path):
    """A sweep's trials are drivers that Tune places on any node, where a SQLite path is that node's own file. A
    trial's driver code, run in a task on an added node, gets its relay on the node ``mark_home`` marked (the sweep
    driver's: this process's), and its MLflow run's start and end go through it into the driver's store."""
    import ray
    from mlflow.tracking import MlflowClient

    from reclip_ray.config import load_config
    from reclip_ray.sweep.trainable import sweep_home, trial_relay
    from reclip_ray.tracking_relay import mark_home

    db = tmp_path / "mlflow.db"
    cfg = load_config("tiny", [f"tracking.uri=sqlite:///{db}", "run.name=xnode-trial", "tracking.experiment=xnode"])
    home = mark_home(sweep_home("xnode"))
    here = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0, resources={"elsewhere": 1})
    def trial_driver(cfg):
        from reclip_ray import tracking
        from reclip_ray.tracking_relay import use_relay

        relay = trial_relay("xnode", cfg)
        use_relay(relay)
        try:
            uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
            run_id = tracking.start_or_resume_run(uri, "xnode", cfg.run.name, None, cfg)
            tracking.end_run(uri, run_id, "FINISHED")
        finally:
            use_relay(None)
        return ray.get_runtime_context().get_node_id(), ray.get(relay.stats.remote()), run_id

    node = ray_cluster.add_node(num_cpus=0, resources={"elsewhere": 1}, object_store_memory=100 * 1024**2)
    try:
        ran_on, relay, run_id = ray.get(trial_driver.remote(cfg), timeout=120)
    finally:
        ray_cluster.remove_node(node)
        del home
    assert ran_on != here and relay["node_id"] == here
    assert relay["calls"] == 2  # the run's start (with its params) and its end
    run = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == str(cfg.train.batch_size)


def test_the_final_report_reaches_tune_without_done():
    """Tune stops a trial at a result that says ``done``, before the trial has closed its run; it sees the trial
    end when its function returns instead."""
    from reclip_ray.sweep.asha import tune_result

    final = {"done": 1, "eval_round": 2, "eval_rounds_planned": 2, "loss": 3.0, "gflops_total": 300.0}
    assert tune_result(final, ["loss"]) == {k: v for k, v in final.items() if k != "done"}
    assert "done" not in tune_result({**final, "eval_error": "evaluation failed"}, ["loss"])


def test_the_progress_callback_tells_an_interrupted_sweep_from_a_finished_one(capsys):
    """After a Ctrl-C Tune marks the running trials terminated and returns as if the sweep had ended; only the
    trials the callback saw end (or found finished when a resumed sweep began) count as ended (``UNFINISHED``)."""
    from reclip_ray.sweep.progress import UNFINISHED, progress_callback

    class Trial:
        def __init__(self, trial_id: str, status: str = "PENDING"):
            self.trial_id, self.status, self.last_result, self.config = trial_id, status, {}, {}

        def is_finished(self) -> bool:
            return self.status in ("TERMINATED", "ERROR")

    def run(trials: list, ending: list, steps: bool = True) -> list[str]:
        callback = progress_callback("loss", 2)
        if steps:
            callback.on_step_begin(iteration=0, trials=trials)
        for trial, how in ending:
            trial.status = "ERROR" if how == "error" else "TERMINATED"
            getattr(callback, f"on_trial_{how}")(iteration=1, trials=trials, trial=trial)
        for trial in trials:  # what Tune's cleanup does to the trials still running at a Ctrl-C
            trial.status = "TERMINATED" if trial.status == "RUNNING" else trial.status
        callback.on_experiment_end(trials=trials)
        return list(UNFINISHED)

    a, b, c = Trial("a"), Trial("b", "RUNNING"), Trial("c")
    assert run([a, b, c], [(a, "complete"), (c, "error")]) == ["b"]  # b was running at the Ctrl-C
    assert run([a, b, c], [(b, "complete")]) == []  # resumed: a and c had ended before
    assert run([Trial("d", "TERMINATED")], [], steps=False) == []  # a finished sweep rerun: Tune takes no step
    assert run([Trial("e", "PENDING")], [], steps=False) == ["e"]  # stopped before Tune's first step
    assert "[sweep] trial c error: " in capsys.readouterr().out


def test_a_trial_writes_to_an_mlflow_server_directly():
    """README: a server URL is written by a trial directly, with no relay (so no Ray call is made here)."""
    from reclip_ray.config import load_config
    from reclip_ray.sweep.trainable import trial_relay

    assert trial_relay("s", load_config("tiny", ["tracking.uri=http://mlflow.example:5000"])) is None


def _wait_for_placement_groups_removed(ray, timeout_s: float = 30.0) -> None:
    import time

    from ray.util.placement_group import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live or time.time() > deadline:
            break
        time.sleep(1.0)
    assert not live, f"placement groups left behind by the sweep: {live}"


def _detached_actors() -> dict[str, tuple[str, str, str | None]]:
    """Every detached actor this cluster has had: actor id -> (class, state, placement group id or None)."""
    from ray.util.state import list_actors

    found = list_actors(detail=True, limit=10_000)
    return {a.actor_id: (a.class_name, a.state, a.placement_group_id or None) for a in found if a.is_detached}


def _kill_data_stats_actor(ray, timeout_s: float = 30.0) -> None:
    """Kill the cluster's Ray Data stats actor, if any, and wait until its name is free, so that whatever runs
    next decides where the next one lives."""
    import time

    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    deadline = time.time() + timeout_s
    while True:
        try:
            actor = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
        except ValueError:
            return
        assert time.time() < deadline, "Ray Data's stats actor outlived ray.kill"
        ray.kill(actor)
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.sweep
def test_smoke_sweep_end_to_end_through_failing_evaluations_with_its_folder_on_s3(ray_session, tmp_path, synth_dir,
                                                                               tokenizer_path, s3_prefix):
    """The smoke space on local Ray with its image-size axis swapped for an eval-set axis (the same 4 trials, the
    suite's costliest test run once), and run.storage_path on S3 (moto on localhost): the trials on a set where no
    image decodes train on through every failed evaluation, and the sweep finishes with their reason in results.csv
    and MLflow; Tune's experiment state, every trial's run folder and the sweep's results.csv / pareto.png /
    best.yaml all land under the prefix."""
    import io

    import pyarrow.fs as pafs
    import yaml
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from layouts import write_broken_eval_set
    from reclip_ray import storage
    from reclip_ray.config import load_config
    from reclip_ray.sweep import run_sweep

    space = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    assert set(space["params"]) == {"optim.lr", "phases.0.image_size"}
    broken = write_broken_eval_set(tmp_path / "broken_eval", synth_dir / "eval")
    good = str(synth_dir / "eval")
    # The grid runs (1e-3, good), (1e-9, good), (1e-3, broken), (1e-9, broken), in the file's order (not Tune's
    # alphabetical one, which would run both lr=1e-3 trials side by side and stop whichever of the two reaches the
    # first rung second with the higher loss: a coin toss). The last starts once two trials have ended, when both
    # good ones have recorded their loss at the first rung (a stopped trial's too), and is stopped there (smoke.yaml).
    space["params"] = {"optim.lr": space["params"]["optim.lr"], "data.eval": {"grid": [good, str(broken)]}}
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    db = tmp_path / "mlflow.db"
    overrides = [f"data.train={synth_dir / 'train'}", f"data.eval={good}", f"data.tokenizer={tokenizer_path}",
                 "data.synth_if_missing=false", f"run.storage_path={s3_prefix}/runs", f"tracking.uri=sqlite:///{db}"]
    _kill_data_stats_actor(ray_session)  # an earlier test's: the sweep must start its own where it lasts
    detached_before = set(_detached_actors())
    summary = run_sweep(str(tmp_path / "smoke.yaml"), overrides=overrides)
    # No detached actor (Ray Data's cluster-wide ones) joined a trial's placement group, and one stats actor served
    # the whole sweep. Made by a trial, it joined that trial's group and died with it (two or three times a sweep),
    # and a dataset registered with a dead one failed its updates ("Unhandled error ... KeyError" on the console).
    # (Ray Train's placement-group cleaners are detached too, and end with their runs.)
    made = {k: v for k, v in _detached_actors().items() if k not in detached_before}
    assert all(group is None for _, _, group in made.values()), made
    assert [state for cls, state, _ in made.values() if cls == "_StatsActor"] == ["ALIVE"], made
    sweep_dir = summary["sweep_dir"]
    assert sweep_dir == f"{s3_prefix}/runs/smoke"
    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{sweep_dir}/results.csv"))))
    assert len(rows) == 4 == summary["trials"] and summary["errors"] == 0
    started = [(float(r["param:optim.lr"]), r["param:data.eval"]) for r in sorted(rows, key=lambda r: r["trial_id"])]
    assert started == [(1e-3, good), (1e-9, good), (1e-3, str(broken)), (1e-9, str(broken))]
    assert all(r["status"] in ("completed", "stopped_early") for r in rows), rows
    for r in rows:
        assert 0 < float(r["gflops_spent"]) <= 300 * 1.05
        assert float(r["loss"]) > 0  # the sweep's metric (the training loss) whatever the evaluation did
    assert summary["stopped_early"] >= 1, rows  # an lr=1e-9 trial (still at init) loses to lr=1e-3 at the rung
    on_broken = [r for r in rows if r["param:data.eval"] == str(broken)]
    on_good = [r for r in rows if r["param:data.eval"] == good]
    for r in on_broken:  # the reason: the last evaluation's (the finetune's, or the rung's it was stopped at)
        assert "failed: ReclipError" in r["eval_error"] and "no readable rows" in r["eval_error"], r
        assert not any(r[k] for k in r if k.startswith("eval/full/")), r
    (done,) = [r for r in on_broken if r["status"] == "completed"]  # lr=1e-3 on the broken set trains to its end
    assert done["eval_error"].startswith("evaluation after 'finetune' failed") and done["eval_rounds"] == "2"
    stopped = next(r for r in on_broken if r["status"] == "stopped_early")
    assert stopped["eval_error"].startswith("evaluation at 150 GFLOPs failed"), stopped
    for r in on_good:
        assert r["eval_error"] == "" and 0 <= float(r["eval/full/colour/top1"]) <= 1, r
    with Image.open(io.BytesIO(storage.read_bytes(f"{sweep_dir}/pareto.png"))) as im:
        assert im.format == "PNG" and im.size[0] > 300
    (tmp_path / "best.yaml").write_text(storage.read_text(f"{sweep_dir}/best.yaml"))
    best = load_config(str(tmp_path / "best.yaml"))
    assert best.optim.lr == pytest.approx(1e-3)
    assert best.run.storage_path == f"{s3_prefix}/runs"  # not s3:/... (a Path would have mangled it)
    fs, inner = storage.filesystem(sweep_dir)
    listed = [i.path[len(inner) + 1:] for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))]
    assert any(p.startswith("tune/experiment_state") for p in listed), listed  # Tune's own state, on S3
    # Tune's per-trial logs (what `Tuner.restore(...).get_results()` reads), one of each per trial, and no TensorBoard
    # event files: the sweep turns Tune's TensorBoard logger off (it loaded torch into the driver for them)
    for name in ("result.json", "progress.csv"):
        assert sum(p.startswith("tune/") and p.endswith(f"/{name}") for p in listed) == 4, (name, listed)
    assert not any("tfevents" in p for p in listed), listed
    completed = [r for r in rows if r["status"] == "completed"]
    for r in completed:  # each finished trial's run folder: Ray Train's snapshot, the model, the run-state file
        trial = f"trials/smoke-{r['trial_id']}"
        assert {f"{trial}/checkpoint_manager_snapshot.json", f"{trial}/model/model.safetensors",
                f"{trial}/reclip_run.json"} <= set(listed), (trial, listed)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    wanted = {r["mlflow_run_id"]: {"completed": "FINISHED", "stopped_early": "KILLED"}[r["status"]] for r in rows}
    assert {c.info.run_id: c.info.status for c in children} == wanted
    tags = {c.info.run_id: {k for k in c.data.tags if k.startswith("reclip.eval_error.")} for c in children}
    assert tags[done["mlflow_run_id"]] == {"reclip.eval_error.gflops_150", "reclip.eval_error.lowres",
                                           "reclip.eval_error.finetune"}
    assert tags[stopped["mlflow_run_id"]] == {"reclip.eval_error.gflops_150"}
    assert not any(tags[r["mlflow_run_id"]] for r in on_good)
    # A finished trial closed its run itself (Tune did not stop it at its final report): its MLflow calls went
    # through its relay on this (the sweep driver's) node, which the relay's tags say, and its run state records it
    here = ray_session.get_runtime_context().get_node_id()
    finished = {c.info.run_id: c for c in children if c.info.run_id in {r["mlflow_run_id"] for r in completed}}
    assert {c.data.tags.get("reclip.tracking_relay_node") for c in finished.values()} == {here}
    for r in completed:
        assert "finished" in storage.read_json(f"{sweep_dir}/trials/smoke-{r['trial_id']}/reclip_run.json"), r
    # Stopped trials must not keep their worker groups' CPUs: the next Ray Train test would wait for them forever.
    _wait_for_placement_groups_removed(ray_session)
    assert {"results.csv", "pareto.png", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # The same command again restores the finished sweep from S3 and trains nothing: the same trials and results,
    # the same MLflow runs, each trial's steps logged once.
    def steps(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "samples"))

    logged = {r["mlflow_run_id"]: steps(r["mlflow_run_id"]) for r in rows}
    again = run_sweep(str(tmp_path / "smoke.yaml"), overrides=overrides)
    assert again["mlflow_parent_run_id"] == summary["mlflow_parent_run_id"]
    rerun_rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{sweep_dir}/results.csv"))))
    assert sorted(rerun_rows, key=lambda r: r["trial_id"]) == sorted(rows, key=lambda r: r["trial_id"])
    assert len(client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4
    assert {run_id: steps(run_id) for run_id in logged} == logged
    assert all(s == sorted(set(s)) for s in logged.values())


def test_a_sweep_ranked_by_an_evaluation_needs_trials_that_evaluate(tmp_path, monkeypatch):
    """Every trial would end with a NaN metric: a one-line error before Ray starts."""
    from reclip_ray.sweep import run_sweep
    from reclip_ray.train import launch

    def no_ray(*args, **kwargs):
        raise AssertionError("the sweep's config error must come before Ray starts")

    monkeypatch.setattr(launch, "init_ray", no_ray)
    space = tmp_path / "s.yaml"
    space.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: eval/full/shape/top1\nbudget: {gflops: 300}\n")
    with pytest.raises(ConfigError, match="metric eval/full/shape/top1 needs an eval set, but data.eval is empty"):
        run_sweep(str(space), overrides=["data.eval="])
    with pytest.raises(ConfigError, match="eval.at_phase_end is false"):
        run_sweep(str(space), overrides=["eval.at_phase_end=false"])


def _local_overrides(tmp_path, synth_dir, tokenizer_path) -> list[str]:
    """A sweep on the synthetic set with its run folder and MLflow store in ``tmp_path``."""
    return [f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}", f"data.tokenizer={tokenizer_path}",
            "data.synth_if_missing=false", f"run.storage_path={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def test_a_metric_of_a_label_set_the_eval_set_lacks_is_refused_before_ray_starts(tmp_path, monkeypatch, synth_dir,
                                                                                 tokenizer_path):
    """``color`` for the synthetic set's ``colour``: no report would carry it, and Tune would fail the whole sweep
    at the first trial's first rung."""
    from reclip_ray.sweep import run_sweep
    from reclip_ray.train import launch

    def no_ray(*args, **kwargs):
        raise AssertionError("the sweep's config error must come before Ray starts")

    monkeypatch.setattr(launch, "init_ray", no_ray)
    space = tmp_path / "s.yaml"
    space.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: eval/full/color/top1\nbudget: {gflops: 300}\n")
    overrides = _local_overrides(tmp_path, synth_dir, tokenizer_path)
    with pytest.raises(ConfigError, match=r"metric eval/full/color/top1: the eval set .* has no label set 'color'; "
                                          r"its label sets: .*colour"):
        run_sweep(str(space), overrides=overrides)
    from reclip_ray.sweep.run import check_metrics_in_eval_set

    eval_set = {"label_sets": {"colour": 10}, "has_captions": False}
    for metric, error in (("eval/full/colour/top5", None), ("eval/full/image_to_text_r@1", "has no captions")):
        space.write_text(f"params: {{optim.lr: {{grid: [1.0e-3]}}}}\nmetric: {metric}\nbudget: {{gflops: 300}}\n")
        with pytest.raises(ConfigError, match=error) if error else contextlib.nullcontext():
            check_metrics_in_eval_set(load_space(space), eval_set, "eval")


def test_a_rerun_with_an_edited_space_is_refused_where_tune_would_resume_the_old_sweep(tmp_path):
    """``Tuner.restore`` resumes a sweep as it started: an edited space would get the old trials as its results,
    and a changed domain failed on MLflow's "Changing param values is not allowed" (a traceback). One line before
    Ray starts; where Tune has no state (no trial ran), the edited sweep starts afresh in a parent run of its own."""
    from types import SimpleNamespace

    from reclip_ray.config import load_config
    from reclip_ray.sweep.run import _parent_run, sweep_definition

    sweep_dir, space = tmp_path / "s", tmp_path / "s.yaml"
    prep = SimpleNamespace(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cfg=load_config("tiny"))

    def open_parent(grid: str, overrides: list[str]) -> str:
        space.write_text(f"params: {{phases.0.image_size: {{grid: {grid}}}}}\nmetric: loss\nmode: min\n"
                         "budget: {gflops: 300}\n")
        loaded = load_space(space)
        return _parent_run(loaded, space.read_text(), prep, str(sweep_dir), "sweep-s",
                           sweep_definition(loaded, None, overrides))

    parent = open_parent("[32, 48]", ["train.batch_size=64"])
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "tune" / "tuner.pkl").write_bytes(b"")  # Tune's state: the sweep got to Tune
    assert open_parent("[32, 48]", ["train.batch_size=64"]) == parent  # the same sweep: resumed
    with pytest.raises(ConfigError, match=r"the sweep there started with another params, and a rerun resumes it"):
        open_parent("[32, 48, 64]", ["train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"started with another set \(or --set\), and"):
        open_parent("[32, 48]", ["train.batch_size=128"])
    (sweep_dir / "tune" / "tuner.pkl").unlink()
    assert open_parent("[32, 48, 64]", []) != parent
    # A base YAML counts by what it holds: `ray job submit` unpacks the working folder at a new path each time.
    copies = [tmp_path / "a" / "base.yaml", tmp_path / "b" / "base.yaml"]
    for copy in copies:
        copy.parent.mkdir()
        copy.write_text("name: tiny\n")
    assert sweep_definition(load_space(space), str(copies[0]), []) == sweep_definition(load_space(space),
                                                                                       str(copies[1]), [])
    # README: a rerun whose --config differs is refused as one whose space or --set does (the base was 'tiny')
    (sweep_dir / "tune" / "tuner.pkl").write_bytes(b"")
    loaded = load_space(space)
    with pytest.raises(ConfigError, match=r"started with another base \(or --config\), and a rerun resumes") as info:
        _parent_run(loaded, space.read_text(), prep, str(sweep_dir), "sweep-s",
                    sweep_definition(loaded, str(copies[0]), []))
    assert "\n" not in str(info.value)


def test_a_rerun_with_another_set_stops_before_ray_starts(tmp_path, monkeypatch, synth_dir, tokenizer_path):
    """README: the refusal above comes "before Ray starts": through ``run_sweep``, as the CLI and jobs/sweep.py call
    it, the first run gets to Ray (Tune's state then in the sweep folder) and the edited rerun does not."""
    from reclip_ray.sweep import run_sweep
    from reclip_ray.train import launch

    class RayReached(Exception):
        pass

    def ray(*args, **kwargs):
        raise RayReached

    monkeypatch.setattr(launch, "init_ray", ray)
    space = tmp_path / "s.yaml"
    space.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: loss\nbudget: {gflops: 300}\n")
    overrides = _local_overrides(tmp_path, synth_dir, tokenizer_path)
    with pytest.raises(RayReached):
        run_sweep(str(space), overrides=overrides)
    (tmp_path / "s" / "tune").mkdir(parents=True, exist_ok=True)
    (tmp_path / "s" / "tune" / "tuner.pkl").write_bytes(b"")  # Tune's state: the sweep got to Tune
    with pytest.raises(ConfigError, match=r"s: the sweep there started with another set \(or --set\), and a rerun "
                                          r"resumes it as it started"):
        run_sweep(str(space), overrides=[*overrides, "train.seed=1"])
    with pytest.raises(RayReached):
        run_sweep(str(space), overrides=overrides)  # as it was: resumed


def test_a_sweep_counts_its_base_file_by_what_it_holds_and_a_preset_by_its_name(tmp_path, monkeypatch):
    """The definition a rerun compares holds the base file's settings: an edit of a file without a YAML suffix
    (recorded by its path, its edits unseen) is seen, a comment is not one, and two copies at two paths are one sweep.
    A preset counts by name: an upgrade that changes it does not refuse the sweep, whose trials Tune resumes with the
    config they started with. A record of the form written before (a YAML base as its text) still resumes."""
    import yaml

    import reclip_ray.sweep.run as run
    from reclip_ray.sweep.run import _continues_sweep, sweep_definition

    space_file, sweep_dir = tmp_path / "s.yaml", tmp_path / "s"
    space_file.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: loss\nbudget: {gflops: 300}\n")
    space = load_space(space_file)
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "tune" / "tuner.pkl").write_bytes(b"")  # Tune's state: a rerun would resume the sweep

    def rerun(before: dict, config: str | None) -> bool:
        return _continues_sweep({"definition": before}, sweep_definition(space, config, []), str(sweep_dir), space)

    plain = tmp_path / "base"  # a config file load_raw reads whatever its suffix
    plain.write_text("name: mine\ntrain: {seed: 1}\n")
    started = sweep_definition(space, str(plain), [])
    plain.write_text("name: mine\ntrain: {seed: 1}  # a comment is no edit\n")
    assert rerun(started, str(plain))
    plain.write_text("name: mine\ntrain: {seed: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(sweep_dir))}: the sweep there started with another "
                                          r"base \(or --config\), and a rerun resumes it as it started"):
        rerun(started, str(plain))
    assert started["base"] == {"name": "mine", "train": {"seed": 1}}

    # A preset by its name: an upgrade of reclip-ray that changes it is no edit of the sweep
    started = sweep_definition(space, "tiny", [])
    monkeypatch.setattr(run, "load_raw", lambda name: {"name": "tiny", "train": {"seed": 99}})
    assert sweep_definition(space, "tiny", []) == started and rerun(started, "tiny")
    monkeypatch.undo()

    # Records written before: a YAML base as its text (the name a file without one takes is its stem, not in it)
    base = tmp_path / "a" / "base.yaml"
    base.parent.mkdir()
    base.write_text("train: {seed: 1}\n")
    old_form = {**sweep_definition(space, str(base), []), "base": base.read_text()}
    assert sweep_definition(space, str(base), [])["base"] == {"train": {"seed": 1}, "name": "base"}
    assert rerun(old_form, str(base))
    assert rerun({**old_form, "base": "tiny"}, "tiny")  # a preset's old record is its name, as now
    assert rerun({**old_form, "base": str(plain)}, str(plain))  # another suffix's: its path, content unknown
    base.write_text(yaml.safe_dump({"train": {"seed": 2}}))
    with pytest.raises(ConfigError, match=r"started with another base \(or --config\)"):
        rerun(old_form, str(base))
    with pytest.raises(ConfigError, match=r"started with another base \(or --config\)"):
        rerun({**old_form, "base": "tiny"}, str(base))  # a preset then, a file now


def test_a_sweep_whose_saved_asha_ranks_the_loss_highest_first_is_refused_and_a_fifo_one_resumes(tmp_path):
    """A sweep started before ``mode`` defaulted to ``min`` for ``metric: loss`` recorded ``mode: max`` (or nothing,
    before the record existed), and Tune saved its ASHA with mode max in ``tune/tuner.pkl``: ``Tuner.restore`` resumes
    it with that scheduler, which keeps the trials with the highest loss, while the results rank by min. Refused in
    one line naming the folder. Under FIFO Tune never acted on the mode: that sweep resumes, ranked by min. The
    state here is Tune's own, written by a ``Tuner`` the sweep's way (making one starts no Ray)."""
    import dataclasses

    from ray import tune

    from reclip_ray.sweep.asha import make_scheduler
    from reclip_ray.sweep.run import _continues_sweep, sweep_definition
    from reclip_ray.sweep.space import tune_param_space

    axis = {"max_t": 300.0, "grace": 75.0, "reduction_factor": 2.0}

    def saved_sweep(name: str, space, scheduler, metric=None, mode=None) -> Path:
        """A sweep folder with Tune's state as a Tuner made with ``scheduler`` saves it."""
        tune.Tuner(lambda config: None, param_space=tune_param_space(space, {}),
                   tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler),
                   run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path / name)))
        return tmp_path / name

    def rerun(sweep_dir: Path, state: dict, space) -> bool:
        return _continues_sweep(state, sweep_definition(space, None, []), str(sweep_dir), space)

    space_file = tmp_path / "s.yaml"
    space_file.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: loss\nbudget: {gflops: 300}\n")
    space = load_space(space_file)  # mode min: the default for loss now
    before = dataclasses.replace(space, mode="max")  # what the same file gave before
    refused = (rf"^{re.escape(str(tmp_path / 'old'))}: the sweep there has Tune's ASHA keep the trials with the "
               r"highest loss at each rung \(mode max: it started before a loss was minimised by default\), and a "
               r"rerun resumes it with that scheduler, where this space's uses mode min: give this sweep another "
               r"name \(the space's name:\) to run it afresh$")
    old = saved_sweep("old", space, make_scheduler(before, axis))
    with pytest.raises(ConfigError, match=refused):
        rerun(old, {}, space)  # started before sweep_state.json held a definition
    with pytest.raises(ConfigError, match=refused):
        rerun(old, {"definition": sweep_definition(before, None, [])}, space)  # its definition says mode max
    now = saved_sweep("now", space, make_scheduler(space, axis))
    assert rerun(now, {"definition": sweep_definition(space, None, [])}, space)

    fifo = dataclasses.replace(space, scheduler={**space.scheduler, "name": "fifo"})
    old_fifo = saved_sweep("old_fifo", fifo, make_scheduler(fifo, None), "loss", "max")
    assert rerun(old_fifo, {"definition": sweep_definition(dataclasses.replace(fifo, mode="max"), None, [])}, fifo)
    assert rerun(old_fifo, {}, fifo)

    # A scheduler.metric loss under an evaluation metric was ranked by the sweep's mode (max) before 7a709bb
    space_file.write_text("params: {optim.lr: {grid: [1.0e-3]}}\nmetric: eval/full/shape/top1\n"
                          "scheduler: {metric: loss}\nbudget: {gflops: 300}\n")
    evaluated = load_space(space_file)
    legacy = saved_sweep("legacy", evaluated, tune.schedulers.ASHAScheduler(
        time_attr="gflops_total", metric="loss", mode="max", max_t=300.0, grace_period=75.0))
    with pytest.raises(ConfigError, match=r"keep the trials with the highest loss at each rung"):
        rerun(legacy, {}, evaluated)
    # A mode edited since on a sweep that records one is an edit, named as one
    flipped = dataclasses.replace(evaluated, mode="min", scheduler={**evaluated.scheduler, "metric": None})
    edited = saved_sweep("edited", evaluated, make_scheduler(dataclasses.replace(flipped, mode="max"), axis))
    with pytest.raises(ConfigError, match=r"started with another mode, and a rerun resumes it as it started"):
        rerun(edited, {"definition": sweep_definition(dataclasses.replace(flipped, mode="max"), None, [])}, flipped)


def test_the_sweep_metric_view_is_named_in_the_sweep_module():
    from reclip_ray.run_names import FULL, full_view

    metrics = {"eval/32px/shape/top1": 0.5, "eval/64px/shape/top1": 0.3, "eval/64px/image_to_text_r@1": 0.1,
               "loss": 4.0}
    assert full_view(64, metrics) == {FULL + "shape/top1": 0.3, FULL + "image_to_text_r@1": 0.1}
    assert full_view(112, metrics) == {}


def _moved_sweep(tmp_path: Path, monkeypatch, tokenizer_path: Path, between=None) -> dict:
    """A sweep launched the way ``ray job submit --working-dir . -- python jobs/sweep.py --space tune_spaces/s.yaml``
    launches it, twice: each submit runs in Ray's copy of the working dir, named by a hash of its files
    (``_ray_pkg_<hash>``: an edit between the submits makes another), and the space names its data and tokenizer
    relative to it; the outputs go to ``$RECLIP_RAY_HOME``. The first launch opens the sweep (``open_sweep``) and
    builds the config Tune saves for a trial (``_setup`` and the trial's parameters); then Tune's state is there and
    Ray's cache deletes the first copy, and ``between`` runs (an upgrade). Returns the space, the two launches'
    ``OpenSweep``s (cwd left in the second's copy) and that saved trial config. The caller releases the second's
    lease."""
    import json
    import shutil

    from reclip_ray.config import apply_overrides, from_dict, load_raw
    from reclip_ray.data.synth import make_synthetic
    from reclip_ray.sweep.run import open_sweep, sweep_definition
    from reclip_ray.sweep.space import tune_param_space
    from reclip_ray.sweep.trainable import trial_setup

    first, second, home = tmp_path / "_ray_pkg_aaaa", tmp_path / "_ray_pkg_bbbb", tmp_path / "home"
    make_synthetic(first / "data", train=64, eval=32, seed=0, shard_rows=32)
    shutil.copy(tokenizer_path, first / "tok.json")
    (first / "tune_spaces").mkdir()
    (first / "tune_spaces" / "s.yaml").write_text(
        "name: moved\nbase: tiny\n"
        "set: [data.train=data/train, data.eval=data/eval, data.tokenizer=tok.json, data.synth_if_missing=false]\n"
        "params:\n  optim.lr: {grid: [1.0e-3, 1.0e-4]}\n  data.eval: {grid: [data/eval]}\n"
        "metric: loss\nmode: min\nbudget: {samples: 1280}\nscheduler: {name: fifo}\n")
    shutil.copytree(first, second)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "."}}))
    monkeypatch.setenv("RECLIP_RAY_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def launch():  # run_sweep's steps up to Tune
        space = load_space("tune_spaces/s.yaml")
        base = from_dict(apply_overrides(load_raw(space.base), space.overrides))
        return space, open_sweep(space, "tune_spaces/s.yaml", base, definition=sweep_definition(space, None, []))

    monkeypatch.chdir(first)
    space, opened = launch()
    setup = trial_setup(space, None, base_raw=opened.base_raw, sweep_dir=opened.sweep_dir,
                        experiment=opened.experiment, parent_run_id=opened.parent)
    saved = {"p00_optim/lr": 1e-3, "p01_data/eval": "data/eval", "_setup": json.dumps(setup)}
    assert set(saved) == set(tune_param_space(space, setup))  # the keys Tune saves a trial's config under
    opened.lease.release()
    (Path(opened.sweep_dir) / "tune").mkdir()
    (Path(opened.sweep_dir) / "tune" / "tuner.pkl").write_bytes(b"")  # Tune's state: a rerun resumes the sweep
    monkeypatch.chdir(second)
    shutil.rmtree(first)  # Ray's cache of working dirs dropped the first copy
    if between is not None:
        between()
    _, resumed = launch()
    return {"space": space, "first": opened, "second": resumed, "saved": saved, "home": home}


def test_a_sweep_resumed_by_another_ray_job_submit_reads_its_relative_inputs_from_that_submits_copy(
        tmp_path, monkeypatch, tokenizer_path):
    """Tune resumes a trial with the config it saved at the sweep's start. That config held the data, eval set and
    tokenizer as absolute paths into the first submit's copy of the working dir, which the next submit (a new hash
    after any edit) does not run in and Ray may have deleted: the resumed trial failed on "data.train not found".
    Inputs given relative stay relative in the saved config and resolve in the current launch's folder; outputs stay
    in $RECLIP_RAY_HOME where the trial's checkpoints and MLflow run are; the two submits are one sweep."""
    from reclip_ray.config import from_dict
    from reclip_ray.sweep import trainable
    from reclip_ray.sweep.trainable import trial_run_raw, tune_trainable
    from reclip_ray.train.prepare import prepare

    moved = _moved_sweep(tmp_path, monkeypatch, tokenizer_path)
    first, second, saved, home = moved["first"], moved["second"], moved["saved"], moved["home"]
    try:
        # The second submit is the same sweep (its base and overrides are the same; only the folder moved)
        assert (second.sweep_dir, second.parent) == (first.sweep_dir, first.parent)
        before = trial_run_raw(saved, "t1", first.launch_dir)  # the trial as the first submit ran it
        copy = Path(first.launch_dir)
        assert [before["data"][k] for k in ("train", "eval", "tokenizer")] == \
            [str(copy / "data" / "train"), str(copy / "data" / "eval"), str(copy / "tok.json")]
        resumed = trial_run_raw(saved, "t1", second.launch_dir)
        here = Path(second.launch_dir)
        assert [resumed["data"][k] for k in ("train", "eval", "tokenizer")] == \
            [str(here / "data" / "train"), str(here / "data" / "eval"), str(here / "tok.json")], resumed["data"]
        # Outputs as the sweep started: its folder and MLflow store, under $RECLIP_RAY_HOME, not in either copy
        assert resumed["run"] == before["run"] and resumed["tracking"] == before["tracking"]
        assert resumed["run"]["storage_path"] == str(home.resolve() / "reclip_runs" / "moved" / "trials")
        assert resumed["tracking"]["uri"] == f"sqlite:///{home.resolve() / 'mlflow.db'}"
        # The trial's own launch (run_training's prepare) runs in Tune's trial folder: it finds every input
        trial_dir = tmp_path / "trial_dir"
        trial_dir.mkdir()
        monkeypatch.chdir(trial_dir)
        assert prepare(from_dict(resumed)).tokenizer_path == str(here / "tok.json")
        # The launch's folder reaches the trial beside its config, which Tune keeps (with_parameters)
        seen = []

        def _run_trial(config: dict, launch_dir: str) -> None:  # the trial, its name (which Tune checks) kept
            seen.append((config, launch_dir))

        monkeypatch.setattr(trainable, "_run_trial", _run_trial)
        fn = tune_trainable(moved["space"], second.launch_dir)
        fn(saved)
        assert seen == [(saved, second.launch_dir)] and fn.__name__ == "_run_trial"
    finally:
        second.lease.release()


def test_best_yaml_is_the_best_trials_own_config_not_the_resumed_sweeps_base(tmp_path, monkeypatch, tokenizer_path):
    """best.yaml was built from the base config of the launch that wrote it. A rerun's base may differ where the
    sweep's definition allows (a preset an upgrade changed: the sweep counts a preset by its name), while Tune
    resumed its trials with the base they started with: best.yaml named a model the best trial never trained. It is
    the best trial's own config; input paths given relative stay relative, so ``reclip-ray train --config best.yaml``
    reads them where it runs, as the sweep's trials did."""
    from types import SimpleNamespace

    import yaml

    from reclip_ray import config as config_module
    from reclip_ray.config import from_dict, load_config
    from reclip_ray.sweep import run
    from reclip_ray.sweep.run import finish_sweep
    from reclip_ray.sweep.trainable import trial_run_raw
    from reclip_ray.train.prepare import prepare

    # An upgrade between the two submits made the tiny preset wider
    wider = {**config_module.MODEL_PRESETS["tiny"], "embed_dim": 96}
    moved = _moved_sweep(tmp_path, monkeypatch, tokenizer_path,
                         between=lambda: monkeypatch.setitem(config_module.MODEL_PRESETS, "tiny", wider))
    first, second, saved, space = moved["first"], moved["second"], moved["saved"], moved["space"]
    try:
        assert second.parent == first.parent and second.base_raw["model"]["embed_dim"] == 96  # the same sweep
        worse = {**saved, "p00_optim/lr": 1e-4}

        def result(trial_id: str, config: dict, loss: float) -> SimpleNamespace:
            return SimpleNamespace(config=config, error=None, metrics={
                "trial_id": trial_id, "loss": loss, "eval_round": 2, "eval_rounds_planned": 2,
                "gflops_total": 10.0, "samples": 1280})

        monkeypatch.setattr(run, "UNFINISHED", [])  # as run_sweep clears it before Tune runs (no trial unfinished)
        summary = finish_sweep([result("t2", worse, 2.0), result("t1", saved, 1.0)], space, second, n_phases=2)
        assert summary["best"]["params"] == {"optim.lr": 1e-3, "data.eval": "data/eval"}
        best_raw = yaml.safe_load((Path(second.sweep_dir) / "best.yaml").read_text())
        assert best_raw["model"]["embed_dim"] == 128, best_raw["model"]  # what the trial trained, not the preset now
        assert [best_raw["data"][k] for k in ("train", "eval", "tokenizer")] == ["data/train", "data/eval", "tok.json"]
        assert best_raw["run"]["name"] == "moved-best"
        assert best_raw["run"]["storage_path"] == str(moved["home"].resolve() / "reclip_runs")
        # `reclip-ray train --config best.yaml` in the second copy trains what the best trial trained there
        best = prepare(load_config(str(Path(second.sweep_dir) / "best.yaml"))).cfg
        trial = from_dict(trial_run_raw(saved, "t1", second.launch_dir))
        for section in ("model", "phases", "train", "optim", "data", "scaling", "checkpoint"):
            assert getattr(best, section) == getattr(trial, section), section
        # Launched from a shell (no job's temporary copy), best.yaml names its inputs absolute: it runs from anywhere
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
        finish_sweep([result("t1", saved, 1.0)], space, second, n_phases=2)
        best_raw = yaml.safe_load((Path(second.sweep_dir) / "best.yaml").read_text())
        assert [best_raw["data"][k] for k in ("train", "eval", "tokenizer")] == [
            str(Path.cwd() / name) for name in ("data/train", "data/eval", "tok.json")]
    finally:
        second.lease.release()


def test_only_inputs_given_relative_follow_the_launchs_folder(tmp_path):
    """What a sweep keeps relative for its trials (``keep_relative_inputs``) and how a trial resolves it
    (``resolve_inputs``): absolute paths, ``~``, URIs, an empty eval set, a tokenizer trained at launch (an output,
    in the sweep folder) and ``data.tokenizer: clip`` (a name, unless the launch's folder has a file of that name)
    are used as given; outputs are not inputs."""
    from reclip_ray.config import absolute
    from reclip_ray.sweep.trial_config import keep_relative_inputs, resolve_inputs

    given = {"data": {"train": "s3://bucket/train", "eval": "", "tokenizer": "clip"},
             "model": {"init_from": "~/weights/model.pt"}, "run": {"storage_path": "runs"}}
    prepared = {"data": {"train": "s3://bucket/train", "eval": "", "tokenizer": "clip"},
                "model": {"init_from": absolute("~/weights/model.pt")}, "run": {"storage_path": "/home/u/runs"}}
    assert keep_relative_inputs(prepared, given) == prepared
    assert resolve_inputs(prepared, str(tmp_path)) == prepared
    given = {"data": {"train": "data/train", "eval": "/abs/eval", "tokenizer": ""}, "model": {"init_from": "w.pt"}}
    prepared = {"data": {"train": absolute("data/train"), "eval": "/abs/eval", "tokenizer": "/sweep/tokenizer.json"},
                "model": {"init_from": absolute("w.pt")}}
    kept = keep_relative_inputs(prepared, given)
    assert kept == {"data": {"train": "data/train", "eval": "/abs/eval", "tokenizer": "/sweep/tokenizer.json"},
                    "model": {"init_from": "w.pt"}}
    assert resolve_inputs(kept, str(tmp_path)) == {
        "data": {"train": str(tmp_path / "data" / "train"), "eval": "/abs/eval", "tokenizer": "/sweep/tokenizer.json"},
        "model": {"init_from": str(tmp_path / "w.pt")}}
    assert resolve_inputs({"model": "tiny", "data": {"tokenizer": "clip"}}, str(tmp_path)) == \
        {"model": "tiny", "data": {"tokenizer": "clip"}}  # a preset's name, OpenAI's tokenizer
    (tmp_path / "clip").write_text("{}")
    assert resolve_inputs({"data": {"tokenizer": "clip"}}, str(tmp_path))["data"]["tokenizer"] == str(tmp_path / "clip")
