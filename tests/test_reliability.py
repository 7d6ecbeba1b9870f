"""Reliability on a real (simulated multi-node) Ray cluster: faults, resizes, uneven and bad data, Ctrl-C.

Every test checks what the user would check afterwards: the exact sample count, the MLflow history (one run, steps
never going backwards, the LR the schedule says at each sample count), a loadable checkpoint, the run's status.
Each prints a `[reliability]` line with the measured recovery time (seconds from the fault to the restarted
worker group having restored its checkpoint), which RELIABILITY.md quotes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import mlflow_run, s3_checkpoints
from reclip_ray.schedule import Schedule
from reclip_ray.train.checkpoint import load_checkpoint, read_state

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers


def _history(client, run_id: str, key: str) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in points}


def _check_history(cfg, client, run, total_steps: int) -> dict[str, dict[int, float]]:
    """One point per step 1..N, samples = step x batch, and the LR the schedule gives at that sample count."""
    run_id = run.info.run_id
    h = {k: _history(client, run_id, k) for k in ("loss", "lr", "samples", "workers", "local_batch")}
    assert sorted(h["loss"]) == list(range(1, total_steps + 1))
    schedule = Schedule.from_config(cfg)
    batch = cfg.train.batch_size
    for step in range(1, total_steps + 1):
        assert h["samples"][step] == step * batch
        assert h["lr"][step] == pytest.approx(schedule.lr_at((step - 1) * batch), rel=1e-6, abs=1e-12)
        assert h["local_batch"][step] * h["workers"][step] == pytest.approx(batch, abs=h["workers"][step])
    return h


def _final_checkpoint_is_complete(cfg, metrics: dict) -> None:
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model

    state = read_state(metrics["checkpoint"])
    assert (state.samples, state.phase, state.phase_done) == (cfg.train.samples, len(cfg.phases) - 1, True)
    model = build_model(cfg.model, vocab_size=load_tokenizer(cfg.data.tokenizer).vocab_size)
    load_checkpoint(metrics["checkpoint"], model)  # weights_only=True inside; raises on anything else


def _recovery_seconds(client, run_id: str, fault_time: float) -> float:
    """Fault -> the first `restarts` point logged after it (logged once the new group restored its checkpoint)."""
    after = [m.timestamp / 1000 for m in client.get_metric_history(run_id, "restarts") if m.timestamp / 1000 > fault_time]
    assert after, "no restart was logged after the fault"
    return min(after) - fault_time


def _checkpoint_steps(client, run_id: str, every: int) -> set[int]:
    """The steps a run checkpoints at: every ``every`` steps and at each phase's last step (from its history)."""
    phase = {m.step: m.value for m in client.get_metric_history(run_id, "phase")}
    return set(range(0, max(phase) + 1, every)) | {max(s for s in phase if phase[s] == p) for p in set(phase.values())}


def _checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints Ray Train has registered (a directory on disk may not be registered yet: killing a worker
    then would restart from the one before)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        names = [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []
    return sorted(run_dir / n for n in names if (run_dir / n / "meta.json").is_file())


def _wait_for(what: str, predicate, timeout_s: float = 180.0, every_s: float = 0.2, job=None, state=None):
    """Poll ``predicate``; fail at once if the background ``job`` has ended, and on a timeout say what ``state()``
    returns (the cluster's view), so that a CI failure can be read without rerunning it."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None and not job.thread.is_alive():
            raise AssertionError(f"training ended while waiting for {what}: {job.error!r}"
                                 + (f"; {state()}" if state else ""))
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f"; {state()}" if state else ""))


class _Background:
    """run_training in a thread of this driver, so the test can act on the cluster while it trains."""

    def __init__(self, cfg):
        from reclip_ray.train.launch import run_training

        self.result: dict = {}
        self.error: BaseException | None = None

        def target():
            try:
                self.result = run_training(cfg)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout_s: float = 300.0) -> dict:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "training did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _logged(db: Path, key: str):
    """Metric history of the only run so far, or {} before MLflow has one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("it")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return {}
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}


# ------------------------------------------------------------------------------------------ 1. worker exception, SIGKILL


