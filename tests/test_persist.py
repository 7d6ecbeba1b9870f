"""The upload of a checkpoint to a run folder on S3 (``train/persist.py``), against moto's S3 server, without Ray:
the upload function is called as Ray Train 2.60's ``report`` calls a ``checkpoint_upload_fn``, with Ray Train's own
``StorageContext`` for the run folder (what ``ray.train.get_context().get_storage()`` gives a worker)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from reclip_ray import storage
from reclip_ray.errors import CheckpointError
from reclip_ray.train.checkpoint import STATE_FILE, TrainState, load_checkpoint, save_checkpoint
from reclip_ray.train.persist import checkpoint_uploader

NAME = "checkpoint_s000000000256_p0"


def _ray_storage(runs: str, run_name: str):
    """Ray Train's StorageContext of the run, built as the trainer's ``RunConfig`` makes it (``launch``)."""
    from ray.train.v2._internal.execution.storage import StorageContext

    return StorageContext(storage_path=storage.pyarrow_uri(runs), experiment_dir_name=run_name)


def _checkpoint(folder) -> tuple[torch.nn.Module, TrainState]:
    """A real checkpoint (``save_checkpoint``) whose ``state.pt`` is over 10 MB, so S3 takes it in parts: a model of
    1M parameters and AdamW's two moments after a step, 12 MB."""
    model = torch.nn.Linear(1024, 1024)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    state = TrainState(step=4, samples=256, phase=0, mlflow_run_id="run")
    save_checkpoint(folder, model, optimizer, state, "name: tiny\n")
    assert os.path.getsize(os.path.join(folder, STATE_FILE)) > storage.SINGLE_PUT_BYTES
    return model, state


def _open_uploads(s3_path: str) -> list[str]:
    import boto3

    bucket, key = s3_path[len("s3://"):].split("/", 1)
    listing = boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in listing.get("Uploads", []) if u["Key"] == key]


def test_a_checkpoint_whose_state_is_refused_part_way_fails_its_upload_and_leaves_nothing(s3_prefix, s3_faults,
                                                                                           tmp_path):
    """Ray Train's own copy (``pyarrow.fs.copy_files``) returned when S3 refused a part of ``state.pt``: Ray Train
    registered a checkpoint without it, and the next start failed on "missing state.pt", a deterministic error.
    The upload function raises instead (the report fails, the attempt restarts from the checkpoint before), leaves
    no open multipart upload and no ``state.pt``, and removes the folder it began (``meta.json`` had gone up)."""
    import ray.train

    runs = f"{s3_prefix}/runs"
    run_dir = storage.join(runs, "run")
    upload = checkpoint_uploader(run_dir, _ray_storage(runs, "run"))
    local = tmp_path / "ckpt"
    _checkpoint(local)
    refused = s3_faults(f"/{NAME}/{STATE_FILE}", times=1, query="partNumber=2")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        upload(ray.train.Checkpoint.from_directory(str(local)), NAME)
    assert refused, "the planted refusal was not reached"
    target = storage.join(run_dir, NAME)
    assert _open_uploads(f"{target}/{STATE_FILE}") == []
    assert not storage.exists(f"{target}/{STATE_FILE}")
    assert storage.list_files(target) == [] and not storage.exists(target)


def test_a_good_upload_returns_the_checkpoint_ray_train_registers_and_it_loads(s3_prefix, tmp_path):
    """The function returns what Ray Train's own copy returns: its filesystem and ``build_checkpoint_path_from_name``
    (so Ray Train takes it as its own: ``is_managed_checkpoint``, and deletes it past ``num_to_keep``); every file
    is there as written locally, and the checkpoint loads from there as a restart loads it (``Worker._restore``)."""
    import ray.train
    from ray.train.v2._internal.execution.context import is_managed_checkpoint

    from reclip_ray.train.scratch import downloaded

    runs = f"{s3_prefix}/runs"
    ray_storage = _ray_storage(runs, "run")
    upload = checkpoint_uploader(storage.join(runs, "run"), ray_storage)
    local = tmp_path / "ckpt"
    model, state = _checkpoint(local)
    done = upload(ray.train.Checkpoint.from_directory(str(local)), NAME)
    assert done.path == ray_storage.build_checkpoint_path_from_name(NAME)
    assert done.filesystem is ray_storage.storage_filesystem and is_managed_checkpoint(ray_storage, done)
    target = storage.join(runs, "run", NAME)
    assert storage.list_files(target) == [f"{target}/{f}" for f in sorted(os.listdir(local))]
    for f in os.listdir(local):
        assert storage.read_bytes(f"{target}/{f}") == (local / f).read_bytes(), f
    fresh = torch.nn.Linear(1024, 1024)
    with downloaded(done.path, done.filesystem) as folder:
        restored = load_checkpoint(folder, fresh, torch.optim.AdamW(fresh.parameters()))
    assert (restored.samples, restored.step) == (state.samples, state.step)
    assert torch.equal(fresh.weight, model.weight)
    # A retry of the same checkpoint (Ray Train retries an upload that failed with a retryable S3 error) replaces it
    done_again = upload(ray.train.Checkpoint.from_directory(str(local)), NAME)
    assert done_again.path == done.path and storage.read_bytes(f"{target}/{STATE_FILE}") == (
        local / STATE_FILE).read_bytes()


