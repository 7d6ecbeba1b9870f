"""The run folder's small files through reclip_ray.storage, on the local disk and on a real S3 API (moto on
localhost), without Ray: the launcher's and the workers' reads and writes, called as they call them.

The end-to-end runs on S3 (a fatal error, Ctrl-C, resume, "already finished", eval and report from the bucket) are
in test_reliability.py; a sweep on S3 in test_sweep.py; `ray job submit` on S3 in test_job_submit.py.
"""

from __future__ import annotations

import json
import os

import pytest

from reclip_ray import storage
from reclip_ray.errors import DataError, ReclipError


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path, monkeypatch):
    """A run folder on the local disk, or on S3; with S3 the test runs in an empty cwd, where a ``Path`` made of
    the URI (``s3:/bucket/...``, a relative path) would have left a folder named ``s3:``."""
    if request.param == "local":
        yield str(tmp_path / "runs" / "r")
        return
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield f"{request.getfixturevalue('s3_prefix')}/runs/r"
    assert os.listdir(tmp_path / "cwd") == []


def test_a_fatal_error_written_by_a_worker_ends_the_next_start(run_dir):
    from reclip_ray.run_names import FATAL_FILE
    from reclip_ray.train.handover import clear_fatal, raise_if_fatal, write_fatal

    raise_if_fatal(run_dir)  # nothing yet
    write_fatal(run_dir, DataError("12 of 320 rows (3.8%) bad rows"))
    with pytest.raises(DataError, match=r"^12 of 320 rows \(3\.8%\) bad rows$"):
        raise_if_fatal(run_dir)
    assert storage.read_json(storage.join(run_dir, FATAL_FILE))["type"] == "DataError"
    clear_fatal(run_dir)  # a rerun of the command tries again
    raise_if_fatal(run_dir)


def test_a_data_error_raised_in_a_ray_data_task_is_recorded_as_ours_in_one_line(run_dir):
    """A shard gone mid-run is found inside a Ray Data task; the worker gets it as Ray raises it there, with
    ``raise_original_map_exception`` (``pipeline.phase_dataset``): a ``RayTaskError(DataError)`` whose text is the
    remote traceback. The worker's ``except ReclipError`` must catch it, and the file keep our one line."""
    from ray.exceptions import RayTaskError

    from reclip_ray.run_names import FATAL_FILE
    from reclip_ray.train.handover import raise_if_fatal, write_fatal

    message = "shard s3://b/train/shard-00001.parquet disappeared during the run (data.missing_shards=fail; ...)"
    traceback = ("Traceback (most recent call last):\n  File \"pipeline.py\", line 125, in _open\n"
                 f"reclip_ray.errors.DataError: {message}")
    raised = DataError(message)
    # Ray Data appends its retry advice to the error's own message (ray.data._internal.util, Ray 2.60)
    raised.args = (f"{message}\nFailed to read a block after 1/10 attempts (total backoff 0.0s).\nTo change retry "
                   "attempts, backoff, or which errors are retried, configure `ray.data.DataContext.get_current()`",)
    wrapped = RayTaskError("SplitCoordinator.get", traceback, raised).as_instanceof_cause()
    assert isinstance(wrapped, ReclipError) and str(wrapped) != message
    write_fatal(run_dir, wrapped)
    assert storage.read_json(storage.join(run_dir, FATAL_FILE)) == {"type": "DataError", "message": message}
    with pytest.raises(DataError) as info:
        raise_if_fatal(run_dir)
    assert str(info.value) == message

    # Ours raised in the worker from another error: our message, whole (not the cause's, nor its last line)
    try:
        try:
            raise OSError("connection reset")
        except OSError as exc:
            raise DataError("cannot open s3://b/x: connection reset\n(the second line of a long message)") from exc
    except DataError as exc:
        write_fatal(run_dir, exc)
    assert storage.read_json(storage.join(run_dir, FATAL_FILE)) == {
        "type": "DataError", "message": "cannot open s3://b/x: connection reset\n(the second line of a long message)"}


def test_latest_checkpoint_state_reads_ray_trains_snapshot_and_the_meta(run_dir):
    from reclip_ray.run_names import CHECKPOINT_SNAPSHOT
    from reclip_ray.train.handover import latest_checkpoint_state

    assert latest_checkpoint_state(run_dir) == ("", {})
    name = "checkpoint_s000000000512_p0"
    storage.write_json(storage.join(run_dir, CHECKPOINT_SNAPSHOT),
                       {"latest_checkpoint_result": {"checkpoint_dir_name": name}})
    storage.write_json(storage.join(run_dir, name, "meta.json"), {"samples": 512, "phase": 0})
    assert latest_checkpoint_state(run_dir) == (name, {"samples": 512, "phase": 0})


