"""`ray job submit` end to end against a real head node started with `ray start --head --block`, as the README's
"On a cluster" runs it: data and run folder on S3 (a real S3 API on localhost, moto), tokenizer a local file.

The head runs under its own session (setsid) with its own temp dir and ports, token authentication on, and only
that process group is killed at the end (never `ray stop`, which would take every Ray on the machine with it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import overrides_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: with token authentication on, 401 is an answer)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    ray = shutil.which("ray", path=env["PATH"]) or "ray"
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ray_job_submit_runs_pretrain_to_success_with_data_and_runs_on_s3(tmp_path, synth_dir, tokenizer_path,
                                                                          s3_prefix):
    from mlflow.tracking import MlflowClient

    from reclip_ray import storage

    data, runs = f"{s3_prefix}/data", f"{s3_prefix}/runs"
    storage.upload_dir(str(synth_dir / "train"), f"{data}/train")
    storage.upload_dir(str(synth_dir / "eval"), f"{data}/eval")

    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths are limited
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The nodes reach S3 with their own credentials (here AWS_ENDPOINT_URL & co., set by the s3_server fixture, in
    # the head's environment; on a cloud, the instance role): the job's runtime env needs nothing for it.
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the head's
        "RAY_AUTH_MODE": "token",  # token authentication stays on, for the head and for the job client
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    })
    head_cmd = [
        "ray", "start", "--head", "--block", f"--temp-dir={temp_dir}", "--num-cpus=4",
        f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(head_cmd, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        # Wait for the dashboard's HTTP server (up once its modules are loaded) with cheap requests, then confirm
        # with the job CLI: each `ray job list` is a Ray-importing process, ~2 s of CPU that the starting head needs.
        while not _answers(address):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's dashboard did not come up"
            time.sleep(0.2)
        while _ray("job", "list", "--address", address, env=env).returncode != 0:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's job server did not come up"
            time.sleep(1.0)

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
        # Path("s3://b/x") is the relative path s3:/b/x: it would land in the job's working dir (under temp_dir).
        made = [folder for folder, dirs, _ in os.walk(temp_dir) if "s3:" in dirs]
        assert not made, made
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the process group this test started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

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
