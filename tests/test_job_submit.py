"""`ray job submit` end to end, as the README's "On a cluster" runs it, against this session's test cluster: its
head's dashboard hosts the job server, as a `ray start --head` node's does. Data and run folder on S3 (a real S3 API
on localhost, moto), tokenizer a local file.

The job runs beside the other tests' work on the shared cluster, so it must leave it as it found it: no actor or
placement group of the job outlives it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import checkpoint_writer, overrides_for, s3_checkpoints

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    ray = shutil.which("ray", path=env["PATH"]) or "ray"
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# Ray Data's per-cluster singletons (detached, named): the first Ray Data user of a cluster starts them, for all.
_CLUSTER_SINGLETONS = {"_StatsActor", "_AutoscalingCoordinatorActor"}


def _alive() -> set[str]:
    """The cluster's live actors (but Ray Data's singletons) and placement groups, as ``actor CLASS ID``, ``group ID``."""
    from ray.util.state import list_actors, list_placement_groups

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
              if a.class_name not in _CLUSTER_SINGLETONS]
    groups = list_placement_groups(filters=[("state", "!=", "REMOVED")], limit=10_000)
    return {f"actor {a.class_name} {a.actor_id}" for a in actors} | {f"group {g.placement_group_id}" for g in groups}


def _walk_for(root: str, name: str) -> list[str]:
    return [folder for folder, dirs, files in os.walk(root) if name in dirs or name in files]


def test_ray_job_submit_runs_pretrain_on_s3_ray_job_stop_kills_it_and_the_same_job_resumes_to_success(
        ray_cluster, tmp_path, synth_dir, tokenizer_path, s3_prefix, s3_faults):
    """The README's cluster path, data and run folder on S3:

    1. ``ray job submit --no-wait``; once a checkpoint is on S3, ``ray job stop``: the job's processes get SIGTERM
       (SIGKILL 3 s later), Ray's handler exits the driver from inside ``fit``, the job's log ends with
       ``reclip-ray: interrupted``, its MLflow run is KILLED within that window, and nothing of it is left;
    2. the same job submitted again, as the README runs it, resumes at that checkpoint in the same MLflow run and
       succeeds. The steps of job 1 are slowed (1 s each, while a flag file exists) so it is training when stopped.
       S3 refuses the copy of job 2's first checkpoint (403): the attempt ends, and Ray Train starts it again at the
       checkpoint before, the stopped job's, which it restores a second time.

    Its checkpoints are uploaded in Ray Train's thread (``checkpoint.upload=async``, the large presets' setting):
    the stop may come while one is being copied (a folder on S3 that Ray Train never registered, which the resumed
    job writes again), the job resumes at the last one Ray Train registered, and the run's last checkpoint is copied
    before the job ends. A checkpoint folder that a killed process left on the node (the stop can leave one: rank 0's,
    while it was written or copied) is removed when the resumed job's workers start.
    """
    from mlflow.tracking import MlflowClient

    from reclip_ray import storage

    data, runs = f"{s3_prefix}/data", f"{s3_prefix}/runs"
    storage.upload_dir(str(synth_dir / "train"), f"{data}/train")
    storage.upload_dir(str(synth_dir / "eval"), f"{data}/eval")

    # The dashboard's address, as `ray start --head` prints it for RAY_ADDRESS. The nodes reach S3 with their own
    # credentials (here AWS_ENDPOINT_URL & co., in the cluster's environment since the s3_server fixture set them
    # before it started; on a cloud, the instance role): the job's runtime env needs nothing for it.
    address = f"http://{ray_cluster.head_node.webui_url}"
    # The cluster has token authentication on (conftest), as the README's `ray start` head has: a client without the
    # token is refused, and the README's client setting is what lets the submit through.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10).close()
    assert refused.value.code == 401
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    # Ray's CLI on a client without the README's setting is refused, and says what is missing
    bare = _ray("job", "list", "--address", address, env=env)
    assert bare.returncode != 0 and "Missing authentication token" in bare.stderr, bare.stderr[-3000:]
    env["RAY_AUTH_MODE"] = "token"  # the README: "set RAY_AUTH_MODE=token on the client that submits"
    before = _alive()

    slow = tmp_path / "slow-steps"
    slow.touch()
    # The default MLflow store, as the README leaves it: not in the job's working directory, Ray's temporary copy of
    # --working-dir, but in $RECLIP_RAY_HOME (job_dir.py), set in the runtime env (the default, ~/reclip-ray, is
    # this machine's own home)
    home = tmp_path / "reclip-home"
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text((REPO / "jobs" / "runtime_env.yaml").read_text().replace(
        "env_vars:\n", f"env_vars:\n  RECLIP_RAY_HOME: {home}\n", 1))
    sets = overrides_for(tmp_path, synth_dir, tokenizer_path, "jobrun", workers=2,
                         extra=["eval.at_phase_end=true", f"data.train={data}/train", f"data.eval={data}/eval",
                                f"run.storage_path={runs}", "checkpoint.every_samples=256", "checkpoint.upload=async",
                                "fault.step_delay_s=1", f"fault.step_delay_while={slow}",
                                "tracking.uri="])  # the later --set wins
    run_dir = f"{runs}/jobrun"

    def submit(job_id: str, *wait: str) -> list[str]:
        args = ["job", "submit", "--address", address, "--submission-id", job_id, *wait, "--working-dir", ".",
                "--runtime-env", str(runtime_env), "--", "python", "jobs/pretrain.py", "--config", "tiny"]
        return args + [a for s in sets for a in ("--set", s)]

    # 1. Submitted, stopped once a checkpoint is on S3.
    started = _ray(*submit("reclip-stop", "--no-wait"), env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    deadline = time.time() + 240
    while not s3_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert s3_checkpoints(run_dir), _ray("job", "logs", "--address", address, "reclip-stop", env=env).stdout[-3000:]
    stopped = _ray("job", "stop", "--address", address, "reclip-stop", env=env)  # waits for the job to exit
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    stop_logs = _ray("job", "logs", "--address", address, "reclip-stop", env=env).stdout
    assert stop_logs.strip().splitlines()[-1] == "reclip-ray: interrupted", stop_logs[-3000:]  # the log's last line
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert killed.info.status == "KILLED" and 0 < killed.data.metrics["samples"] < 1024, killed.info.status
    deadline = time.time() + 30
    while left := _alive() - before:
        assert time.time() < deadline, f"left by the stopped job: {sorted(left)}"
        time.sleep(0.5)
    resume_from = storage.read_json(f"{run_dir}/{s3_checkpoints(run_dir)[-1]}/meta.json")["step"]
    # A checkpoint that a killed process left on this node, as the stop may have left one of the job's (rank 0's,
    # written or being copied when the stop came): the resumed job's workers remove it when they start.
    writer, orphan = checkpoint_writer(5_000_000, wait=True)
    writer.kill()
    writer.wait(timeout=30)

    # S3 refuses the first write of the resumed job's first checkpoint: Ray Train's copy thread fails, mid-copy.
    refused = s3_faults("/jobrun/checkpoint_s", times=1)

    # 2. The same job again, as the README runs it: the submit blocks, streams the job's logs and ends with the job.
    # (Polling `ray job status` instead costs a Ray-importing CLI process, ~2 s of CPU, every few seconds.)
    slow.unlink()
    submitted = _ray(*submit("reclip-e2e"), env=env, timeout=480)
    logs = submitted.stdout
    assert submitted.returncode == 0, f"{submitted.stderr[-3000:]}\n{logs[-4000:]}"
    status = _ray("job", "status", "--address", address, "reclip-e2e", env=env).stdout
    assert "succeeded" in status.lower(), f"{status}\n{logs[-4000:]}"
    assert not os.path.exists(os.path.dirname(orphan)), orphan
    removed = re.search(r"removed \d+ checkpoint folder\(s\) \(\d+\.\d\d GB\) that a process that died left", logs)
    assert removed, logs[-4000:]

    # Path("s3://b/x") is the relative path s3:/b/x: it would land in the working dir of the process that made it,
    # all under the cluster's session dir: the driver's is the job's working dir as Ray unpacked it (found by its
    # jobs/pretrain.py), the Train workers' is Ray Train's artifacts/<run name>.
    session = ray_cluster.head_node.get_session_dir_path()
    assert any(os.path.isfile(os.path.join(f, "jobs", "pretrain.py")) for f in _walk_for(session, "jobs")), session
    assert _walk_for(os.path.join(session, "artifacts"), "jobrun"), session
    made = _walk_for(session, "s3:")
    assert not made, made
    assert not _walk_for(session, "mlflow.db")  # the job's MLflow store is $RECLIP_RAY_HOME's
    assert f"relative outputs (run folder, MLflow store) go to {home}" in logs, logs[-4000:]

    # The job's supervisor, Ray Train's controller and workers, the tracking relay and their placement group are gone.
    deadline = time.time() + 30
    while left := _alive() - before:
        assert time.time() < deadline, f"left on the cluster: {sorted(left)}"
        time.sleep(0.5)

    snapshot = storage.read_json(f"{run_dir}/checkpoint_manager_snapshot.json")  # Ray Train's own, on S3
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = storage.read_json(f"{run_dir}/{latest}/meta.json")
    assert (state["samples"], state["phase"], state["phase_done"]) == (1024, 1, True)
    assert storage.is_file(f"{run_dir}/model/model.safetensors")
    assert storage.read_json(f"{run_dir}/reclip_run.json")["finished"]["samples"] == 1024
    assert any(k.startswith("eval/64px/") for k in storage.read_json(f"{run_dir}/eval.json"))
    assert not (tmp_path / "runs").exists()
    runs = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == killed.info.run_id
    restarts = client.get_metric_history(runs[0].info.run_id, "restarts")
    assert [m.step for m in restarts if m.value == 1] == [resume_from]  # resumed at the stopped job's checkpoint
    # The refused copy ended that attempt; the next one resumed at the same checkpoint, the last Ray Train registered
    assert len(refused) == 1, refused
    assert [m.step for m in restarts if m.value == 2] == [resume_from], [(m.step, m.value) for m in restarts]
    assert f"(step {resume_from}, restart 2)" in logs, logs[-4000:]
    assert runs[0].data.metrics["samples"] == 1024
    # Each checkpoint's cost to the step loop (rank 0's write and report; the copy to S3 ran in Ray Train's thread)
    costs = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "checkpoint_s")}
    assert state["step"] in costs and all(v > 0 for v in costs.values()), costs
    assert any(k.startswith("eval/64px/") for k in runs[0].data.metrics)
    assert runs[0].info.run_id in logs  # the end-of-run table names the MLflow run