def test_run_state_round_trip_and_the_final_eval(run_dir):
    from reclip_ray.run_names import RUN_STATE_FILE
    from reclip_ray.train.run_state import final_eval, read_run_state, record_finished, write_run_state

    assert read_run_state(run_dir) == {} and final_eval(run_dir) == {}
    write_run_state(run_dir, {"mlflow_run_id": "abc", "attempts": 1})
    assert read_run_state(run_dir) == {"mlflow_run_id": "abc", "attempts": 1}
    assert storage.is_file(storage.join(run_dir, RUN_STATE_FILE))
    storage.write_json(storage.join(run_dir, "eval.json"), {"eval/64px/shape/top1": 0.5})
    assert final_eval(run_dir) == {"eval/64px/shape/top1": 0.5}
    storage.write_json(storage.join(run_dir, "eval.json"), {"eval_error": "no evaluation: data.eval is empty"})
    assert final_eval(run_dir) == {"eval_error": "no evaluation: data.eval is empty"}  # why the model has none
    record_finished(run_dir, {"samples": 64, "checkpoint": None, "run_dir": run_dir, "history": [1, 2]})
    assert read_run_state(run_dir) == {"mlflow_run_id": "abc", "attempts": 1,  # the plain values, kept with the rest
                                       "finished": {"samples": 64, "checkpoint": None, "run_dir": run_dir}}


def test_the_fault_marker_makes_an_injected_fault_fire_once(run_dir):
    from reclip_ray.config import load_config
    from reclip_ray.train.checkpoint import TrainState
    from reclip_ray.train.faults import fault_marker, maybe_inject_fault

    cfg = load_config("tiny", ["fault.fail_at_samples=128"])
    marker = fault_marker(run_dir)
    with pytest.raises(RuntimeError, match="fault injected at 128 samples"):
        maybe_inject_fault(cfg, TrainState(samples=128), 64, 0, marker)
    maybe_inject_fault(cfg, TrainState(samples=128), 64, 0, marker)  # the restart crosses it again: no fault
    assert storage.read_json(marker)["at"] == 128


def test_the_fault_environment_variable_injects_a_fault_in_a_run_configured_without_one(run_dir, monkeypatch):
    """RELIABILITY: ``RECLIP_FAIL_AT_SAMPLES`` for chaos runs (set in a job's environment, no config change)."""
    from reclip_ray.config import load_config
    from reclip_ray.run_names import FAULT_ENV
    from reclip_ray.train.checkpoint import TrainState
    from reclip_ray.train.faults import fault_marker, maybe_inject_fault

    cfg = load_config("tiny")
    assert cfg.fault.fail_at_samples == 0
    monkeypatch.delenv(FAULT_ENV, raising=False)
    maybe_inject_fault(cfg, TrainState(samples=192), 128, 0, fault_marker(run_dir))  # none configured: nothing
    monkeypatch.setenv(FAULT_ENV, "192")
    maybe_inject_fault(cfg, TrainState(samples=192), 128, 1, fault_marker(run_dir))  # another rank: nothing
    with pytest.raises(RuntimeError, match=r"fault injected at 192 samples on rank 0 \(fault.fail_at_samples=192\)"):
        maybe_inject_fault(cfg, TrainState(samples=192), 128, 0, fault_marker(run_dir))


@pytest.mark.parametrize("error, fatal", [("DataError", True), ("ConfigError", True), ("CheckpointError", True),
                                          ("RuntimeError", False)])
def test_the_worker_records_our_errors_as_deterministic_and_leaves_others_to_ray_trains_retries(
        run_dir, monkeypatch, error, fatal):
    """RELIABILITY: a data, config or checkpoint error in a worker ends the run at the next start instead of being
    retried; any other error (a lost node, a CUDA fault, an injected fault) is retried as Ray Train does."""
    from reclip_ray import config, errors
    from reclip_ray.run_names import FATAL_FILE
    from reclip_ray.train import worker
    from reclip_ray.train.handover import raise_if_fatal

    kind = getattr(errors, error, None) or getattr(config, error, None) or RuntimeError
    assert kind.__name__ == error

    def failing_worker(loop_config):
        raise kind(f"{error} in rank 1's loop")

    monkeypatch.setattr(worker, "Worker", failing_worker)
    with pytest.raises(kind):
        worker.train_loop_per_worker({"run_dir": run_dir})
    assert storage.exists(storage.join(run_dir, FATAL_FILE)) == fatal
    if fatal:
        with pytest.raises(DataError, match=f"^{error} in rank 1's loop$"):
            raise_if_fatal(run_dir)


def test_a_worker_that_restored_another_checkpoint_than_its_stream_fails_loudly(run_dir):
    """RELIABILITY: the stream is rebuilt (by the dataset factory) from one checkpoint and the worker restores
    another: rows would be trained twice or skipped, so the worker raises instead."""
    from reclip_ray.data.feed import DataPosition
    from reclip_ray.train.handover import check_data_start, record_data_start

    assert check_data_start(run_dir, 0, "checkpoint_a") == {}  # nothing recorded (a run of an older version)
    record_data_start(run_dir, 0, "checkpoint_a", DataPosition(phase=0), sources={"s.parquet": "image"})
    assert check_data_start(run_dir, 0, "checkpoint_a") == {"s.parquet": "image"}
    with pytest.raises(RuntimeError, match="rebuilt from checkpoint 'checkpoint_a' but this worker restored "
                                           "'checkpoint_b'"):
        check_data_start(run_dir, 0, "checkpoint_b")
    with pytest.raises(RuntimeError, match="rebuilt from checkpoint 'checkpoint_a' but this worker restored 'none'"):
        check_data_start(run_dir, 0, "")


