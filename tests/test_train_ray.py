"""Integration: two-phase RECLIP training on a real local Ray (gloo workers), checkpoints and MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import IN_ORDER, overrides_for
from reclip_ray.config import load_config

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, synth_dir: Path, tokenizer_path: Path, name: str, workers: int, extra=()):
    return load_config("tiny", overrides_for(tmp_path, synth_dir, tokenizer_path, name, workers, extra))


def _mlflow_runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("it")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_two_phase_run_two_workers_then_resume(in_order_run, synth_dir, tokenizer_path):
    from reclip_ray.train.checkpoint import read_state
    from reclip_ray.train.launch import run_training

    tmp_path, cfg, metrics = in_order_run(2)

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
    assert run.data.metrics["worker_peak_gpu_mib"] == 0.0  # CPU workers: the key is there, CUDA never started
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

    # Rerunning the command of a finished run says so and starts nothing: no restart, no step trained again.
    again = run_training(_config(tmp_path, synth_dir, tokenizer_path, "w2", workers=2, extra=IN_ORDER))
    assert again["samples"] == 1024 and again["mlflow_run_id"] == run.info.run_id
    assert again["eval/full/colour/top1"] == metrics["eval/full/colour/top1"]
    client, runs = _mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["reclip.restarts"] == "0"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 17))


def _rows_of_step(run_dir: Path, step: int, phase: int = 0) -> list[tuple[str, int]]:
    """(key, pass) of every row that any rank trained at ``step`` (``fault.record_rows``: RUN_DIR/rows/*.jsonl)."""
    import json

    out = []
    for path in sorted((run_dir / "rows").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] == step and rec["phase"] == phase:
                out += list(zip(rec["keys"], rec["passes"]))
    return out


def _step_loss_reference(cfg, rows: list[tuple[str, int]]) -> float:
    """The loss a step over ``rows`` has at the run's initial weights, computed in this process on one rank: the
    rows read from the shards by key, cropped as the pipeline crops them (``row_rng`` of the phase seed, key and
    pass), tokenized, and one ``train_step`` of a model built as every worker builds it (same seed)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from reclip_ray.data.images import decode_image
    from reclip_ray.data.local import row_rng
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model
    from reclip_ray.run_names import phase_seed
    from reclip_ray.schedule import build_optimizer
    from reclip_ray.train.step import read_step, train_step

    passes = dict(rows)
    found = {}
    for shard in sorted(Path(cfg.data.train).glob("*.parquet")):
        found |= {r["key"]: r for r in pq.read_table(shard, columns=["key", "image", "caption"]).to_pylist()
                  if r["key"] in passes}
    keys = sorted(passes)
    phase, seed, tok = cfg.phases[0], phase_seed(cfg, 0), load_tokenizer(cfg.data.tokenizer)
    images = np.stack([decode_image(found[k]["image"], phase.image_size, train=True, rng=row_rng(seed, k, passes[k]))
                       for k in keys])
    tokens = torch.as_tensor(tok.encode([found[k]["caption"] for k in keys], phase.text_length))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tokenizer=tok)
    return read_step(train_step(model, build_optimizer(model, cfg.optim), torch.from_numpy(images), tokens,
                                lr=0.0))["loss"]


def test_one_and_two_workers_follow_the_same_schedule(in_order_run):
    """1 and 2 workers: the same LR at every step (the schedule's, a function of samples only), the same sample
    counts and image sizes, and each run's first-step loss is the global batch's.

    The loss of step 1 is the contrastive loss of the *global* batch (every rank computes it over the gathered
    features) under the same initial weights (``torch.manual_seed(train.seed)`` before building the model), so it
    depends only on which rows the step trained (``fault.record_rows``) and their crops (a function of key and
    pass). Which rows those are differs between the two runs (which blocks each rank gets from Ray Data's split is
    not fixed), so each run is held to its own rows: its logged loss must be the loss of one step over all its
    ranks' rows computed here on one rank (``_step_loss_reference``), to float rounding. A 2-worker run whose
    ranks did not gather each other's features, or whose pipeline cropped or tokenized differently, is off by far
    more (a rank's own 32 rows give a loss near ln 32, the global 64 near ln 64).
    Both runs are the session's ``in_order_run``s: their phase-end evaluations and checkpoints come after the steps
    and train nothing.
    """
    from reclip_ray.schedule import Schedule

    histories, first_rows, relay_calls = {}, {}, {}
    for workers in (1, 2):
        tmp_path, cfg, result = in_order_run(workers)
        client, runs = _mlflow_runs(tmp_path / "mlflow.db")
        run = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
        assert run.data.metrics["workers"] == workers
        histories[workers] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in ("lr", "samples", "image_size", "loss")
        }
        first_rows[workers] = _rows_of_step(Path(result["run_dir"]), 1)
        relay_calls[workers] = (int(run.data.tags["reclip.tracking_relay_calls"]),
                                len(client.get_metric_history(run.info.run_id, "checkpoint_s")))
        assert len(first_rows[workers]) == 64 == len(set(first_rows[workers]))

        # The logged LR of every step is the schedule's LR at the samples seen before that step.
        schedule = Schedule.from_config(cfg)
        expected, samples, step = {}, 0, 0
        for plan in schedule.phases:
            while samples < plan.end_sample:
                step += 1
                expected[step] = schedule.lr_at(samples)
                samples += plan.batch_at(samples)
        assert len(expected) == 16
        logged = dict(histories[workers]["lr"])
        assert sorted(logged) == sorted(expected)
        for s, lr in expected.items():
            assert logged[s] == pytest.approx(lr, rel=1e-9, abs=1e-15), s

    for key in ("lr", "samples", "image_size"):
        assert histories[1][key] == histories[2][key], key
    # README: the workers' MLflow calls reach the relay "about one call per log window", whatever the worker count:
    # the 16 windows (one step each), one per checkpoint (its save time), and a fixed few per attempt (its restart
    # point, rank 0's node), per phase (its data source, its evaluation) and at the end (the model's artifacts).
    # Not one per metric, per rank or per step between windows.
    (calls, checkpoints), phases = relay_calls[2], len(cfg.phases)
    assert relay_calls[1] == relay_calls[2], relay_calls
    assert 16 + checkpoints <= calls <= 16 + checkpoints + 6 * phases + 6, relay_calls
    for workers in (1, 2):
        _, cfg, _ = in_order_run(workers)
        logged = dict(histories[workers]["loss"])[1]
        assert logged == pytest.approx(_step_loss_reference(cfg, first_rows[workers]), rel=1e-5), workers


def test_a_run_folder_on_s3_whose_prefix_has_a_space_and_a_percent_is_one_folder(ray_session, s3_prefix, make_cfg):
    """Ray Train opens ``run.storage_path`` with pyarrow's URI parser, which refuses a space and decodes ``%20``: it
    is given ``storage.pyarrow_uri(...)``, so its checkpoints land beside model/ and reclip_run.json, under the
    prefix as written."""
    from conftest import s3_checkpoints
    from reclip_ray import storage
    from reclip_ray.train.launch import run_training

    runs = f"{s3_prefix}/my runs%20x"
    metrics = run_training(make_cfg("spaced", extra=[f"run.storage_path={runs}", "train.samples=256",
                                                     "checkpoint.every_samples=128", "eval.at_phase_end=false"]))
    run_dir = storage.join(runs, "spaced")
    assert metrics["samples"] == 256
    assert s3_checkpoints(run_dir), storage.list_files(s3_prefix)
    assert storage.is_file(storage.join(run_dir, "model", "model.safetensors"))
    assert storage.read_json(storage.join(run_dir, "reclip_run.json"))
    assert not storage.exists(f"{s3_prefix}/my runs x"), storage.list_files(s3_prefix)


def test_a_run_folder_on_an_s3_store_named_only_in_its_uri_lands_there(ray_session, s3_prefix, make_cfg,
                                                                       monkeypatch):
    """MinIO/R2 users name the endpoint in ``run.storage_path`` (``?endpoint_override=HOST:PORT&scheme=http``).
    The session's Ray processes got ``AWS_ENDPOINT_URL`` (the session's moto server, A) at ``ray.init``, which a test
    cannot take back from them; so the URI names a second server, B, in a process of its own (moto's servers in one
    process share one store), and the driver's own ``AWS_ENDPOINT_URL`` is removed. The checkpoints, the model and
    reclip_run.json are at B under ``prefix/runs/NAME/`` and nothing is at A: the driver, Ray Train's controller and
    the workers all followed the URI over their environment. With the query encoded into the key (the old
    ``pyarrow_uri``) Ray Train's folder was ``runs?endpoint_override=...`` (persist's folder check refuses it)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import boto3

    from conftest import S3_BUCKET, s3_checkpoints
    from reclip_ray import storage
    from reclip_ray.train.launch import run_training

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        host, port = free.getsockname()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        at_b = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        for _ in range(100):  # until it listens
            try:
                at_b.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        at_a = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        monkeypatch.setattr(storage, "_S3_CLIENTS", {})
        storage._remote_filesystem.cache_clear()
        runs = f"{s3_prefix}/runs?endpoint_override={host}:{port}&scheme=http"
        metrics = run_training(make_cfg("minio", extra=[f"run.storage_path={runs}", "train.samples=256",
                                                        "checkpoint.every_samples=128", "eval.at_phase_end=false"]))
        run_dir = storage.join(runs, "minio")
        assert metrics["samples"] == 256 and s3_checkpoints(run_dir), storage.list_files(runs)
        key = s3_prefix.split("/", 3)[3]
        at_server_b = [o["Key"] for o in at_b.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{key}/")["Contents"]]
        assert f"{key}/runs/minio/model/model.safetensors" in at_server_b, at_server_b
        assert f"{key}/runs/minio/reclip_run.json" in at_server_b, at_server_b
        # besides the run folder only the folder markers pyarrow's create_dir leaves (``prefix/``, ``prefix/runs/``)
        assert [k for k in at_server_b if not k.startswith(f"{key}/runs/minio/")] == [f"{key}/", f"{key}/runs/"]
        at_server_a = [o["Key"] for o in at_a.list_objects_v2(Bucket=S3_BUCKET, Prefix=key).get("Contents", [])]
        assert at_server_a == [], at_server_a
    finally:
        storage._remote_filesystem.cache_clear()
        server.kill()
        server.wait(timeout=30)


def test_a_checkpoint_whose_upload_to_s3_fails_part_way_is_not_registered_and_the_run_resumes_a_whole_one(
        ray_session, s3_prefix, s3_faults, make_cfg, tmp_path):
    """S3 refuses the second part of the first checkpoint's ``state.pt``; a fault after it restarts the attempt.

    With Ray Train's own copy (``pyarrow.fs.copy_files``) the refusal was an ignored error: the checkpoint was
    registered without ``state.pt``, the restart got it from ``ray.train.get_checkpoint()`` and failed on "missing
    state.pt", a deterministic error that ended the run. With the worker's upload function (``train/persist.py``)
    the report fails, the attempt restarts from scratch, checkpoints again, and the restart after the fault resumes
    that checkpoint: the run finishes, every registered checkpoint has its ``state.pt``, no upload is left open.
    Planted (Ray Train's copy): the run ends on "checkpoint_s000000000128_p0: missing state.pt"."""
    import boto3

    from conftest import mlflow_run, s3_checkpoints
    from reclip_ray import storage
    from reclip_ray.train.launch import run_training

    runs = f"{s3_prefix}/runs"
    cfg = make_cfg("ckptfault", extra=[
        f"run.storage_path={runs}", "train.samples=512", "checkpoint.every_samples=128", "fault.fail_at_samples=192",
        "model.vision.depth=4", "model.text.depth=3",  # the preset's: state.pt ~18 MB, two 10 MB parts on S3
        "eval.at_phase_end=false", "run.max_failures=3"])
    refused = s3_faults("/ckptfault/checkpoint_s000000000128_p0/state.pt", times=1, query="partNumber=2")
    metrics = run_training(cfg)
    run_dir = storage.join(runs, "ckptfault")
    assert refused, "the planted refusal was not reached"
    assert metrics["samples"] == 512
    kept = s3_checkpoints(run_dir)
    assert kept and all(storage.is_file(storage.join(run_dir, name, "state.pt")) for name in kept), \
        storage.list_files(run_dir)
    client, run = mlflow_run(tmp_path / "mlflow.db")  # make_cfg's store
    assert run.info.status == "FINISHED" and run.data.metrics["restarts"] == 2  # worker-group restarts
    # The upload's failure restarted from scratch (restart 1 at step 0), the fault from the re-written checkpoint
    assert {int(m.value): m.step for m in client.get_metric_history(run.info.run_id, "restarts")} == {
        0: 0, 1: 0, 2: 2}
    bucket, key = storage.filesystem(run_dir)[1].split("/", 1)
    assert boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []) == []
