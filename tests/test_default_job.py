"""The main job as a user runs it: ``reclip-ray train`` with no config, in an empty directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Only make the default job shorter; everything else (preset, data and tokenizer made at launch, paths, MLflow in the
# working directory, use_gpu=auto, 1-2 elastic workers) is the embedded default.
SHORTEN = ["train.samples=512", "data.synth_train=600", "data.synth_eval=100", "scaling.cpus_per_worker=0.5"]


def test_train_with_no_arguments_makes_data_tokenizer_and_runs(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "job"
    cwd.mkdir()
    command = [sys.executable, "-m", "reclip_ray", "train", "--json"]
    for o in SHORTEN:
        command += ["--set", o]
    # The CLI would start its own local Ray; two Ray instances on one test machine break each other, so it joins
    # this session's cluster instead (as the Ctrl-C test does). No MLflow URI: the default (./mlflow.db) is tested.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"RAY_ADDRESS": ray_cluster.address, "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=800)
    (tmp_path / "stdout.log").write_text(proc.stdout)
    (tmp_path / "stderr.log").write_text(proc.stderr)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    # Data made where the default config looks for it.
    for split in ("train", "eval"):
        assert sorted((cwd / "reclip_data" / split).glob("*.parquet")), split
    run_dir = cwd / "reclip_runs" / "tiny"
    assert (run_dir / "tokenizer.json").is_file()  # trained at launch, kept in the run folder
    model_dir = run_dir / "model"
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    # MLflow's and Ray's start-up lines (a new ./mlflow.db, joining the cluster) are in ray.log, not on the console
    log = (run_dir / "ray.log").read_text()
    for line in ("Creating initial MLflow database tables", "Connecting to existing Ray cluster"):
        assert line in log and line not in proc.stdout + proc.stderr, line

    # The final JSON is the last thing on stdout (worker log lines may come before it).
    start = proc.stdout.rindex('{\n  "final"')
    final, _ = json.JSONDecoder().raw_decode(proc.stdout, start)
    assert Path(final["run_dir"]).resolve() == run_dir.resolve()
    assert final["final"] and all(isinstance(v, float) for v in final["final"].values()), final

    # MLflow in ./mlflow.db: one finished run with a loss history, the one the JSON names.
    db = cwd / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == final["mlflow_run_id"]
    assert client.get_metric_history(run.info.run_id, "loss")

    # The exported model opens without Ray.
    import reclip_ray

    model, tok = reclip_ray.load_model(model_dir)
    assert tok.vocab_size > 0 and sum(p.numel() for p in model.parameters()) > 0
