"""Shared fixtures. One Ray instance per pytest session, in its own temp dir, never `ray stop`."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Workers inherit this; keeps torch from oversubscribing the two cores CI has.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default; at 0.5 s a 16-step test run ends about 5 s sooner
# (measured: 26 -> 19.5 s per run), which over the suite's ~25 runs is two minutes. Set here, before the cluster
# starts, so that the raylet passes it to every worker: also to the controllers of the `reclip-ray train` processes
# that tests start against this cluster (they join it without the session's runtime env).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a preemption-watcher actor (a Python process, ~1.3 s of CPU) with every worker group, to drain
# workers before a spot node is reclaimed; no test preempts a node, and the suite starts some 40 worker groups.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Token authentication, as Ray 2.60 turns it on for the clusters `ray start` (with a token in ~/.ray) and `ray.init()`
# start: the session cluster then asks of the tests' clients (a `ray job submit`, a CLI joining with RAY_ADDRESS,
# which inherit this) what a user's cluster asks of theirs. Set before Ray is imported, which reads it once.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The footer cache (``shards.cache_dir``) in a folder of this session, never the user's ~/.cache: set before the Ray
# cluster starts, so its workers and the CLI subprocesses that tests start inherit it too. Each test's data is under
# its own tmp_path, so one test's entries are never another's (a listing's cache file is named by its path).
_CACHE_DIR = tempfile.mkdtemp(prefix="reclip-test-cache-")
os.environ["RECLIP_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, True)


S3_BUCKET = "reclip-test"
S3_REQUESTS: list[tuple[str, str]] = []  # (method, path?query) of every request the S3 server answered
# Ranged GETs the S3 server answered: (path, first byte, last byte, GETs in flight when it arrived, itself included)
S3_RANGES: list[tuple[str, int, int, int]] = []
S3_RANGE_LATENCY_S = [0.0]  # added to each ranged GET while a test sets it: an object store's first-byte latency
_IN_FLIGHT = [0]
_RANGES_LOCK = threading.Lock()
# Writes the S3 server refuses (the ``s3_faults`` fixture): each a [path substring, requests left to refuse, refused,
# query substring]
S3_FAULTS: list[list] = []
_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
           b'<Message>Access Denied (planted by the test)</Message><RequestId>planted</RequestId></Error>')


def _log_requests(server) -> None:
    """Record each request the moto server answers in ``S3_REQUESTS`` (the ``s3_requests`` fixture reads it), so
    tests can count what a code path costs on a real object store: PUTs per shard, LISTs per dataset; and refuse
    the writes ``S3_FAULTS`` names, with S3's 403 AccessDenied (not retried by the AWS SDK: the write fails at once,
    as it does when a token expires or a bucket policy changes mid-run)."""
    wsgi = server._server
    app = wsgi.app

    def logged(environ, start_response):
        query = environ.get("QUERY_STRING", "")
        path = environ.get("PATH_INFO", "")
        S3_REQUESTS.append((environ["REQUEST_METHOD"], path + (f"?{query}" if query else "")))
        fault = next((f for f in S3_FAULTS if f[1] > 0 and f[0] in path and f[3] in query), None)
        if fault is not None and environ["REQUEST_METHOD"] in ("PUT", "POST"):
            fault[1] -= 1
            fault[2].append(path)
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # the answer comes after the body
            start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                              ("Content-Length", str(len(_DENIED)))])
            return [_DENIED]
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", environ.get("HTTP_RANGE", ""))
        if ranged is None:
            return app(environ, start_response)
        with _RANGES_LOCK:
            _IN_FLIGHT[0] += 1
            S3_RANGES.append((path, int(ranged[1]), int(ranged[2]), _IN_FLIGHT[0]))
        try:
            time.sleep(S3_RANGE_LATENCY_S[0])
            return list(app(environ, start_response))  # the body made now: in flight until it is
        finally:
            with _RANGES_LOCK:
                _IN_FLIGHT[0] -= 1

    wsgi.app = logged


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on localhost (moto's server mode, as Ray's own tests use) with one bucket, ``S3_BUCKET``.

    The AWS variables are set in this process before the Ray cluster starts (``ray_cluster`` depends on this
    fixture), so the driver, Ray's workers and any CLI subprocess reach the same server through the standard
    ``AWS_ENDPOINT_URL``. Yields the endpoint URL. Tests use their own prefix under the bucket.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would bury the tests' own output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _log_requests(server)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh ``s3://`` prefix for one test (nothing under it yet)."""
    import uuid

    return f"s3://{S3_BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_faults(s3_server):
    """``refuse(contains, times=1, query="")``: the next ``times`` writes (PUT or POST: a multipart upload starts with
    one) to a key whose path contains ``contains`` and whose query string contains ``query`` are refused (403); returns
    the list of paths refused so far. ``query="partNumber=2"`` refuses a multipart upload's second part."""
    def refuse(contains: str, times: int = 1, query: str = "") -> list[str]:
        refused: list[str] = []
        S3_FAULTS.append([contains, times, refused, query])
        return refused

    yield refuse
    S3_FAULTS.clear()


