"""MLflow helpers against a real SQLite store (no Ray)."""

from __future__ import annotations

import pytest

from conftest import fresh_mlflow_db
from reclip_ray import tracking, tracking_relay
from reclip_ray.config import load_config


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri() == "http://mlflow:5000"


def test_in_a_ray_jobs_temporary_working_dir_outputs_go_to_reclip_ray_home(tmp_path, monkeypatch):
    """``ray job submit --working-dir`` runs the entrypoint in Ray's copy of the folder, named by a hash of its files:
    the default MLflow store and run folder made there were lost at the next edit of the code (a new, empty store),
    or when Ray cleared its cache. Outputs go to $RECLIP_RAY_HOME there; inputs still resolve in the copy."""
    import json

    from reclip_ray import lease
    from reclip_ray.config import absolute
    from reclip_ray.job_dir import output_base, output_note

    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RECLIP_RAY_HOME", str(tmp_path / "home"))
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {"job_submission_id": "raysubmit"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    home = tmp_path / "home"
    assert tracking.resolve_tracking_uri() == f"sqlite:///{home / 'mlflow.db'}" and home.is_dir()
    assert tracking.resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{home / 'sub' / 'x.db'}"
    assert absolute("reclip_runs", output_base()) == str(home / "reclip_runs")
    assert absolute("reclip_data/train") == str(pkg / "reclip_data" / "train")  # submitted with the job
    assert str(home) in output_note()
    assert lease._ray_job() == "raysubmit"  # the lease's refusal names the job from the same config (ray_job_config)
    # A job without --working-dir, or no job: the working directory, as before
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    assert tracking.resolve_tracking_uri() == f"sqlite:///{pkg / 'mlflow.db'}" and output_note() is None
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert output_base() == pkg and lease._ray_job() is None


def test_a_ray_jobs_launch_puts_its_run_folder_and_store_in_home_reclip_ray_and_says_so(tmp_path, monkeypatch, capsys,
                                                                                       synth_dir, tokenizer_path):
    """README (On a cluster) and jobs/runtime_env.yaml: a job's relative outputs, the default ``mlflow.db`` and the
    default ``run.storage_path`` among them, go to ``$RECLIP_RAY_HOME``, by default ``~/reclip-ray``; the job's log
    says so, and relative data paths still name the submitted files. The test above checks the helpers; this one
    the launch's own ``prepare``, with the tiny preset's defaults (``reclip_runs``, no tracking URI)."""
    import json
    import shutil

    from reclip_ray.config import load_config
    from reclip_ray.train.prepare import prepare

    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    for split in ("train", "eval"):
        shutil.copytree(synth_dir / split, pkg / "reclip_data" / split)  # submitted with the job
    monkeypatch.chdir(pkg)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RECLIP_RAY_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    cfg = load_config("tiny", [f"data.tokenizer={tokenizer_path}", "data.synth_if_missing=false"])
    assert (cfg.run.storage_path, cfg.tracking.uri) == ("reclip_runs", "")  # the defaults this is about
    capsys.readouterr()
    prep = prepare(cfg)
    home = tmp_path / "user" / "reclip-ray"
    assert prep.run_dir == str(home / "reclip_runs" / "tiny")
    assert prep.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert prep.cfg.data.train == str(pkg / "reclip_data" / "train")
    assert prep.cfg.data.eval == str(pkg / "reclip_data" / "eval")
    assert not (pkg / "reclip_runs").exists() and not (pkg / "mlflow.db").exists()
    note = [line for line in capsys.readouterr().out.splitlines() if "temporary copy of --working-dir" in line]
    assert note == [f"[reclip] this job's working directory {pkg} is Ray's temporary copy of --working-dir: relative "
                    f"outputs (run folder, MLflow store) go to {home} ($RECLIP_RAY_HOME, default ~/reclip-ray)"]


def test_uris_without_a_double_slash_are_uris_not_sqlite_files(tmp_path, monkeypatch):
    """MLflow reads ``databricks`` and ``file:/x`` as stores; taken for bare paths they became SQLite files named
    ``./databricks`` and ``./file:/x`` where every run landed unseen. Databricks is a server (no relay)."""
    monkeypatch.chdir(tmp_path)
    for uri, local in (("databricks", False), ("databricks-uc", False), (f"file:{tmp_path}/mlruns", True),
                       (f"file://{tmp_path}/mlruns", True)):
        assert (tracking.resolve_tracking_uri(uri), tracking.is_local_store(uri)) == (uri, local)
    assert tracking.resolve_tracking_uri("runs/mlflow.db") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking.is_local_store("runs/mlflow.db")


def test_a_tag_named_after_a_phase_lands_whatever_the_phases_name(tmp_path):
    """``reclip.eval_error.PHASE`` (README) and ``reclip.data_source.PHASE``: MLflow refused a key with '(' and the
    tag was lost (in a worker, as a warning); its characters are kept as a metric name's are."""
    uri = f"sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}"
    cfg = load_config("tiny", ["phases.0.name=lowres (32 px)"])
    run_id = tracking.start_or_resume_run(uri, "exp", "r", None, cfg)
    tracking.set_tags(uri, run_id, {f"reclip.eval_error.{cfg.phases[0].name}": "evaluation failed: X"})
    tags = tracking.client(uri).get_run(run_id).data.tags
    assert tags["reclip.eval_error.lowres _32 px_"] == "evaluation failed: X"


def test_flatten_uses_override_paths():
    flat = tracking.flatten(load_config("tiny").to_dict())
    assert flat["phases.1.image_size"] == 64
    assert flat["model.vision.patch_size"] == 8
    assert flat["optim.betas"] == [0.9, 0.98]


def test_run_is_resumed_not_duplicated(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny")
    run_id = tracking.start_or_resume_run(uri, "exp", "r", None, cfg)
    tracking.log_metrics(uri, run_id, {"loss": 2.0, "not_a_number": "x"}, step=1)
    tracking.end_run(uri, run_id, "FAILED")
    again = tracking.start_or_resume_run(uri, "exp", "r", run_id, cfg)
    assert again == run_id
    tracking.log_metrics(uri, run_id, {"loss": 1.0}, step=2)
    tracking.end_run(uri, run_id, "FINISHED")
    c = tracking.client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["reclip.restarts"] == "1"
    assert run.data.params["phases.0.image_size"] == "32"
    assert tracking.last_logged_step(uri, run_id) == 2
    assert "not_a_number" not in run.data.metrics
    exp = c.get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert len(c.search_runs([exp.experiment_id])) == 1


def test_a_new_run_starts_only_where_the_store_has_no_such_run_or_it_was_deleted(tmp_path, monkeypatch):
    """A restart reopens the MLflow run its run folder names. A new run is right where the store never had it (the
    folder's run is in another store) or it was deleted (the restart would log into a run no one sees); any other
    error, a server that answered 503 or not at all, started a new run too and split one run's history into two.
    That is an error now, naming the store and the run, and a rerun once the store answers resumes the run."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import RestException
    from mlflow.tracking import MlflowClient

    from reclip_ray.errors import ReclipError

    uri = f"sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}"
    cfg = load_config("tiny")
    c = tracking.client(uri)
    run_id = tracking.start_or_resume_run(uri, "exp", "r", "0" * 32, cfg)  # SQLite: RESOURCE_DOES_NOT_EXIST
    assert run_id != "0" * 32
    deleted = tracking.start_or_resume_run(uri, "exp", "gone", None, cfg)
    c.delete_run(deleted)
    assert tracking.start_or_resume_run(uri, "exp", "gone", deleted, cfg) not in (deleted, run_id)
    exp = c.get_experiment_by_name("exp").experiment_id
    runs = {r.info.run_id for r in c.search_runs([exp], run_view_type=ViewType.ALL)}
    assert len(runs) == 3
    for error in (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "overloaded"}),
                  ConnectionError("Connection refused")):
        def unreachable(self, run_id, error=error):
            raise error

        with monkeypatch.context() as m:
            m.setattr(MlflowClient, "get_run", unreachable)
            with pytest.raises(ReclipError) as info:
                tracking.start_or_resume_run(uri, "exp", "r", run_id, cfg)
        assert str(info.value) == (f"MLflow at {uri} could not read run {run_id}, which this run continues (no new "
                                   f"run started: rerun once it can): {error}")
    assert {r.info.run_id for r in c.search_runs([exp], run_view_type=ViewType.ALL)} == runs
    assert tracking.start_or_resume_run(uri, "exp", "r", run_id, cfg) == run_id
    assert c.get_run(run_id).data.tags["reclip.restarts"] == "1"


def test_a_relaunch_whose_mlflow_run_the_store_cannot_read_stops_in_one_line_before_ray(make_cfg, monkeypatch):
    """RELIABILITY: the MLflow server errors when a relaunch reopens the run: the launch exits with one line naming
    the store and the run, before Ray starts, and no second MLflow run is made (the test above calls
    ``start_or_resume_run`` itself, with one-line errors; a server's error page is many lines). No attempt is
    counted, and the launch once the store answers resumes the same run."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from reclip_ray.errors import ReclipError
    from reclip_ray.train import launch
    from reclip_ray.train.run_state import read_run_state, write_run_state

    def no_ray(*args, **kwargs):
        raise AssertionError("the launch must stop before Ray starts")

    monkeypatch.setattr(launch, "init_ray", no_ray)
    cfg = make_cfg("relaunch")
    prep = launch.prepare(cfg)
    run_id = tracking.start_or_resume_run(prep.tracking_uri, prep.experiment, prep.run_name, None, prep.cfg)
    write_run_state(prep.run_dir, {"mlflow_run_id": run_id, "tracking_uri": prep.tracking_uri, "attempts": 1})
    page = "503 Service Unavailable\n<html>\n<body>upstream connect error</body>\n</html>"

    def unavailable(self, run_id):
        raise MlflowException(page, error_code="TEMPORARILY_UNAVAILABLE")

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "get_run", unavailable)
        with pytest.raises(ReclipError) as info:
            launch.run_training(make_cfg("relaunch"))
    assert str(info.value) == (f"MLflow at {prep.tracking_uri} could not read run {run_id}, which this run "
                               "continues (no new run started: rerun once it can): 503 Service Unavailable")
    c = tracking.client(prep.tracking_uri)
    runs = c.search_runs([c.get_experiment_by_name(prep.experiment).experiment_id], run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in runs] == [run_id]
    assert read_run_state(prep.run_dir)["attempts"] == 1
    with pytest.raises(AssertionError, match="before Ray starts"):  # the store answers: the run reopens, then Ray
        launch.run_training(make_cfg("relaunch"))
    assert read_run_state(prep.run_dir) == {"mlflow_run_id": run_id, "tracking_uri": prep.tracking_uri, "attempts": 2}


def test_a_restarts_reads_take_the_runs_latest_points_not_a_metrics_history(tmp_path, monkeypatch):
    """A restart reads the last step logged (``last_logged_step``) and a few latest values (``latest_metric``). They
    come from the run's latest points (one row per key), not from the key's whole history, which a multi-day run makes
    hundreds of thousands of points long (seconds to read, and past 60 s a read through the relay fails). Checked
    against the history, with points logged out of step order, a step logged twice and a key never logged."""
    import random
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}"
    run_id = tracking.start_or_resume_run(uri, "exp", "r", None, load_config("tiny"))
    rng, now = random.Random(0), int(time.time() * 1000)
    points = {key: [Metric(key, rng.uniform(0, 5), now + rng.randrange(10_000), rng.randrange(1, 400))
                    for _ in range(300)] for key in ("loss", "restarts")}
    top = max(points["loss"], key=lambda m: m.step)
    points["loss"].append(Metric("loss", 0.25, top.timestamp + 1, top.step))  # the same step again, logged later
    tracking.client(uri).log_batch(run_id, metrics=[m for ms in points.values() for m in ms])

    def reference(key):
        history = tracking.client(uri).get_metric_history(run_id, key)
        return max(history, key=lambda m: (m.step, m.timestamp), default=None)

    expected = {key: reference(key) for key in ("loss", "restarts", "never")}
    assert expected["loss"].value == 0.25 and expected["never"] is None
    monkeypatch.setattr(MlflowClient, "get_metric_history", lambda *a, **k: pytest.fail("read a whole history"))
    for key in ("loss", "restarts"):
        assert tracking.last_logged_step(uri, run_id, key) == expected[key].step
        assert tracking.latest_metric(uri, run_id, key) == expected[key].value
    assert tracking.last_logged_step(uri, run_id, "never") == -1
    assert tracking.latest_metric(uri, run_id, "never") is None


# ------------------------------------------------------------------------------------------------ relay retries


class _Handle:
    """A TrackingRelay actor handle as the workers use it, run in this process: ``handle.call.remote(...)`` runs the
    call at once and returns a stand-in for its object ref, which ``_wait`` below resolves."""

    def __init__(self, relay: tracking_relay.TrackingRelay) -> None:
        self.relay = relay

    def __getattr__(self, method: str):
        handle = self

        class _Method:
            def remote(self, *args):
                try:
                    return "ok", getattr(handle.relay, method)(*args)
                except Exception as exc:  # noqa: BLE001 - delivered by _wait, as ray.get would
                    return "error", exc

        return _Method()


def _relay_world(monkeypatch, tmp_path, lose_replies: int = 0, restart_after_call: bool = False, fail: bool = False):
    """A relay handle whose first ``lose_replies`` replies never arrive (the call itself ran: a timeout), optionally
    replaced by a fresh relay (a restart: it remembers no call ids) after its first call, or failing every call."""
    uri = f"sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}"
    run_id = tracking.start_or_resume_run(uri, "exp", "r", None, load_config("tiny"))
    handle = _Handle(tracking_relay.TrackingRelay())
    waits: list[float] = []
    state = {"lose": lose_replies}

    def wait(ref, timeout_s):
        waits.append(timeout_s)
        if restart_after_call and len(waits) == 1:
            handle.relay = tracking_relay.TrackingRelay()
            tracking_relay.use_relay(handle)  # (a relay clears this process's relay: here it shares the test's process)
        if fail:
            raise TimeoutError("the relay did not answer")
        kind, value = ref
        if state["lose"] > 0:
            state["lose"] -= 1
            raise TimeoutError("reply lost")
        if kind == "error":
            raise value
        return value

    monkeypatch.setattr(tracking_relay, "_wait", wait)
    monkeypatch.setattr(tracking_relay, "RELAY_BACKOFF_S", 0.01)  # > 1 ms: a timestamp taken at each try would differ
    tracking_relay.use_relay(handle)
    return uri, run_id, handle, waits


def _points(uri, run_id, key):
    return [(m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key)]


def test_a_retried_relay_call_writes_one_point(monkeypatch, tmp_path):
    uri, run_id, handle, waits = _relay_world(monkeypatch, tmp_path, lose_replies=1)
    try:
        tracking.log_metrics(uri, run_id, {"loss": 2.0, "lr": 0.1}, step=7)
        tracking.set_tags(uri, run_id, {"reclip.x": "y"})
        assert tracking.last_logged_step(uri, run_id) == 7
    finally:
        tracking_relay.use_relay(None)
    assert waits == [tracking_relay.RELAY_TIMEOUT_S] * 4  # every wait is bounded; the first reply was lost and retried
    assert _points(uri, run_id, "loss") == [(7, 2.0)] and _points(uri, run_id, "lr") == [(7, 0.1)]
    assert handle.relay.calls == 3  # the retried call ran once: the relay answered it from its call-id memory
    assert tracking.client(uri).get_run(run_id).data.tags["reclip.x"] == "y"


def test_a_relay_restarted_between_tries_still_writes_one_point(monkeypatch, tmp_path):
    uri, run_id, handle, _ = _relay_world(monkeypatch, tmp_path, lose_replies=1, restart_after_call=True)
    try:
        tracking.log_metrics(uri, run_id, {"loss": 2.0}, step=3)
    finally:
        tracking_relay.use_relay(None)
    # The fresh relay did not know the call id and wrote again: the same row (the caller's timestamp), kept once.
    assert handle.relay.calls == 1
    assert _points(uri, run_id, "loss") == [(3, 2.0)]


def test_a_relay_that_never_answers_warns_on_writes_and_raises_on_reads(monkeypatch, tmp_path, capsys):
    uri, run_id, handle, waits = _relay_world(monkeypatch, tmp_path, fail=True)
    try:
        tracking.log_metrics(uri, run_id, {"loss": 2.0}, step=3)  # returns: training goes on
        warning = capsys.readouterr().err
        with pytest.raises(RuntimeError, match="latest_metric through the tracking relay failed 3 times"):
            tracking.latest_metric(uri, run_id, "loss")
    finally:
        tracking_relay.use_relay(None)
    assert "WARNING: MLflow _log_metric_rows through the tracking relay failed 3 times (TimeoutError" in warning
    assert len(waits) == 2 * tracking_relay.RELAY_ATTEMPTS
    # The relay did run the write (only its replies were lost): once, whatever the three tries.
    assert _points(uri, run_id, "loss") == [(3, 2.0)] and handle.relay.calls == 2


def test_a_relay_opens_the_store_as_it_starts_and_a_failed_warm_up_only_warns(tmp_path, capsys):
    """The launcher's relay opens the run's store in its constructor (what the worker group's first MLflow call
    would otherwise wait for); a warm-up that fails is a warning, and the relay still serves calls."""
    import functools

    uri = f"sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}"
    opened: list[str] = []
    relay = tracking_relay.TrackingRelay(warm_up=functools.partial(opened.append, uri))
    assert opened == [uri] and relay.calls == 0  # ran once, at construction, and is not counted as a call

    def broken() -> None:
        raise OSError("disk full")

    relay = tracking_relay.TrackingRelay(warm_up=broken)
    assert "the MLflow relay could not open the store ahead of time: disk full" in capsys.readouterr().err
    run_id = tracking.start_or_resume_run(uri, "exp", "r", None, load_config("tiny"))
    assert relay.call("id-1", tracking.latest_metric, (uri, run_id, "loss"), {}) is None and relay.calls == 1


def test_a_sweep_with_more_trial_runs_than_a_search_page_closes_and_kills_them_all(tmp_path, monkeypatch):
    """MLflow returns at most a page (1,000 runs) per ``search_runs``: a 1,500-trial random search would have left
    a third of its trials' runs RUNNING. Here the page is 3 runs and the sweep has 7 trials, so the sweep's MLflow
    calls must follow the pages."""
    from reclip_ray.sweep.results import close_trial_runs, kill_running_trial_runs

    monkeypatch.setattr(tracking, "SEARCH_PAGE", 3)
    uri = f"sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}"
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(uri, "sweep")
    parent = c.create_run(exp, run_name="sweep").info.run_id
    trials = [c.create_run(exp, run_name=f"t{i}", tags={"mlflow.parentRunId": parent, "reclip.trial_id": f"t{i}"})
              for i in range(7)]
    c.create_run(exp, run_name="not-a-trial")  # another run in the experiment: left alone
    rows = [{"trial_id": f"t{i}", "status": "completed", "mlflow_run_id": ""} for i in range(4)]
    close_trial_runs(uri, parent, rows)  # 4 trials Tune saw end; 3 it never reported
    assert [r["mlflow_run_id"] for r in rows] == [t.info.run_id for t in trials[:4]]
    status = {t.info.run_name: c.get_run(t.info.run_id).info.status for t in trials}
    assert status == {**{f"t{i}": "FINISHED" for i in range(4)}, **{f"t{i}": "KILLED" for i in range(4, 7)}}

    again = [c.create_run(exp, run_name=f"r{i}", tags={"mlflow.parentRunId": parent}) for i in range(5)]
    kill_running_trial_runs(uri, parent)
    assert {c.get_run(r.info.run_id).info.status for r in again} == {"KILLED"}
    assert {c.get_run(t.info.run_id).info.status for t in trials[:4]} == {"FINISHED"}  # ended runs keep theirs
    (other,) = tracking.search_all_runs(c, [exp], "attributes.run_name = 'not-a-trial'")
    assert other.info.status == "RUNNING"


def test_a_workers_writes_to_an_mlflow_server_that_is_down_or_hangs_are_warnings_and_its_reads_errors(
        monkeypatch, tmp_path, capsys):
    """A server URI is written by the workers directly (no relay). A write that fails there is a warning and
    training goes on, as through the relay: an error would fail the step and restart the whole worker group, at
    every write while the server is down. MLflow's HTTP retries are bounded in a worker unless the user set them.
    A read raises; so does a driver's write (the run's start and end)."""
    import os
    import socket
    import time

    for key in tracking_relay.WORKER_HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking_relay, "_WORKER", False)  # undone after the test, as use_relay below is
    monkeypatch.setattr(tracking_relay, "_RELAY", None)
    monkeypatch.setattr(tracking_relay, "_WRITER", None)
    tracking_relay.use_relay(None, worker=True)  # as Worker._connect does without a relay
    assert {k: os.environ[k] for k in tracking_relay.WORKER_HTTP_DEFAULTS} == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own settings win (and keep this quick)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    tracking_relay.bound_mlflow_requests()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"

    hangs = socket.socket()  # accepts connections and never answers
    hangs.bind(("127.0.0.1", 0))
    hangs.listen(16)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there: connection refused
    artifact = tmp_path / "eval.json"
    artifact.write_text("{}")
    run_id = "0" * 32
    try:
        for uri in (down, f"http://127.0.0.1:{hangs.getsockname()[1]}"):
            t0 = time.monotonic()
            assert tracking.log_metrics(uri, run_id, {"loss": 1.0}, step=1) is None
            assert tracking.set_tags(uri, run_id, {"reclip.x": "y"}) is None
            assert time.monotonic() - t0 < 0.5, uri  # queued for the worker's write thread: no wait at all
            assert tracking.log_artifact(uri, run_id, artifact) is None  # after those two, then itself
            assert time.monotonic() - t0 < 20 and tracking_relay.pending_writes() == 0, uri
            with pytest.raises(Exception):
                tracking.latest_metric(uri, run_id, "loss")
        warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
        assert [w.split(" failed ")[0] for w in warnings] == [
            "[reclip] WARNING: MLflow _log_metric_rows", "[reclip] WARNING: MLflow set_tags",
            "[reclip] WARNING: MLflow log_artifact"] * 2, warnings
        assert all(w.endswith("training goes on without it") for w in warnings)
        tracking_relay.use_relay(None)  # a driver
        with pytest.raises(Exception):
            tracking.log_metrics(down, run_id, {"loss": 1.0}, step=1)
    finally:
        hangs.close()
        tracking_relay.use_relay(None)