def test_a_local_run_folder_keeps_ray_trains_copy_and_a_folder_ray_reads_otherwise_is_refused(s3_prefix, tmp_path):
    """A local run folder: no function (Ray Train's copy). On S3 our run folder must be Ray Train's experiment folder,
    also for a storage path with a space or a percent (``storage.pyarrow_uri``); ``s3://b//runs``, which pyarrow's
    path reads without the empty segment, is refused in one line at the worker's start, not checkpoints written
    where the run never looks."""
    assert checkpoint_uploader(str(tmp_path / "runs" / "run"), _ray_storage(str(tmp_path / "runs"), "run")) is None
    spaced = f"{s3_prefix}/my runs%20x"
    assert checkpoint_uploader(storage.join(spaced, "run"), _ray_storage(spaced, "run")) is not None
    bucket, key = s3_prefix[len("s3://"):].split("/", 1)
    doubled = f"s3://{bucket}//{key}"
    with pytest.raises(CheckpointError, match="Ray Train's experiment folder"):
        checkpoint_uploader(storage.join(doubled, "run"), _ray_storage(doubled, "run"))


def test_a_storage_path_with_an_empty_folder_name_is_the_folder_ray_train_reads(s3_prefix, synth_dir, tokenizer_path,
                                                                                  tmp_path):
    """The launch spells ``run.storage_path`` as Ray Train's URI parser reads it (``storage.normalize``): a user's
    ``s3://b//runs/`` trains, its checkpoints where the run looks for them, instead of the refusal above."""
    from reclip_ray.config import load_config
    from reclip_ray.train.prepare import prepare

    bucket, key = s3_prefix[len("s3://"):].split("/", 1)
    cfg = load_config("tiny", [f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}",
                               f"data.tokenizer={tokenizer_path}", "data.synth_if_missing=false",
                               f"run.storage_path=s3://{bucket}//{key}//runs/", "run.name=run",
                               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    prep = prepare(cfg)
    assert prep.run_dir == f"{s3_prefix}/runs/run" and prep.cfg.run.storage_path == f"{s3_prefix}/runs"
    assert checkpoint_uploader(prep.run_dir, _ray_storage(prep.cfg.run.storage_path, "run")) is not None


def test_a_storage_path_whose_endpoint_is_in_its_query_is_where_ray_train_and_the_upload_write(
        s3_server, s3_prefix, tmp_path, monkeypatch):
    """MinIO/R2 users give the endpoint in the URI (``?endpoint_override=HOST:PORT&scheme=http``). Ray Train opens
    ``pyarrow_uri`` of it (its validation marker goes up at once) and our upload writes the checkpoint: both at that
    endpoint, with ``AWS_ENDPOINT_URL`` unset, under ``prefix/runs/run/``. ``pyarrow_uri`` encoded the ``?``: both
    wrote under a key named ``runs?endpoint_override=...`` at AWS's default endpoint."""
    import boto3
    import ray.train

    at_server = boto3.client("s3", endpoint_url=s3_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setattr(storage, "_S3_CLIENTS", {})
    storage._remote_filesystem.cache_clear()
    try:
        runs = f"{s3_prefix}/runs?endpoint_override={s3_server.split('://')[1]}&scheme=http"
        run_dir = storage.join(runs, "run")
        ray_storage = _ray_storage(runs, "run")
        upload = checkpoint_uploader(run_dir, ray_storage)
        assert upload is not None  # our run folder is Ray Train's experiment folder
        local = tmp_path / "ckpt"
        _checkpoint(local)
        done = upload(ray.train.Checkpoint.from_directory(str(local)), NAME)
        bucket, key = s3_prefix[len("s3://"):].split("/", 1)
        keys = sorted(o["Key"] for o in at_server.list_objects_v2(Bucket=bucket, Prefix=f"{key}/")["Contents"])
        assert [k for k in keys if k.endswith((".validate_storage_marker", STATE_FILE))] == [
            f"{key}/runs/run/.validate_storage_marker", f"{key}/runs/run/{NAME}/{STATE_FILE}"], keys
        with done.filesystem.open_input_file(f"{done.path}/{STATE_FILE}") as f:  # Ray Train reads what went up
            assert f.read() == (local / STATE_FILE).read_bytes()
    finally:
        storage._remote_filesystem.cache_clear()


@pytest.mark.parametrize("storage_path, message", [
    ("s3://b/runs?endpont_override=http://minio:9000", "Unexpected query parameter in S3 URI: 'endpont_override'"),
    ("hdfs://nn/runs#v2", "'#' starts a URI fragment")])
def test_a_storage_path_with_options_pyarrow_refuses_fails_at_prepare_in_one_line(storage_path, message, synth_dir,
                                                                                   tokenizer_path, tmp_path):
    """A mistyped option (or a fragment) in ``run.storage_path`` is one line naming it before anything starts (with
    ``data.tokenizer`` given, prepare opened nothing under the storage path: Ray Train refused it later)."""
    from reclip_ray.config import load_config
    from reclip_ray.errors import DataError
    from reclip_ray.train.prepare import prepare

    cfg = load_config("tiny", [f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}",
                               f"data.tokenizer={tokenizer_path}", "data.synth_if_missing=false",
                               f"run.storage_path={storage_path}", "run.name=run",
                               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(DataError, match=message) as info:
        prepare(cfg)
    assert storage_path in str(info.value) and "\n" not in str(info.value)


class _Report:
    """``ray.train.report`` as Ray Train 2.60 runs a checkpoint with a ``checkpoint_upload_fn``: the function gets
    the reported checkpoint and its name (in the report with ``sync``; in its copy thread with ``async``, where a
    failure fails the attempt); the local folder is deleted after a good upload when asked."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, metrics, checkpoint=None, checkpoint_dir_name=None, **kwargs):
        self.calls.append(kwargs)
        persisted = kwargs["checkpoint_upload_fn"](checkpoint, checkpoint_dir_name)
        if kwargs.get("delete_local_checkpoint_after_upload"):
            shutil.rmtree(checkpoint.path)
        return persisted


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_the_worker_hands_its_checkpoint_to_the_upload_function_and_a_failure_fails_the_report(
        s3_prefix, s3_faults, monkeypatch, upload):
    """``Worker._report_checkpoint`` with its run folder on S3 passes the function in both modes; the temporary
    folder is gone after the report either way (``sync``: the worker removes it; ``async``: Ray Train does, after
    the upload); a refused ``state.pt`` raises out of the report (``sync``; with ``async`` out of Ray Train's copy
    thread; this stand-in raises in the report) and nothing is left on S3."""
    import ray.train

    from reclip_ray.config import load_config
    from reclip_ray.train.scratch import process_folder
    from reclip_ray.train.worker import Worker

    runs = f"{s3_prefix}/runs"
    report = _Report()
    monkeypatch.setattr(ray.train, "report", report)
    worker = Worker.__new__(Worker)  # what _report_checkpoint reads
    worker.cfg = load_config("tiny", [f"checkpoint.upload={upload}"])
    worker.model = torch.nn.Linear(1024, 1024)
    worker.optimizer = torch.optim.AdamW(worker.model.parameters())
    worker.state = TrainState(step=4, samples=256, phase=0, mlflow_run_id="run")
    worker.config_yaml = "name: tiny\n"
    worker.upload_fn = checkpoint_uploader(storage.join(runs, "run"), _ray_storage(runs, "run"))
    before = set(os.listdir(process_folder()))
    worker._report_checkpoint({"loss": 1.0})
    (kwargs,) = report.calls
    assert kwargs["checkpoint_upload_fn"] is worker.upload_fn
    assert (kwargs.get("checkpoint_upload_mode") == ray.train.CheckpointUploadMode.ASYNC) == (upload == "async")
    target = storage.join(runs, "run", NAME)
    assert storage.list_files(target) == [f"{target}/{f}" for f in ("config.yaml", "meta.json", STATE_FILE)]
    assert set(os.listdir(process_folder())) == before
    worker.state = TrainState(step=8, samples=512, phase=0, mlflow_run_id="run")
    s3_faults(f"/{STATE_FILE}", times=1)  # its one PUT (4 MB: AdamW has no moments before a step)
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        worker._report_checkpoint({"loss": 1.0})
    assert not storage.exists(storage.join(runs, "run", "checkpoint_s000000000512_p0"))
    assert set(os.listdir(process_folder())) == before