def test_row_log_lines_accumulate(run_dir):
    import numpy as np

    from reclip_ray.train.faults import RowLog

    log = RowLog(run_dir, rank=1, restarts=0, world=2)
    log.write(1, 0, {"key": np.array(["a", "b"]), "_pass": np.array([0, 0])})
    log.write(2, 0, {"key": np.array(["c"]), "_pass": np.array([1])})
    assert log.path.startswith(storage.join(run_dir, "rows", "rank1-start0-"))
    lines = [json.loads(line) for line in storage.read_text(log.path).splitlines()]
    assert [(r["step"], r["keys"], r["passes"]) for r in lines] == [(1, ["a", "b"], [0, 0]), (2, ["c"], [1])]


def test_a_tokenizer_trained_into_the_run_folder_is_reused(run_dir, synth_dir, capsys):
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import CaptionTokenizer
    from reclip_ray.train.prepare import ensure_tokenizer

    cfg = load_config("tiny", [f"data.train={synth_dir / 'train'}", "data.vocab_size=300"])
    path = ensure_tokenizer(cfg, run_dir)
    assert path == storage.join(run_dir, "tokenizer.json") == cfg.data.tokenizer
    assert CaptionTokenizer.from_json(storage.read_text(path)).vocab_size == 300
    assert "training a 300-token BPE tokenizer" in capsys.readouterr().out
    cfg = load_config("tiny", [f"data.train={synth_dir / 'train'}", "data.vocab_size=300"])
    assert ensure_tokenizer(cfg, run_dir) == path
    assert "training" not in capsys.readouterr().out  # a rerun reads it back


def test_data_tokenizer_may_be_a_uri(s3_prefix, tokenizer_path):
    from reclip_ray.config import load_config
    from reclip_ray.train.prepare import ensure_tokenizer

    uri = f"{s3_prefix}/tokenizer.json"
    cfg = load_config("tiny", [f"data.tokenizer={uri}"])
    with pytest.raises(ReclipError, match=f"^data.tokenizer not found: {uri}$"):
        ensure_tokenizer(cfg, f"{s3_prefix}/runs/r")
    storage.write_bytes(uri, tokenizer_path.read_bytes())
    assert ensure_tokenizer(cfg, f"{s3_prefix}/runs/r") == uri
    storage.write_text(uri, "not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        ensure_tokenizer(cfg, f"{s3_prefix}/runs/r")


def test_ray_log_of_a_remote_run_folder_is_kept_locally_and_copied_there(s3_prefix, tmp_path):
    from reclip_ray.console import _open_ray_log, ray_log_file, upload_ray_log

    run_dir = f"{s3_prefix}/runs/r"
    assert ray_log_file(str(tmp_path / "r")) == str(tmp_path / "r" / "ray.log")
    local = ray_log_file(run_dir)
    assert not local.startswith("s3:") and os.path.isabs(local) and "s3:" not in local.split(os.sep)
    storage.write_text(storage.join(run_dir, "ray.log"), "attempt 1\n")  # an earlier attempt, another machine
    assert _open_ray_log(run_dir) == local
    with open(local, "a") as f:
        f.write("attempt 2\n")
    upload_ray_log(run_dir, local)
    assert storage.read_text(storage.join(run_dir, "ray.log")) == "attempt 1\nattempt 2\n"
    # Attempt 3 on another machine appends to the folder's log; attempt 4, here again, must not upload this
    # machine's stale copy over it
    storage.write_text(storage.join(run_dir, "ray.log"), "attempt 1\nattempt 2\nattempt 3\n")
    _open_ray_log(run_dir)
    with open(local, "a") as f:
        f.write("attempt 4, killed before its upload\n")
    # Attempt 5 on another machine (from the folder's log), then attempt 6 here: both kept
    storage.write_text(storage.join(run_dir, "ray.log"), "attempt 1\nattempt 2\nattempt 3\nattempt 5\n")
    _open_ray_log(run_dir)
    with open(local) as f:
        assert f.read() == ("attempt 1\nattempt 2\nattempt 3\nattempt 5\n[reclip] lines of a launch on this "
                            "machine that did not reach the run folder's ray.log:\nattempt 4, killed before its "
                            "upload\n")
    storage.write_text(storage.join(run_dir, "ray.log"), "attempt 1\n")  # shorter: this copy is ahead, kept
    _open_ray_log(run_dir)
    with open(local) as f:
        assert f.read().startswith("attempt 1\nattempt 2\nattempt 3\nattempt 5\n")
    os.unlink(local)
