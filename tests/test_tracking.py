"""MLflow helpers against a real SQLite store (no Ray)."""

from __future__ import annotations


from reclip_ray import tracking
from reclip_ray.config import load_config


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri() == "http://mlflow:5000"


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