@pytest.fixture
def s3_requests(s3_server) -> list[tuple[str, str]]:
    """The requests the S3 server answers from now on, as (method, path?query); the list grows as the test runs."""
    S3_REQUESTS.clear()
    return S3_REQUESTS


def _ensure_auth_token() -> None:
    """The user's default token (~/.ray/auth_token), made once on a machine that has none, as `ray.init()` does."""
    if os.environ.get("RAY_AUTH_MODE") != "token" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        return
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray if os.path.exists(ray) else "ray", "get-auth-token", "--generate"], check=True,
                   capture_output=True)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``) that the whole test session shares.

    The head has more logical CPUs than the machine has cores, so fractional-CPU workers leave room for Ray Data.
    Tests that need more nodes add them with a custom resource (see test_reliability) and remove them again. The
    dashboard is on (a free port): Ray Train's placement-group cleaner and the state API need it.
    """
    import ray
    from ray.cluster_utils import Cluster

    _ensure_auth_token()
    # A `ray job submit` entrypoint's `python` is found on the PATH of the cluster's processes: make it this one.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    # Ray records the newest cluster's address in /tmp/ray/ray_current_cluster and fails if /tmp/ray is missing
    # (a fresh machine where no Ray ran with its default temp dir).
    os.makedirs("/tmp/ray", exist_ok=True)
    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "include_dashboard": True,
            "dashboard_port": 0,
            "temp_dir": temp_dir,
            "object_store_memory": 1 << 30,
        },
    )
    env = {"OMP_NUM_THREADS": "1", "RECLIP_CACHE_DIR": _CACHE_DIR,
           **{k: v for k, v in os.environ.items() if k.startswith(("AWS_", "RAY_TRAIN_"))}}
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The connected ``ray`` module (for tests that only need a Ray, not the cluster handle)."""
    import ray

    yield ray


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small captioned-shapes dataset shared by the tests that only read it."""
    from reclip_ray.data.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, train=600, eval=200, seed=0, shard_rows=200)
    return out


@pytest.fixture(scope="session")
def tokenizer_path(synth_dir, tmp_path_factory) -> Path:
    from reclip_ray.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(synth_dir / "train", vocab_size=512, out=out)
    return out


_MLFLOW_TEMPLATE: list[Path] = []


def fresh_mlflow_db(path: Path) -> Path:
    """An empty, already-migrated MLflow SQLite store at ``path`` (a copy of one made once per session).

    Creating the tables costs about 1.5 s per store; the Ray tests make some 25 stores.
    """
    if not path.exists():
        if not _MLFLOW_TEMPLATE:
            from mlflow.tracking import MlflowClient

            template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
            _MLFLOW_TEMPLATE.append(template)
        shutil.copyfile(_MLFLOW_TEMPLATE[0], path)
    return path


def overrides_for(tmp_path: Path, synth_dir: Path, tokenizer_path: Path, name: str,
                  workers: int | tuple[int, int] = 1, extra=(), train: Path | None = None) -> list[str]:
    """`--set` overrides of a small two-phase `tiny` run on the shared synthetic data, MLflow in ``tmp_path``."""
    lo, hi = workers if isinstance(workers, tuple) else (workers, workers)
    return [
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{fresh_mlflow_db(tmp_path / 'mlflow.db')}",
        "tracking.experiment=it",
        f"data.train={train or synth_dir / 'train'}",
        f"data.eval={synth_dir / 'eval'}",
        f"data.tokenizer={tokenizer_path}",
        "data.synth_if_missing=false",
        "model.vision.depth=2",
        "model.text.depth=2",
        "train.samples=1024",
        "train.batch_size=64",
        "train.log_every_steps=1",
        "phases.0.samples=0.75",
        "phases.1.samples=0.25",
        "checkpoint.every_samples=512",
        f"scaling.min_workers={lo}",
        f"scaling.max_workers={hi}",
        "scaling.cpus_per_worker=0.5",
        "scaling.use_gpu=false",
        # 4x the local batch instead of the default 10x: each phase of each test run fills it before its first step,
        # and that wait is most of a 16-step run's data time. The shuffle itself is tested in test_data_stream.py.
        "data.shuffle_buffer=128",
        *FAST_START,
        *extra,
    ]


# Blocks of decode_batch_size (64) rows instead of data.block_mb's (8 MB: a whole read unit at 32 px). On
# these 2 cores the first block of each rank is the wait before a phase's first step, at every phase of every
# attempt: 6.9 s with 8 MB blocks, 3.0 s with these (/tmp/s43/prof.py, a 2-worker run). Byte-sized blocks keep
# their tests: test_data_pipeline (their size), the default job and the S3 reliability run (a restart, trained with
# them), and the sweep smoke test.
FAST_START = ["data.block_mb=0"]


@pytest.fixture
def make_cfg(tmp_path, synth_dir, tokenizer_path):
    """Builds the config of ``overrides_for`` (same arguments, minus the paths)."""
    from reclip_ray.config import load_config

    def make(name: str, workers: int | tuple[int, int] = 1, extra=(), train: Path | None = None):
        return load_config("tiny", overrides_for(tmp_path, synth_dir, tokenizer_path, name, workers, extra, train))

    return make


# No shuffle buffer, one read task and 32-row blocks: the stream arrives in the order of the shards, so two runs of
# this data can be compared row for row (fault.record_rows writes the keys each rank trains at each step).
IN_ORDER = ["data.shuffle_buffer=0", "data.read_parallelism=1", "data.decode_batch_size=32", "data.block_mb=0",
            "train.log_every_steps=1", "fault.record_rows=true"]


@pytest.fixture(scope="session")
def in_order_run(ray_cluster, tmp_path_factory, synth_dir, tokenizer_path):
    """``in_order_run(workers)`` -> (tmp_path, config, final metrics) of the two-phase run of ``overrides_for`` with
    the stream ``IN_ORDER``, evaluating at each phase end and checkpointing, on 1 or 2 workers.

    Each is trained once per session and checked from several sides (test_train_ray: the run's outputs, its
    rerun, and the schedule on 1 vs 2 workers; test_data_position: the rows an uninterrupted run trains): a worker
    group's start-up costs ~20 s on 2 cores. Tests must not write into its run folder or MLflow store.
    """
    from reclip_ray.config import load_config
    from reclip_ray.train.launch import run_training

    done: dict[int, tuple] = {}

    def run(workers: int):
        if workers not in done:
            tmp = tmp_path_factory.mktemp(f"in_order_{workers}w")
            cfg = load_config("tiny", overrides_for(tmp, synth_dir, tokenizer_path, f"w{workers}", workers, IN_ORDER))
            done[workers] = (tmp, cfg, run_training(cfg))
        return done[workers]

    return run


def s3_checkpoints(run_dir: str) -> list[str]:
    """The checkpoints of a run folder on S3 that Ray Train registered and whose meta.json is there, oldest first
    (as ``_checkpoints`` in test_reliability lists a local one's)."""
    from reclip_ray import storage

    snapshot = storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json"), default={})
    names = [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]
    return sorted(n for n in names if storage.is_file(storage.join(run_dir, n, "meta.json")))


_CHECKPOINT_WRITER = """
import sys
from reclip_ray.train.scratch import checkpoint_folder
folder = checkpoint_folder()
with open(folder + "/state.pt", "wb") as f:
    f.write(b"x" * int(sys.argv[1]))
print(folder, flush=True)
if sys.argv[2] == "wait":
    sys.stdin.read()  # alive until killed
"""


def checkpoint_writer(size: int, *, wait: bool) -> tuple[subprocess.Popen, str]:
    """A process that writes a ``size``-byte checkpoint where rank 0 writes one (``scratch.checkpoint_folder``, under
    this environment's $TMPDIR), prints its folder and, with ``wait``, stays alive until killed, else exits."""
    proc = subprocess.Popen([sys.executable, "-c", _CHECKPOINT_WRITER, str(size), "wait" if wait else "exit"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    folder = proc.stdout.readline().strip()
    assert folder, "the writer printed no folder"
    if wait:
        assert os.path.isfile(os.path.join(folder, "state.pt")), folder
    return proc, folder


def mlflow_run(db: Path, run_id: str | None = None):
    """(client, run) of the only run in experiment 'it' (or of ``run_id``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    if run_id is not None:
        return client, client.get_run(run_id)
    exp = client.get_experiment_by_name("it")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]
