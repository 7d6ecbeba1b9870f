"""End-of-run report: summary table and report.png from a real MLflow SQLite store (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reclip_ray import report, tracking
from reclip_ray.config import load_config
from reclip_ray.errors import ReclipError

# A fake two-phase run of the `tiny` preset: phase 0 'lowres' at 32 px (1 GFLOP a step, steps 1-20, logged every
# 5 steps), phase 1 'finetune' at 64 px (4 GFLOPs a step, steps 21-26, logged at 25 and at its last step 26).
LOGGED = [(s, 0, 32, float(s)) for s in (5, 10, 15, 20)] + [(25, 1, 64, 40.0), (26, 1, 64, 44.0)]
SWITCH_GFLOPS = 20.0  # gflops_total at the last step of phase 0
EVAL = {
    20: {"eval/32px/shape/top1": 0.55, "eval/32px/shape/chance_top1": 0.25,
         "eval/32px/colour/top1": 0.6, "eval/32px/colour/chance_top1": 1 / 3,
         "eval/64px/shape/top1": 0.3, "eval/64px/shape/chance_top1": 0.25,
         "eval/64px/colour/top1": 0.4, "eval/64px/colour/chance_top1": 1 / 3},
    26: {"eval/64px/shape/top1": 0.8125, "eval/64px/shape/chance_top1": 0.25,
         "eval/64px/colour/top1": 0.7, "eval/64px/colour/chance_top1": 1 / 3,
         "eval/64px/image_to_text_r@1": 0.42, "eval/64px/image_to_text_r@10": 0.9,
         "eval/64px/text_to_image_r@1": 0.38, "eval/64px/text_to_image_r@10": 0.88},
}


def _fake_run(tmp_path: Path, *, state_file: bool = True) -> tuple[str, str, Path]:
    """A finished run as the launcher and worker leave it: params, per-step history, phase-end evals, run folder."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "fake"
    run_dir.mkdir(parents=True)
    cfg = load_config("tiny")
    cfg.run.name = "fake"
    run_id = tracking.start_or_resume_run(uri, "exp", "fake", None, cfg, tags={report.RUN_DIR_TAG: str(run_dir)})
    # The worker's own path (tracking.log_metrics: MlflowClient.log_batch, '@' in R@k keys becomes '_').
    for step, phase, size, gflops in LOGGED:
        row = {"loss": 5.0 - 0.1 * step, "lr": 1e-3, "phase": phase, "image_size": size, "gflops_total": gflops}
        tracking.log_metrics(uri, run_id, row, step=step)
    for step, m in EVAL.items():
        tracking.log_metrics(uri, run_id, m, step=step)
    MlflowClient(tracking_uri=uri).set_terminated(run_id, "FINISHED")
    if state_file:
        (run_dir / report.RUN_STATE_FILE).write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    return uri, run_id, run_dir


def _final_metrics() -> dict:
    """What run_training returns for that run (the last eval plus the report fields)."""
    return {**EVAL[26], "eval/full/shape/top1": 0.8125, "gflops_total": 44.0, "samples": 512, "loss": 2.4}


def test_phase_switches_are_at_the_gflops_where_the_phase_changes(tmp_path):
    uri, run_id, _ = _fake_run(tmp_path)
    history, params = report.fetch_history(uri, run_id)
    assert report.phase_switches(history) == [(SWITCH_GFLOPS, "phase 1 64px")]
    assert report.phase_switches(history, {1: "finetune"}) == [(SWITCH_GFLOPS, "phase 1 'finetune' 64px")]
    assert report.full_size_of(params, history) == 64


def test_phase_switches_pure():
    history = {"phase": [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2)], "gflops_total": [(1, 1.0), (2, 2.0), (3, 6.0),
                                                                                   (4, 10.0), (5, 30.0)],
               "image_size": [(1, 32), (2, 32), (3, 48), (4, 48), (5, 96)]}
    assert report.phase_switches(history) == [(2.0, "phase 1 48px"), (10.0, "phase 2 96px")]
    assert report.phase_switches({"phase": [(1, 0), (2, 0)], "gflops_total": [(1, 1.0), (2, 2.0)]}) == []
    assert report.phase_switches({}) == []


