"""`ray job submit` end to end, as the README's "On a cluster" runs it, against this session's test cluster: its
head's dashboard hosts the job server, as a `ray start --head` node's does. Data and run folder on S3 (a real S3 API
on localhost, moto), tokenizer a local file.

The job runs beside the other tests' work on the shared cluster, so it must leave it as it found it: no actor or
placement group of the job outlives it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import overrides_for

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


def test_ray_job_submit_runs_pretrain_to_success_with_data_and_runs_on_s3(ray_cluster, tmp_path, synth_dir,
                                                                          tokenizer_path, s3_prefix):
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
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # the README: "set RAY_AUTH_MODE=token on the client that submits"
    before = _alive()

    sets = overrides_for(tmp_path, synth_dir, tokenizer_path, "jobrun", workers=2,
                         extra=["eval.at_phase_end=true", f"data.train={data}/train", f"data.eval={data}/eval",
                                f"run.storage_path={runs}"])  # the later --set wins
    # As the README runs it: the submit blocks, streams the job's logs and ends with the job. (Polling `ray job
    # status` instead costs a Ray-importing CLI process, ~2 s of CPU, every few seconds on a 2-core machine.)
    args = ["job", "submit", "--address", address, "--submission-id", "reclip-e2e", "--working-dir", ".",
            "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/pretrain.py", "--config", "tiny"]
    for s in sets:
        args += ["--set", s]
    submitted = _ray(*args, env=env, timeout=480)
    logs = submitted.stdout
    assert submitted.returncode == 0, f"{submitted.stderr[-3000:]}\n{logs[-4000:]}"
    status = _ray("job", "status", "--address", address, "reclip-e2e", env=env).stdout
    assert "succeeded" in status.lower(), f"{status}\n{logs[-4000:]}"

    # Path("s3://b/x") is the relative path s3:/b/x: it would land in the working dir of the process that made it,
    # all under the cluster's session dir: the driver's is the job's working dir as Ray unpacked it (found by its
    # jobs/pretrain.py), the Train workers' is Ray Train's artifacts/<run name>.
    session = ray_cluster.head_node.get_session_dir_path()
    assert any(os.path.isfile(os.path.join(f, "jobs", "pretrain.py")) for f in _walk_for(session, "jobs")), session
    assert _walk_for(os.path.join(session, "artifacts"), "jobrun"), session
    made = _walk_for(session, "s3:")
    assert not made, made

    # The job's supervisor, Ray Train's controller and workers, the tracking relay and their placement group are gone.
    deadline = time.time() + 30
    while left := _alive() - before:
        assert time.time() < deadline, f"left on the cluster: {sorted(left)}"
        time.sleep(0.5)

    run_dir = f"{runs}/jobrun"
    snapshot = storage.read_json(f"{run_dir}/checkpoint_manager_snapshot.json")  # Ray Train's own, on S3
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = storage.read_json(f"{run_dir}/{latest}/meta.json")
    assert (state["samples"], state["phase"], state["phase_done"]) == (1024, 1, True)
    assert storage.is_file(f"{run_dir}/model/model.safetensors")
    assert storage.read_json(f"{run_dir}/reclip_run.json")["finished"]["samples"] == 1024
    assert any(k.startswith("eval/64px/") for k in storage.read_json(f"{run_dir}/eval.json"))
    assert not (tmp_path / "runs").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["samples"] == 1024
    assert any(k.startswith("eval/64px/") for k in runs[0].data.metrics)
    assert runs[0].info.run_id in logs  # the end-of-run table names the MLflow run


def test_ray_job_stop_ends_a_training_job_with_its_mlflow_run_killed_and_nothing_left(ray_cluster, tmp_path,
                                                                                     synth_dir, tokenizer_path):
    """`ray job stop` sends the job's processes SIGTERM (and SIGKILL 3 s later): the driver, on which Ray's SIGTERM
    handler exits from inside ``fit``, ends the run's MLflow run as KILLED within that window, and the job's
    actors and placement group are gone. The steps are slowed (1 s each) so the job is training when stopped."""
    from mlflow.tracking import MlflowClient

    address = f"http://{ray_cluster.head_node.webui_url}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    before = _alive()
    sets = overrides_for(tmp_path, synth_dir, tokenizer_path, "stopped",
                         extra=["fault.step_delay_s=1", "checkpoint.every_samples=128"])
    args = ["job", "submit", "--address", address, "--submission-id", "reclip-stop", "--no-wait", "--working-dir",
            ".", "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/pretrain.py", "--config", "tiny"]
    for s in sets:
        args += ["--set", s]
    submitted = _ray(*args, env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    run_dir = tmp_path / "runs" / "stopped"
    deadline = time.time() + 240
    while not list(run_dir.glob("checkpoint_*")) and time.time() < deadline:
        time.sleep(0.5)
    assert list(run_dir.glob("checkpoint_*")), _ray("job", "logs", "--address", address, "reclip-stop", env=env).stdout
    stopped = _ray("job", "stop", "--address", address, "reclip-stop", env=env)  # waits for the job to exit
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    logs = _ray("job", "logs", "--address", address, "reclip-stop", env=env).stdout
    assert "reclip-ray: interrupted" in logs, logs[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert run.info.status == "KILLED", run.info.status
    assert 0 < run.data.metrics["samples"] < 1024
    deadline = time.time() + 30
    while left := _alive() - before:
        assert time.time() < deadline, f"left on the cluster: {sorted(left)}"
        time.sleep(0.5)