def test_a_workers_writes_never_wait_for_mlflow_and_land_in_order_before_its_reads_checkpoints_and_end(
        monkeypatch, tmp_path, capsys):
    """A worker's writes are queued for its own write thread (tracking_relay): while the relay hangs, rank 0's loop
    goes on at once (a slow store held every rank at the next collective, about 6 minutes per write on a hung
    server). They land in the order asked, before a read returns and before a checkpoint is reported (a restart
    from it re-logs only the steps after the last one MLflow has: a write still queued then would be a gap); past
    MAX_PENDING_WRITES the newest are dropped with a warning, not kept in memory while MLflow stays down."""
    import threading
    import time
    from types import SimpleNamespace

    import ray.train

    from reclip_ray.train import worker as worker_module

    uri, run_id, handle, _ = _relay_world(monkeypatch, tmp_path)
    answer = threading.Event()  # the relay hangs until set: a call runs only then

    class Hung:
        def __getattr__(self, method):
            return SimpleNamespace(remote=lambda *args: lambda: getattr(handle.relay, method)(*args))

    def wait(ref, timeout_s):
        assert answer.wait(timeout=10)
        return ref()

    monkeypatch.setattr(tracking_relay, "_wait", wait)
    monkeypatch.setattr(tracking_relay, "_WORKER", False)
    monkeypatch.setattr(tracking_relay, "_WRITER", None)
    monkeypatch.setattr(tracking_relay, "MAX_PENDING_WRITES", 5)
    try:
        tracking_relay.use_relay(Hung(), worker=True)  # as Worker._connect does
        t0 = time.monotonic()
        for step in range(1, 8):
            assert tracking.log_metrics(uri, run_id, {"loss": 10.0 - step}, step=step) is None
        assert time.monotonic() - t0 < 0.5  # nothing waited for the relay
        assert tracking_relay.pending_writes() == 5 and not tracking_relay.flush_writes(0.2)
        warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
        assert warnings == ["[reclip] WARNING: MLflow is 5 writes behind; _log_metric_rows dropped (1 so far); "
                            "training goes on without them"], warnings

        # A checkpoint waits for the queue (a bounded wait; a hung store costs it FLUSH_BEFORE_REPORT_S and a
        # warning), then reports. The next checkpoint does not wait again while MLflow has made none of the writes
        # (a hung server holds one for minutes: every checkpoint would pay the wait for nothing); once it has, the
        # checkpoints wait again, and every step asked before one is in MLflow when it is reported.
        monkeypatch.setattr(worker_module, "FLUSH_BEFORE_REPORT_S", 0.2)
        reported: list[int] = []
        monkeypatch.setattr(ray.train, "report", lambda metrics, **_: reported.append(
            len(_points(uri, run_id, "loss"))))
        said: list[str] = []
        state = SimpleNamespace(samples=8, step=7, phase=0, gflops=1.0, mlflow_run_id=run_id)
        rank0 = SimpleNamespace(rank=0, state=state, world=1, say=said.append)
        worker_module.Worker.report(rank0, {"loss": 3.0}, save=False)
        assert said == ["WARNING: 5 MLflow write(s) still pending after 0.2 s at step 7 (MLflow slow or down); "
                        "training goes on"] and reported == [0]
        tracking.log_metrics(uri, run_id, {"loss": 0.5}, step=9)  # dropped: the queue is still full
        monkeypatch.setattr(worker_module, "FLUSH_BEFORE_REPORT_S", 30.0)
        state.step = 9
        t0 = time.monotonic()
        worker_module.Worker.report(rank0, {"loss": 3.0}, save=False)
        assert time.monotonic() - t0 < 5 and reported == [0, 0]  # still hung: no second wait
        assert said[1:] == ["WARNING: 5 MLflow write(s) still pending at step 9, none made since the 0.2 s wait at "
                            "step 7: not waiting again until MLflow answers (down or hung?); training goes on"]
        answer.set()
        assert tracking_relay.flush_writes(10)
        tracking.log_metrics(uri, run_id, {"loss": 0.1}, step=10)
        worker_module.Worker.report(rank0, {"loss": 3.0}, save=False)  # MLflow answers again: it waits
        assert reported == [0, 0, 6] and len(said) == 2

        assert tracking.last_logged_step(uri, run_id) == 10  # a read sees the writes asked before it

    finally:
        answer.set()
        tracking_relay.use_relay(None)  # a driver again: the rest of the queue goes first
    assert _points(uri, run_id, "loss") == [(s, 10.0 - s) for s in range(1, 6)] + [(10, 0.1)]  # in order, once each
    assert tracking_relay.pending_writes() == 0 and handle.relay.calls == 7  # 6 writes and the read