def test_report_run_draws_a_png_and_logs_it(tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    uri, run_id, run_dir = _fake_run(tmp_path)
    out = report.report_run(str(run_dir))
    assert out == str(run_dir / "report.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
    assert "report.png" in [a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id)]
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp.png")]


def test_report_run_finds_the_run_by_tag_without_the_state_file(tmp_path, monkeypatch):
    uri, run_id, run_dir = _fake_run(tmp_path, state_file=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report.find_run(str(run_dir), uri) == (uri, run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert Path(report.report_run(str(run_dir))).is_file()
    monkeypatch.chdir(tmp_path)  # ./mlflow.db is the default store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert report.find_run(str(run_dir)) == (uri, run_id)


def test_missing_run_is_a_one_line_error(tmp_path, monkeypatch):
    uri, run_id, run_dir = _fake_run(tmp_path, state_file=False)
    other = tmp_path / "runs" / "other"
    other.mkdir()
    with pytest.raises(ReclipError, match="no MLflow run tagged"):
        report.report_run(str(other), uri)
    (other / report.RUN_STATE_FILE).write_text(json.dumps({"mlflow_run_id": "0" * 32, "tracking_uri": uri}))
    with pytest.raises(ReclipError, match="not found in"):
        report.report_run(str(other))
    with pytest.raises(ReclipError, match="run folder not found"):
        report.report_run(str(tmp_path / "nope"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(other)
    (other / report.RUN_STATE_FILE).unlink()
    with pytest.raises(ReclipError, match="no MLflow database"):
        report.report_run(str(other))
    assert not (other / "mlflow.db").exists()  # no empty database left behind


def test_a_tracking_server_that_does_not_answer_is_not_a_run_not_found(tmp_path, monkeypatch):
    """``reclip-ray report`` of a run logged to a server that is down said the run was "not found" there."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / report.RUN_STATE_FILE).write_text(json.dumps({"mlflow_run_id": "0" * 32,
                                                             "tracking_uri": f"http://127.0.0.1:{port}"}))
    with pytest.raises(ReclipError, match=f"MLflow at http://127.0.0.1:{port} could not read run 0{{32}}: "):
        report.report_run(str(run_dir))


def test_summary_table(tmp_path):
    text = report.summary_table(_final_metrics(), wall_s=83.4, run_dir="/r/runs/fake", mlflow_run_id="abc123",
                                tracking_uri="sqlite:////r/mlflow.db", full_size=64, report_png="/r/runs/fake/report.png")
    assert "at 64px" in text
    shape = next(line for line in text.splitlines() if line.strip().startswith("shape"))
    assert "81.2%" in shape and "25.0%" in shape and "3.2x" in shape
    colour = next(line for line in text.splitlines() if line.strip().startswith("colour"))
    assert "70.0%" in colour and "33.3%" in colour and "2.1x" in colour
    i2t = next(line for line in text.splitlines() if "image -> text" in line)
    assert "42.0%" in i2t and "90.0%" in i2t
    assert "R@1" in text and "R@10" in text
    assert "44.0 GFLOPs" in text and "1m 23s" in text
    assert "/r/runs/fake/model" in text and "abc123" in text
    assert "mlflow ui --backend-store-uri sqlite:////r/mlflow.db" in text
    assert "/r/runs/fake/report.png" in text
    assert "eval/full" not in text


def test_summary_table_without_evaluation():
    text = report.summary_table({"gflops_total": 2.5e6, "samples": 10}, wall_s=3725, run_dir="runs/x",
                                mlflow_run_id="id9", tracking_uri="sqlite:////m.db", full_size=224)
    assert "no evaluation" in text and "top-1" not in text
    assert "2,500,000.0 GFLOPs (2.50 PFLOPs)" in text and "1h 02m 05s" in text and "runs/x/model" in text
    # a run folder on a store named in its URI: the model's path keeps the options at the end, pasteable into eval
    minio = "s3://b/runs/x?endpoint_override=minio:9000&scheme=http"
    text = report.summary_table({"samples": 10}, wall_s=3, run_dir=minio, mlflow_run_id="id9",
                                tracking_uri="sqlite:////m.db", full_size=224)
    assert "s3://b/runs/x/model?endpoint_override=minio:9000&scheme=http" in text, text
    # The run's reason, where it gave one (the final report's eval_error, eval.json's)
    for reason, line in [("evaluation after 'finetune' failed: OSError: gone",
                          "no evaluation of the final model: evaluation after 'finetune' failed: OSError: gone"),
                         ("no evaluation: data.eval is empty", "no evaluation: data.eval is empty")]:
        text = report.summary_table({"gflops_total": 2.5e6, "eval_error": reason}, wall_s=3, run_dir="runs/x",
                                    mlflow_run_id="id9", tracking_uri="sqlite:////m.db", full_size=224)
        assert line in text.splitlines(), text


def test_cli_report_in_a_subprocess_without_ray(tmp_path):
    uri, run_id, run_dir = _fake_run(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    env.update({"RAY_ADDRESS": "127.0.0.1:1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "reclip_ray", "report", str(run_dir)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir / "report.png")
    assert (run_dir / "report.png").is_file()

    bad = subprocess.run([sys.executable, "-m", "reclip_ray", "report", str(tmp_path / "nope")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("reclip-ray: error: run folder not found")


def test_cli_train_json_flag_reaches_the_launcher(monkeypatch):
    from reclip_ray import cli
    from reclip_ray.train import command

    calls = []

    def new_style(config, overrides, as_json=False, verbose=False):
        calls.append((config, overrides, as_json))
        return 0

    monkeypatch.setattr(command, "train_from_cli", new_style)
    assert cli.main(["train", "--config", "tiny", "--json"]) == 0
    assert cli.main(["train", "--set", "a=1"]) == 0
    assert calls == [("tiny", [], True), (None, ["a=1"], False)]


@pytest.mark.parametrize("as_json", [True, False])
def test_train_prints_why_the_final_model_has_no_evaluation(monkeypatch, capsys, as_json):
    """A run whose final evaluation failed: the JSON's ``final`` is empty and ``eval_error`` says why; the table
    gives the same reason."""
    from reclip_ray import report as report_module
    from reclip_ray.train import command

    reason = "evaluation after 'finetune' failed: OSError: eval shard gone"
    metrics = {"samples": 64, "gflops_total": 12.0, "loss": 3.1, "eval_error": reason, "run_dir": "/r/runs/x",
               "mlflow_run_id": "abc"}
    monkeypatch.setattr(command, "run_training", lambda cfg, **_: dict(metrics))
    monkeypatch.setattr(report_module, "report_after_training", lambda *a: None)
    assert command.train_from_cli("tiny", [], as_json=as_json) == 0
    out = capsys.readouterr().out
    if as_json:
        printed = json.loads(out)
        assert printed["final"] == {} and printed["eval_error"] == reason and printed["run_dir"] == "/r/runs/x"
    else:
        assert f"no evaluation of the final model: {reason}" in out.splitlines()