def test_a_worker_exception_then_a_sigkill_each_restart_from_the_last_checkpoint(ray_session, make_cfg, tmp_path):
    """Two faults in one run (one run's start-up instead of two): rank 1 raises once at 704 samples (step 11, phase 0;
    the last checkpoint before it is at 512), and once the restarted group has checkpointed past the fault, a
    worker process is SIGKILLed. The run starts from exported weights (model.init_from): the fresh start loads them,
    each restart resumes its checkpoint instead."""
    from ray.util.state import list_actors

    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model
    from reclip_ray.model import build_model

    first = make_cfg("faults", workers=2)
    tok = load_tokenizer(first.data.tokenizer)
    export_model(build_model(first.model, tokenizer=tok), tok, first, tmp_path / "start_weights")
    crawl = tmp_path / "crawl"  # while it exists, each step sleeps 0.2 s: the run is still training at the SIGKILL
    cfg = make_cfg("faults", workers=2, extra=["fault.fail_at_samples=704", "fault.fail_rank=1", "train.samples=2048",
                                                "checkpoint.every_samples=256", "eval.at_phase_end=false",
                                                "fault.step_delay_s=0.2", f"fault.step_delay_while={crawl}",
                                                "fault.record_rows=true",
                                                f"model.init_from={tmp_path / 'start_weights'}"])
    run_dir = Path(cfg.run.storage_path) / "faults"
    job = _Background(cfg)
    # Up to the fault the run needs no margin (it raises by itself); from it to the SIGKILL it crawls. The restart
    # after the fault takes seconds before a step, so the file is in place before the restarted group trains.
    _wait_for("the raised fault", lambda: (run_dir / ".fault_injected").is_file(), timeout_s=300, job=job)
    crawl.touch()
    _wait_for("a checkpoint after the raised fault", lambda: any(
        read_state(c).samples > 704 for c in _checkpoints(run_dir)), timeout_s=300, job=job)
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(workers) == 2, workers
    newest = max(read_state(c).step for c in _checkpoints(run_dir))  # registered: the restart resumes it or a later one
    killed_at = time.time()
    os.kill(workers[-1].pid, signal.SIGKILL)
    crawl.unlink()  # both faults are in: the restarted group trains the rest at full speed
    metrics = job.join(timeout_s=400)

    assert metrics["samples"] == cfg.train.samples == 2048
    fault = json.loads((Path(metrics["run_dir"]) / ".fault_injected").read_text())
    assert fault["samples"] == 704
    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED" and run.info.run_id == metrics["mlflow_run_id"]
    assert run.data.metrics["restarts"] == 2
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert sorted(m.value for m in restarts) == [0, 1, 2]
    # Each rank seeds its patch dropout and feed shuffle with the count rank 0 took (its row log is named by it): a
    # rank seeded from its checkpoint's count would draw the failed attempt's masks and row order again.
    starts = {tuple(int(n) for n in re.match(r"rank(\d+)-start(\d+)-", p.name).groups())
              for p in (run_dir / "rows").glob("*.jsonl")}
    assert starts == {(rank, start) for rank in (0, 1) for start in (0, 1, 2)}, sorted(starts)
    # Each restart resumed a checkpoint: before the fault at step 11 the one at step 8 (or 4, had Ray Train not yet
    # registered 8's report when the worker died), and after the SIGKILL the newest registered when it came, or one
    # registered after it
    written = _checkpoint_steps(client, run.info.run_id, every=cfg.checkpoint.every_samples // cfg.train.batch_size)
    at = {int(m.value): m.step for m in restarts}
    assert at[1] in written & {4, 8} and at[2] in written and at[2] >= newest, (at, newest, written)
    assert len(client.get_metric_history(run.info.run_id, "init_from_applied")) == 1  # not again on the restarts
    assert run.data.tags["reclip.init_from"].startswith("init_from")
    _check_history(cfg, client, run, total_steps=32)
    _final_checkpoint_is_complete(cfg, metrics)
    print(f"\n[reliability] worker exception: recovery {_recovery_seconds(client, run.info.run_id, fault['time']):.1f} s")
    print(f"[reliability] SIGKILL of a worker: recovery {_recovery_seconds(client, run.info.run_id, killed_at):.1f} s")


# ------------------------------------------------------------------------------------------ 2. elastic resize


def test_elastic_resize_when_a_node_leaves_and_comes_back(ray_cluster, make_cfg, tmp_path, monkeypatch):
    """Workers need a `reclip_slot` that only two extra nodes have; one node goes away, then a new one joins.

    The extra nodes stand in for GPU nodes: they have a slot and no logical CPU, and the workers ask for no CPU, so
    nothing else (Ray Data's read and decode tasks, which run on the head) can take a worker's place on them while
    the worker group restarts.
    """
    import ray

    def add_node():
        return ray_cluster.add_node(num_cpus=0, resources={"reclip_slot": 1}, object_store_memory=100 * 1024**2)

    nodes = [add_node(), add_node()]
    _refresh_node_view(ray_cluster)  # the first start sees both nodes, not the coordinator's view of up to 20 s ago
    # A restart sized from a stale view (see _refresh_node_view) waits this long for a worker it cannot place before
    # it asks again: 60 s by default, the advice in RELIABILITY.md for a real cluster. Ray Train passes the driver's
    # value to this run's controller; it bounds what the test loses if the refresh comes too late.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    db = tmp_path / "mlflow.db"
    # While this file exists each step sleeps 0.2 s, so the run is still training when the node leaves and when it
    # comes back; once the workers are two again the test deletes it and the rest trains at full speed. 96 steps:
    # about 75 of them are left to crawl through after the node is added (~25 s; Ray Train resizes within its
    # 2 s check once the coordinator has seen the node).
    crawl = tmp_path / "crawl"
    crawl.touch()
    cfg = make_cfg("elastic", workers=(1, 2), extra=[
        "scaling.resources_per_worker={reclip_slot: 1}", "scaling.cpus_per_worker=0",
        "scaling.resize_check_interval_s=2", "train.samples=6144", "checkpoint.every_samples=640",
        "fault.step_delay_s=0.2", f"fault.step_delay_while={crawl}", "eval.at_phase_end=false", "run.max_failures=6",
    ])
    run_dir = Path(cfg.run.storage_path) / "elastic"

    def workers_by_step() -> dict[int, float]:
        return _logged(db, "workers")

    def cluster_view() -> str:
        return (f"workers logged by step: {_runs_of(workers_by_step())}; checkpoints: {[c.name for c in _checkpoints(run_dir)]}; "
                f"available: {ray.available_resources()}")

    try:
        job = _Background(cfg)
        # Ray Train may start with one worker if it sees the second node late; it then scales up to two.
        _wait_for("2 workers training and a checkpoint", lambda: 2 in workers_by_step().values()
                  and _checkpoints(run_dir), timeout_s=300, job=job, state=cluster_view)
        newest = max(read_state(c).step for c in _checkpoints(run_dir))  # the scale-down resumes this or a later one
        removed_at = time.time()
        ray_cluster.remove_node(nodes.pop())  # takes one worker (and its node) away
        _refresh_node_view(ray_cluster)
        step_at_removal = max(workers_by_step())

        _wait_for("training on 1 worker", lambda: any(
            s > step_at_removal and v == 1 for s, v in workers_by_step().items()), timeout_s=300, job=job,
            state=cluster_view)
        _wait_for("a checkpoint after the scale-down", lambda: read_state(_checkpoints(run_dir)[-1]).step
                  > step_at_removal + 1, timeout_s=300, job=job, state=cluster_view)
        nodes.append(add_node())
        _refresh_node_view(ray_cluster)
        _wait_for("2 workers training again", lambda: _runs_of(workers_by_step())[-3:] == [2, 1, 2], timeout_s=300,
                  job=job, state=cluster_view)
        crawl.unlink()
        metrics = job.join(timeout_s=400)
    finally:
        crawl.unlink(missing_ok=True)
        for node in nodes:
            ray_cluster.remove_node(node)

    assert metrics["samples"] == cfg.train.samples
    client, run = mlflow_run(db)
    assert run.info.status == "FINISHED"
    # Rank 0 ran on an extra node (only those have a reclip_slot), yet every MLflow write of the workers - one loss
    # point per step, the model artifact - went through the relay on the driver's node, where a local store's file
    # lives: on a real cluster that node's path would be another, empty file (tracking_relay.TrackingRelay).
    head = ray.get_runtime_context().get_node_id()
    assert run.data.tags["reclip.rank0_node"] != head
    assert run.data.tags["reclip.tracking_relay_node"] == head
    assert int(run.data.tags["reclip.tracking_relay_calls"]) >= cfg.train.samples // cfg.train.batch_size
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    h = _check_history(cfg, client, run, total_steps=cfg.train.samples // cfg.train.batch_size)
    runs = _runs_of(h["workers"])
    assert runs[-3:] == [2, 1, 2] and runs[:-3] in ([], [1]), runs
    # Every resize is a new worker group that resumed from a checkpoint; Ray Train may start a group that it resizes
    # again before it trains a step (counted, but no `workers` point is logged for it).
    assert len(runs) - 1 <= run.data.metrics["restarts"] <= len(runs)
    # ... each from a checkpoint; the first one after the removal (a scale-up before it is possible, see above)
    # resumed the newest registered then, or one registered after it
    written = _checkpoint_steps(client, run.info.run_id, every=cfg.checkpoint.every_samples // cfg.train.batch_size)
    resumed = sorted((m.timestamp, m.step) for m in client.get_metric_history(run.info.run_id, "restarts")
                     if m.value >= 1)
    after = [step for t, step in resumed if t / 1000 > removed_at]
    assert after and after[0] >= newest and {s for _, s in resumed} <= written, (resumed, removed_at, newest, written)
    # The data is re-split: one worker reads the whole global batch, two read half each.
    assert {h["local_batch"][s] for s in h["local_batch"] if h["workers"][s] == 1} == {64}
    assert {h["local_batch"][s] for s in h["local_batch"] if h["workers"][s] == 2} == {32}
    _final_checkpoint_is_complete(cfg, metrics)
    print(f"\n[reliability] node removed (2 -> 1 workers): recovery {_recovery_seconds(client, run.info.run_id, removed_at):.1f} s")
    assert ray.cluster_resources().get("reclip_slot", 0) == 0


def _refresh_node_view(cluster) -> None:
    """Have Ray's AutoscalingCoordinator re-read the node list now rather than at its next 20 s tick, once the GCS
    lists the nodes ``cluster`` has (a removed node is dead there, an added one alive).

    Ray Train's elastic policy sizes a restart from the coordinator's view. Left alone, a node removed just before
    a restart is still counted for up to 20 s, the restart then waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s)
    for a worker that cannot be placed, and recovery takes about 70 s instead of about 10 (both measured, see
    RELIABILITY.md). That wait is Ray's polling, not this project's recovery, so the test skips it; best effort,
    since the coordinator is a Ray-internal actor. After a removal it races Ray Train's own restart decision, which
    follows the worker's failed health check: in two runs the refresh was done 0.1 and 0.4 s before the controller
    decided (Ray Train's controller log), and a baseline run that recovered in 66.4 s matches losing that race.
    Hence the elastic test's lower start timeout: with the refresh left out, the restart asked for two workers,
    timed out twice after 10 s each and recovered in 30.4 s (measured).
    """
    cluster.wait_for_nodes()
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        import ray

        ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("reclip-tests", recompute=True),
                timeout=10)
    except Exception as exc:  # an internal API: if it moves, the test still passes, only slower
        print(f"[reliability] could not refresh the coordinator's node view: {exc!r}")


def _runs_of(by_step: dict[int, float]) -> list[int]:
    """Worker counts in step order with repeats collapsed: {1: 2, 2: 2, 3: 1, 4: 2} -> [2, 1, 2]."""
    values = [int(by_step[s]) for s in sorted(by_step)]
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


# ------------------------------------------------------------------------------------------ 3. uneven data


def test_uneven_shards_and_a_worker_count_that_does_not_divide_the_rows(ray_session, make_cfg, tmp_path, synth_dir):
    table = pa.concat_tables(pq.read_table(f) for f in sorted((synth_dir / "train").rglob("*.parquet")))
    out = tmp_path / "uneven"
    out.mkdir()
    start = 0
    for i, n in enumerate((7, 311, 1, 90)):  # 409 rows: not a multiple of 3 workers or of the batch
        pq.write_table(table.slice(start, n), out / f"part-{i}.parquet")
        start += n
    # Phase 0 also drops half its patches (FLIP): gflops_total must count the tokens that ran, at uneven steps.
    # A checkpoint by the clock at every log window (every step: checkpoint.every_minutes of 6 ms), which rank 0
    # decides and all 3 ranks must take at the same step, each settling its uneven share of the stream.
    cfg = make_cfg("uneven", workers=3, extra=["scaling.cpus_per_worker=0.4", "eval.at_phase_end=false",
                                                "train.batch_size=50", "train.samples=668", "checkpoint.every_samples=0",
                                                "checkpoint.every_minutes=0.0001", "fault.record_rows=true",
                                                "phases.0.patch_dropout=0.5"],
                   train=out)
    from reclip_ray.train.launch import run_training

    metrics = run_training(cfg)
    assert metrics["samples"] == 668
    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    steps = len(_history(client, run.info.run_id, "loss"))
    # 501 = 10 x 50 + 1: a 1-row step would leave 2 of the 3 workers without a row, so the 10th step trains 51;
    # 167 = 3 x 50 + 17 -> 4 steps.
    assert steps == 14
    # Every rank took the same number of steps (gathered across ranks at each phase end).
    assert run.data.metrics["rank_steps_min"] == run.data.metrics["rank_steps_max"] == steps
    # The rows actually trained (recorded by every rank at every step), not a counter: exactly train.samples, and
    # each phase's last step trains exactly what it counts.
    from test_data_position import trained_rows

    rows = trained_rows(Path(metrics["run_dir"]))
    assert sum(len(r) for r in rows.values()) == 668
    assert [len(rows[s]) for s in (10, 14)] == [51, 17] and all(len(rows[s]) == 50 for s in rows if s not in (10, 14))
    # The rows that do not divide rotate over the ranks, so each rank trains within one row of the others in each
    # phase (its equal share of the stream, streaming_split(equal=True)): 167 x 3, then 56 + 56 + 55.
    per_rank: Counter = Counter()
    for path in (Path(metrics["run_dir"]) / "rows").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_rank[(rec["phase"], int(path.name[4:path.name.index("-")]))] += len(rec["keys"])
    assert [[per_rank[(p, r)] for r in range(3)] for p in (0, 1)] == [[167, 167, 167], [56, 56, 55]]
    assert run.data.metrics["local_batch"] == 6  # rank 0's share of the last step: 17 = 6 + 6 + 5
    # The two checkpoints kept (checkpoint.num_to_keep): the clock's at step 13 (651 samples) and the phase end's;
    # without the clock's they would be the two phase ends' (501, 668).
    kept = sorted(p.name for p in Path(metrics["run_dir"]).glob("checkpoint_s*"))
    assert kept == ["checkpoint_s000000000651_p1", "checkpoint_s000000000668_p1e"], kept

    # gflops_total at every step = the rows trained so far x each phase's training FLOPs per sample, phase 0's with
    # 8 of its 16 patch tokens (+ the class token) at 32 px: a worker that ignored the dropout would count 17.
    from reclip_ray.flops import image_tokens, run_flops, train_flops_per_sample

    assert image_tokens(cfg.model.vision, 32, 0.5) == 9
    per_sample = [train_flops_per_sample(cfg.model, p.image_size, p.text_length, 50, patch_dropout=rate)
                  for p, rate in zip(cfg.phases, (0.5, 0.0))]
    assert per_sample[0] < train_flops_per_sample(cfg.model, 32, cfg.phases[0].text_length, 50)
    gflops, phase = (_history(client, run.info.run_id, k) for k in ("gflops_total", "phase"))
    total = 0.0
    for step in sorted(rows):
        total += len(rows[step]) * per_sample[int(phase[step])] / 1e9
        assert gflops[step] == pytest.approx(total, rel=1e-9), step
    assert metrics["gflops_total"] == pytest.approx(total, rel=1e-9)
    assert total == pytest.approx(run_flops(cfg)["total_train_gflops"], rel=1e-9)  # what `plan` showed


# ------------------------------------------------------------------------------------------ 4. bad data


def _corrupt_copy(src: Path, out: Path, every: int) -> int:
    """Copy the shards, overwriting every ``every``-th image with bytes that are not an image; returns how many."""
    out.mkdir()
    bad = 0
    for i, f in enumerate(sorted(src.rglob("*.parquet"))):
        t = pq.read_table(f)
        images = t.column("image").to_pylist()
        for j in range(0, len(images), every):
            images[j] = b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes(j % 7)
            bad += 1
        t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        pq.write_table(t, out / f"shard-{i:02d}.parquet")
    return bad


def test_a_few_bad_rows_train_through_and_a_deleted_shard_is_skipped(ray_session, make_cfg, tmp_path, synth_dir):
    data = tmp_path / "bad"
    _corrupt_copy(synth_dir / "train", data, every=40)  # 2.5% of the rows
    pq.write_table(pq.read_table(sorted(data.glob("*.parquet"))[0]).slice(0, 50), data / "shard-99-extra.parquet")
    cfg = make_cfg("badrows", workers=1, train=data, extra=[
        "data.max_bad_fraction=0.05", "data.missing_shards=skip", "eval.at_phase_end=false",
        "checkpoint.every_samples=256", "train.samples=2048", "fault.step_delay_s=0.1",
    ])
    run_dir = Path(cfg.run.storage_path) / "badrows"
    job = _Background(cfg)
    _wait_for("a checkpoint", lambda: _checkpoints(run_dir), timeout_s=240)
    (data / "shard-99-extra.parquet").unlink()  # the later passes over the shards no longer find it
    metrics = job.join(timeout_s=400)

    assert metrics["samples"] == 2048
    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    seen, bad = run.data.metrics["data_rows_seen"], run.data.metrics["data_rows_bad"]
    assert bad > 0 and 0.01 < bad / seen < 0.04
    assert run.data.metrics["data_shards_missing"] == 1


def test_a_deleted_shard_fails_clearly_and_the_run_resumes_once_it_is_back(ray_session, make_cfg, tmp_path, synth_dir):
    from reclip_ray.train.launch import run_training
    from reclip_ray.train.ray_errors import root_message

    data = tmp_path / "data"
    data.mkdir()
    for f in sorted((synth_dir / "train").rglob("*.parquet")):
        (data / f.name).write_bytes(f.read_bytes())
    victim = sorted(data.glob("*.parquet"))[1]
    kept = victim.read_bytes()
    # run.max_failures stays at its default (2): a missing shard is deterministic and must end the run at once
    cfg = make_cfg("gone", train=data, extra=["eval.at_phase_end=false", "checkpoint.every_samples=256",
                                               "train.samples=2048", "fault.step_delay_s=0.1"])
    assert cfg.run.max_failures == 2
    run_dir = Path(cfg.run.storage_path) / "gone"
    job = _Background(cfg)
    _wait_for("a checkpoint", lambda: _checkpoints(run_dir), timeout_s=240)
    victim.unlink()
    with pytest.raises(Exception) as info:
        job.join(timeout_s=400)
    message = root_message(info.value)
    assert message.startswith(f"shard {victim} disappeared during the run"), message
    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    # One worker group: the worker recorded the error as ours, and the restart Ray Train began found it
    assert [m.value for m in client.get_metric_history(run.info.run_id, "restarts")] == [0]
    assert json.loads((run_dir / ".fatal_error.json").read_text()) == {"type": "DataError", "message": message}
    last = _checkpoints(run_dir)[-1]
    saved = read_state(last)
    assert 0 < saved.samples < 2048

    victim.write_bytes(kept)  # the user restores the shard and runs the same command again
    metrics = run_training(make_cfg("gone", train=data, extra=["eval.at_phase_end=false", "checkpoint.every_samples=256",
                                                                "train.samples=2048"]))
    assert metrics["samples"] == 2048 and metrics["mlflow_run_id"] == run.info.run_id
    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.tags["reclip.restarts"] == "1"
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert [m.step for m in restarts if m.value == 1] == [saved.step]  # resumed exactly at the kept checkpoint
    assert sorted(_history(client, run.info.run_id, "loss")) == list(range(1, 33))


# ------------------------------------------------------------------------------------------ 5. object storage, Ctrl-C


def _s3_listing(prefix: str) -> list[str]:
    """Every object under an ``s3://`` prefix, relative to it."""
    import pyarrow.fs as pafs

    from reclip_ray import storage

    fs, inner = storage.filesystem(prefix)
    return sorted(i.path[len(inner) + 1:] for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                  if i.type == pafs.FileType.File)


def test_on_s3_a_fatal_error_is_not_retried_ctrl_c_stops_and_the_same_command_resumes_and_finishes(
        ray_cluster, tmp_path, synth_dir, s3_prefix, monkeypatch):
    """One run folder on a real S3 API (moto on localhost), data on S3 too, driven by the CLI as a user would:

    1. too many bad rows: a deterministic error, written to the run folder on S3, so Ray Train does not retry it;
    2. the same run, fixed data: Ctrl-C after a checkpoint (exit 130, MLflow KILLED, no worker left);
    3. the same command: resumes from the S3 checkpoint into the same MLflow run and finishes, evaluating (the run
       trains with ``train.loss: siglip``, the one Ray run of the suite that does);
    4. once more: "already finished" (from the run-state file on S3);
    5. ``reclip-ray eval --checkpoint s3://.../model``; 6. ``reclip-ray report`` of the S3 run folder.
    Then the bucket is listed: checkpoints, Ray Train's snapshot, model/, eval.json, the run-state file, the
    tokenizer trained into the run folder, .data_start/, report.png and ray.log are all under the prefix, and no
    local folder named ``s3:`` was made (in the CLI's cwd, this process's, a Ray worker's or SESSION/artifacts, where
    Ray Train's workers run). It replaces the local Ctrl-C and too-many-bad-rows tests (their assertions are here).
    """
    import ray
    from ray.util.state import list_actors

    import reclip_ray
    from conftest import fresh_mlflow_db
    from reclip_ray import storage
    from reclip_ray.cli import main
    from reclip_ray.config import load_config
    from reclip_ray.lease import LEASE_FILE
    from reclip_ray.report import report_run
    from reclip_ray.run_names import stream_layout

    data = f"{s3_prefix}/data"
    storage.upload_dir(str(synth_dir / "train"), f"{data}/train")
    storage.upload_dir(str(synth_dir / "eval"), f"{data}/eval")
    _corrupt_copy(synth_dir / "train", tmp_path / "bad", every=40)  # 2.5% of the rows: over a 1% budget
    storage.upload_dir(str(tmp_path / "bad"), f"{data}/bad")
    runs = f"{s3_prefix}/runs"
    run_dir = f"{runs}/s3run"
    db = fresh_mlflow_db(tmp_path / "mlflow.db")
    overrides = [
        "run.name=s3run", f"run.storage_path={runs}", f"tracking.uri=sqlite:///{db}", "tracking.experiment=it",
        f"data.train={data}/train", f"data.eval={data}/eval", "data.vocab_size=512",  # no data.tokenizer: trained
        "data.synth_if_missing=false", "model.vision.depth=2", "model.text.depth=2", "train.samples=2048",
        "train.batch_size=64", "train.log_every_steps=1", "phases.0.samples=0.75", "phases.1.samples=0.25",
        "checkpoint.every_samples=256", "scaling.min_workers=2", "scaling.max_workers=2",
        "scaling.cpus_per_worker=0.5", "scaling.use_gpu=false", "data.shuffle_buffer=128", "eval.at_phase_end=false",
        "train.loss=siglip",
    ]
    cli = [sys.executable, "-m", "reclip_ray"]
    command = cli + ["train", "--json", "--config", "tiny"] + [a for o in overrides for a in ("--set", o)]
    # The CLI joins this session's cluster (RAY_ADDRESS) and reaches the S3 server through AWS_ENDPOINT_URL (set
    # by the s3_server fixture); RAY_AUTH_MODE=token is inherited from this process.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "OMP_NUM_THREADS": "1"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    here = os.getcwd()  # this process's, until steps 4-6 run in the CLI's

    def run(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
        t0 = time.time()
        try:
            return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        finally:
            print(f"\n[reliability] on S3, reclip-ray {' '.join(args[3:5])} ...: {time.time() - t0:.1f} s", flush=True)

    # 1. A deterministic error: one worker group, then the restart Ray Train begins finds .fatal_error.json on S3.
    # run.max_failures stays at its default (2): the error must end the run at the restart's first check.
    failed = run(command + ["--set", f"data.train={data}/bad", "--set", "data.max_bad_fraction=0.01"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    # What `reclip-ray train` prints for more bad rows than data.max_bad_fraction: one line, naming a shard and row.
    assert re.search(r"^reclip-ray: error: training failed: \d+ of \d+ rows \(\d+\.\d%\) bad rows \(> 1\.0%, "
                     r"data\.max_bad_fraction\) e\.g\. shard-\d\d\.parquet row \d+ key=\S+: ", failed.stderr, re.M), \
        failed.stderr[-3000:]
    assert "training a 512-token BPE tokenizer" in failed.stdout
    client, first = mlflow_run(db)
    assert first.info.status == "FAILED"
    # One worker group trained; the restart Ray Train began was ended before training (no second `restarts` point).
    assert [m.value for m in client.get_metric_history(first.info.run_id, "restarts")] == [0]
    assert storage.read_json(f"{run_dir}/.fatal_error.json")["type"] == "DataError"

    # 2. The data fixed, the same run: Ctrl-C once a checkpoint is on S3.
    log = open(tmp_path / "second.log", "w")
    proc = subprocess.Popen(command + ["--set", "fault.step_delay_s=0.3"], env=env, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for("a checkpoint on S3", lambda: s3_checkpoints(run_dir) or proc.poll() is not None, timeout_s=240)
        assert proc.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
        assert not storage.exists(f"{run_dir}/.fatal_error.json")  # a rerun tries again
        # The same command again while this launch trains (a user rerunning "to resume", the first still alive):
        # refused in one line, before MLflow or Ray (no attempt counted: the run state says 3 at the end); this launch
        # trains on.
        # It starts no Ray, so main() runs it in this process.
        refused = io.StringIO()
        with contextlib.redirect_stderr(refused):
            assert main(command[3:]) == 2
        assert re.fullmatch(rf"reclip-ray: error: {re.escape(run_dir)} is in use by another launch \(pid {proc.pid} "
                            r"on [^,]+, started \d+ s ago, heard from \d+ s ago\): stop it first .*\n",
                            refused.getvalue()), refused.getvalue()
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "second.log").read_text()
    assert rc == 130, text[-3000:]
    assert "reclip-ray: interrupted" in text and "training a 512-token" not in text  # the S3 tokenizer is reused
    client, run_ = mlflow_run(db)
    assert run_.info.run_id == first.info.run_id and run_.info.status == "KILLED"
    kept = s3_checkpoints(run_dir)[-1]
    saved = json.loads(storage.read_text(f"{run_dir}/{kept}/meta.json"))
    assert 0 < saved["samples"] < 2048
    # Its data position (mid-phase 0) is stored with the values that number it, which step 3's resume checks
    assert saved["data"]["layout"] == stream_layout(load_config("tiny", overrides)), saved["data"]
    assert not storage.exists(f"{run_dir}/{LEASE_FILE}")  # the Ctrl-C'd launch released the run folder
    _wait_for("the training workers to exit", lambda: not list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]), timeout_s=60)

    # 3. The same command resumes from the checkpoint on S3, into the same MLflow run, and finishes.
    again = run(command + ["--set", "eval.at_phase_end=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout[again.stdout.index("{"):])
    client, run_ = mlflow_run(db)
    assert out["mlflow_run_id"] == run_.info.run_id == first.info.run_id and run_.info.status == "FINISHED"
    assert run_.data.tags["reclip.restarts"] == "2"  # the fatal attempt, the Ctrl-C'd one, this one
    restarts = client.get_metric_history(run_.info.run_id, "restarts")
    assert [m.step for m in restarts if m.value == 2] == [saved["step"]]  # resumed exactly at the S3 checkpoint
    assert sorted(_history(client, run_.info.run_id, "loss")) == list(range(1, 33))
    # The run trains with the sigmoid loss (train.loss=siglip, texts exchanged between the 2 workers' ranks): its
    # bias is trained, one point per step, and exported with the model (step 5)
    bias = _history(client, run_.info.run_id, "logit_bias")
    assert run_.data.params["train.loss"] == "siglip" and sorted(bias) == list(range(1, 33))
    assert len(set(bias.values())) > 1
    assert out["run_dir"] == run_dir and out["report"] == f"{run_dir}/report.png"
    assert not storage.exists(f"{run_dir}/{LEASE_FILE}")
    final = storage.read_json(f"{run_dir}/eval.json")  # the launcher's final metrics come from it
    logged = {k: run_.data.metrics[k] for k in final if k in run_.data.metrics}
    assert any(k.startswith("eval/64px/") for k in logged) and final == pytest.approx({**final, **logged})
    assert out["final"] == {k: v for k, v in final.items() if k in out["final"]} and out["final"]

    # 4. Once more: the run-state file on S3 says it is done; no new MLflow run, no training. Steps 4 and 5 start
    # no Ray, so they run the CLI's main() with the same arguments in this process, in the CLI's cwd: the three
    # `python -m reclip_ray` processes above cover the entry point, and each more would cost ~4 s of imports.

    def in_process(args: list[str]) -> str:
        """What `reclip-ray ARGS` prints, run by main() here (capsys would also take the [reliability] lines)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(args) == 0
        return out.getvalue()

    monkeypatch.chdir(cwd)
    done = in_process(command[3:])
    assert f"run 's3run' already finished (2048 samples); model at {run_dir}/model" in done, done[-3000:]
    assert len(client.search_runs([first.info.experiment_id])) == 1

    # 5. The exported model, straight from S3: its sigmoid-loss bias is the trained one, and it evaluates.
    exported, _ = reclip_ray.load_model(f"{run_dir}/model")
    assert float(exported.logit_bias.detach()) == pytest.approx(bias[32], abs=1e-6)
    evaluated = in_process(["eval", "--checkpoint", f"{run_dir}/model", "--data", f"{data}/eval"])
    result = json.loads(evaluated[evaluated.index("{"):])
    assert result["image_size"] == 64 and result["metrics"]["rows"] == 200
    for key, value in result["metrics"].items():  # the same numbers as the run's own last evaluation
        if key.endswith("/top1"):
            assert value == pytest.approx(final[f"eval/64px/{key}"], abs=1 / 200 + 1e-9), key

    # 6. `reclip-ray report RUN_DIR` on the S3 folder: finds the run through reclip_run.json there, redraws it.
    storage.delete_file(f"{run_dir}/report.png")
    assert report_run(run_dir) == f"{run_dir}/report.png"
    assert storage.read_bytes(f"{run_dir}/report.png").startswith(b"\x89PNG")

    listing = _s3_listing(run_dir)
    state = storage.read_json(f"{run_dir}/reclip_run.json")
    assert state["mlflow_run_id"] == first.info.run_id and state["attempts"] == 3
    assert state["finished"]["samples"] == 2048
    assert {"checkpoint_manager_snapshot.json", "reclip_run.json", "eval.json", "tokenizer.json", "report.png",
            "ray.log", "model/config.yaml", "model/tokenizer.json", ".data_start/phase0.json",
            ".data_start/phase1.json"} <= set(listing), listing
    assert any(f.startswith("model/model.") for f in listing), listing
    final_ckpt = [c for c in s3_checkpoints(run_dir) if c.endswith("_p1e")]
    assert final_ckpt and f"{final_ckpt[-1]}/meta.json" in listing
    assert json.loads(storage.read_text(f"{run_dir}/{final_ckpt[-1]}/meta.json"))["samples"] == 2048
    # Path("s3://b/x") is the relative path s3:/b/x: it would land in the cwd of the process that made it: the
    # CLI's, a Ray worker's, or a Ray Train worker's (SESSION/artifacts/RUN_NAME).
    worker_cwd = ray.get(ray.remote(num_cpus=0)(lambda: os.getcwd()).remote())
    for folder in {str(cwd), here, worker_cwd}:
        assert not os.path.exists(os.path.join(folder, "s3:")), folder
    artifacts = os.path.join(ray_cluster.head_node.get_session_dir_path(), "artifacts")
    assert os.path.isdir(os.path.join(artifacts, "s3run"))  # where this run's workers ran
    made = [f for f, dirs, _ in os.walk(artifacts) if "s3:" in dirs]
    assert not made, made
