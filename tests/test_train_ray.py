"""Integration: two-phase RECLIP training on a real local Ray (gloo workers), checkpoints and MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import overrides_for
from reclip_ray.config import load_config

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, synth_dir: Path, tokenizer_path: Path, name: str, workers: int, extra=()):
    return load_config("tiny", overrides_for(tmp_path, synth_dir, tokenizer_path, name, workers, extra))


def _mlflow_runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("it")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_two_phase_run_two_workers_then_resume(ray_session, tmp_path, synth_dir, tokenizer_path):
    from reclip_ray.train.checkpoint import read_state
    from reclip_ray.train.launch import run_training

    cfg = _config(tmp_path, synth_dir, tokenizer_path, "two", workers=2)
    metrics = run_training(cfg)

    # Schedule: both phases done, exactly the configured samples.
    assert metrics["samples"] == 1024
    assert metrics["phase"] == 1
    ckpt = Path(metrics["checkpoint"])
    state = read_state(ckpt)
    assert (state.samples, state.phase, state.phase_done) == (1024, 1, True)

    client, runs = _mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["phases.0.image_size"] == "32"
    assert run.data.params["train.batch_size"] == "64"
    sizes = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "image_size")}
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    # 768 samples / 64 = 12 steps at 32 px, then 4 steps at 64 px; one loss point per step.
    assert sorted(losses) == list(range(1, 17))
    assert {s for s, v in sizes.items() if v == 32} == set(range(1, 13))
    assert {s for s, v in sizes.items() if v == 64} == set(range(13, 17))
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (15, 16)) / 2
    assert last < first
    keys = run.data.metrics.keys()
    assert any(k.startswith("eval/32px/") for k in keys) and any(k.startswith("eval/64px/") for k in keys)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.yaml", "model/tokenizer.json"} <= artifacts

    # The exported model opens without Ray and embeds text.
    import reclip_ray

    model, tok = reclip_ray.load_model(Path(metrics["run_dir"]) / "model")
    import torch

    with torch.no_grad():
        feats = model.encode_text(torch.as_tensor(tok.encode(["a red star"], 16)))
    assert feats.shape == (1, cfg.model.embed_dim)

    # Rerunning the same command resumes from the last checkpoint: no step is trained (or logged) again.
    again = run_training(_config(tmp_path, synth_dir, tokenizer_path, "two", workers=2))
    assert again["samples"] == 1024 and again["mlflow_run_id"] == run.info.run_id
    client, runs = _mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["reclip.restarts"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 17))


def test_one_and_two_workers_follow_the_same_schedule(ray_session, tmp_path, synth_dir, tokenizer_path):
    from reclip_ray.train.launch import run_training

    histories = {}
    for workers in (1, 2):
        cfg = _config(
            tmp_path, synth_dir, tokenizer_path, f"w{workers}", workers, extra=["eval.at_phase_end=false", "checkpoint.every_samples=0"]
        )
        result = run_training(cfg)
        client, runs = _mlflow_runs(tmp_path / "mlflow.db")
        run = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
        assert run.data.metrics["workers"] == workers
        histories[workers] = {
            key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in ("lr", "samples", "image_size")
        }
    assert histories[1] == histories[2]
    assert len(histories[1]["lr"]) == 16


def test_bad_config_fails_before_ray_starts(tmp_path, synth_dir):
    import ray

    from reclip_ray.errors import ReclipError
    from reclip_ray.train.launch import run_training

    cfg = load_config("tiny", [f"data.train={tmp_path / 'nope' / 'train'}", "data.synth_if_missing=false"])
    was_running = ray.is_initialized()
    with pytest.raises(ReclipError, match="data.train not found"):
        run_training(cfg)
    assert ray.is_initialized() == was_running
    cfg = load_config("tiny", [f"data.train={synth_dir / 'train'}", "data.image_column=jpg"])
    with pytest.raises(ReclipError, match="jpg"):
        run_training(cfg)
