"""Checkpoint folders a dead process leaves on a node are removed by the next worker that starts there; a live
process's are never touched (``reclip_ray/train/scratch.py``). Real processes: a SIGKILL, a clean exit, one still
running, each in its own interpreter, as Ray's worker processes are; and the local copy of a checkpoint on S3 that
the ranks of a node restore from."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import checkpoint_writer
from reclip_ray.train import scratch


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """A private $TMPDIR for this process and its children, and a fresh scratch state for this process."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratch, "_held", {})
    yield tmp_path
    scratch._release()


def test_a_killed_writers_checkpoint_is_removed_and_a_live_ones_is_kept(tmpdir_env):
    own = scratch.checkpoint_folder()
    alive, alive_ckpt = checkpoint_writer(1000, wait=True)
    killed, killed_ckpt = checkpoint_writer(123_456, wait=True)
    try:
        killed.send_signal(signal.SIGKILL)  # no atexit, no finally: what a preempted node or `ray job stop` does
        killed.wait(timeout=30)
        root = scratch.scratch_root()
        assert os.path.dirname(os.path.dirname(killed_ckpt)) == root

        removed = scratch.remove_orphans()

        killed_folder = os.path.dirname(killed_ckpt)
        assert removed == [(killed_folder, 123_456)]
        assert not os.path.exists(killed_folder) and not os.path.exists(killed_folder + ".lock")
        assert os.path.isfile(os.path.join(alive_ckpt, "state.pt"))  # its process holds its lock
        assert os.path.isdir(own)
        assert scratch.remove_orphans() == []  # nothing more: the live one stays however often a worker starts
    finally:
        alive.kill()
        alive.wait(timeout=30)
    # Once its process is gone, the other one goes too.
    assert scratch.remove_orphans() == [(os.path.dirname(alive_ckpt), 1000)]
    assert sorted(os.listdir(scratch.scratch_root())) == sorted([os.path.basename(os.path.dirname(own)),
                                                                os.path.basename(os.path.dirname(own)) + ".lock"])


def test_a_clean_exit_removes_its_own_folder_and_a_half_made_lock_file_is_swept(tmpdir_env):
    proc, ckpt = checkpoint_writer(10, wait=False)
    assert proc.wait(timeout=30) == 0
    assert not os.path.exists(os.path.dirname(ckpt)) and not os.path.exists(os.path.dirname(ckpt) + ".lock")
    # A process that died between creating its lock file and renaming it into place leaves an unlocked ".new" file.
    half = os.path.join(scratch.scratch_root(), ".host-1-abcdef12.new")
    open(half, "w").close()
    assert scratch.remove_orphans() == []  # no folder removed...
    assert not os.path.exists(half)  # ...but the file is gone


_EXPORTER = """
import sys, time
import torch
from reclip_ray import tracking
from reclip_ray.config import load_config
from reclip_ray.data.tokenizer import load_tokenizer
from reclip_ray.model import build_model
from reclip_ray.train.checkpoint import TrainState
from reclip_ray.train.final_export import export_run
def stuck(uri, run_id, local, *args):  # the model is written; MLflow's upload of it takes its time
    print(local, flush=True)
    time.sleep(600)
tracking.log_artifacts = stuck
cfg = load_config("tiny")
tok = load_tokenizer(sys.argv[1])
export_run(cfg, build_model(cfg.model, vocab_size=tok.vocab_size), tok, sys.argv[2], "sqlite:///unused.db", "r",
           TrainState(), None)
"""


def test_a_rank_killed_while_it_exports_leaves_the_model_where_the_next_worker_removes_it(tmpdir_env,
                                                                                          tokenizer_path):
    """The run's export is written locally first (then logged to MLflow and copied to the run folder); rank 0
    killed there leaves a whole model (~600 MB for vit-b-16) in the node's temp folder unless it lies in the
    process's scratch folder."""
    proc = subprocess.Popen([sys.executable, "-c", _EXPORTER, str(tokenizer_path), str(tmpdir_env / "run")],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        model_dir = proc.stdout.readline().strip()
        assert os.path.isfile(os.path.join(model_dir, "model.safetensors")), model_dir
        size = sum(f.stat().st_size for f in Path(model_dir).parent.rglob("*") if f.is_file())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert os.path.isdir(model_dir)

    removed = scratch.remove_orphans()

    assert len(removed) == 1 and model_dir.startswith(removed[0][0] + os.sep)
    assert removed[0][1] >= size > 1_000_000
    assert not os.path.exists(model_dir)
    assert [n for n in os.listdir(tmpdir_env) if n.startswith("reclip")] == [os.path.basename(scratch.scratch_root())]


_READER = """
import hashlib, os, signal, sys
from reclip_ray import storage
from reclip_ray.train.scratch import downloaded
fs, inner = storage.filesystem(sys.argv[1])
with downloaded(inner, fs) as folder:
    st = os.stat(folder + "/state.pt")
    print(folder, st.st_mtime_ns, flush=True)
    sys.stdin.readline()  # reading, until the test says go on
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    with open(folder + "/state.pt", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(digest, os.stat(folder + "/state.pt").st_mtime_ns, flush=True)
"""


class Reader:
    """A rank restoring from a checkpoint on S3 in its own process (``scratch.downloaded``), which holds the local
    copy open until ``go_on``."""

    def __init__(self, uri: str, mode: str = "read"):
        self.proc = subprocess.Popen([sys.executable, "-c", _READER, uri, mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        first = self.proc.stdout.readline().split()
        assert len(first) == 2, f"the reader printed {first}"
        self.folder, self.mtime_ns = first[0], int(first[1])

    def go_on(self) -> tuple[str, int]:
        """Let it read the copy and leave; (sha256 of state.pt as it read it, its mtime then)."""
        out, _ = self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0, out
        digest, mtime = out.split()
        return digest, int(mtime)


def test_the_ranks_of_a_node_share_one_copy_of_a_remote_checkpoint_and_a_late_one_never_rewrites_it(
        tmpdir_env, s3_prefix):
    """The CI failure this guards against: with Ray's ``Checkpoint.as_directory`` a rank that arrives once an earlier
    one has downloaded the checkpoint downloads it again into the same folder, over the ``state.pt`` the earlier rank
    is reading (ray-project/ray#48726), and the resume fails with "PytorchStreamReader failed reading file"."""
    from reclip_ray import storage

    source = tmpdir_env / "ckpt"
    source.mkdir()
    payload = os.urandom(3 << 20)
    (source / "state.pt").write_bytes(payload)
    (source / "meta.json").write_text("{}")
    uri = f"{s3_prefix}/checkpoint_000001"
    storage.upload_dir(str(source), uri)
    expected = hashlib.sha256(payload).hexdigest()

    first = Reader(uri)  # downloads, then reads...
    assert os.path.dirname(first.folder) == scratch.scratch_root()
    late = Reader(uri)  # ...while a late rank arrives: it must read the same copy, not download it again
    assert late.folder == first.folder and late.mtime_ns == first.mtime_ns
    assert late.go_on() == (expected, first.mtime_ns)
    assert os.path.isfile(os.path.join(first.folder, "state.pt"))  # the first rank still reads it
    assert first.go_on() == (expected, first.mtime_ns)
    # The last reader removed the copy and its lock file.
    assert [n for n in os.listdir(scratch.scratch_root()) if n.startswith("restore-")] == []

    # A rank killed while it holds the copy leaves it; the next worker to start on the node removes it.
    killed = Reader(uri, "die")
    killed.proc.communicate("\n", timeout=60)
    assert killed.proc.returncode == -signal.SIGKILL
    assert os.path.isfile(os.path.join(killed.folder, "state.pt"))
    removed = dict(scratch.remove_orphans())
    assert removed.pop(killed.folder) == len(payload) + 2
    assert list(removed.values()) == [0]  # its own process folder, empty: the copy was renamed out of it
    assert [n for n in os.listdir(scratch.scratch_root()) if n.startswith("restore-")] == []


_RANK = """
import hashlib, os, random, sys, time
from reclip_ray import storage
from reclip_ray.train.scratch import downloaded
random.seed(int(sys.argv[2]))
fs, inner = storage.filesystem(sys.argv[1])
for _ in range(3):  # a rank restores at each attempt; here three attempts in a row, each at its own moment
    time.sleep(random.uniform(0, 0.2))
    with downloaded(inner, fs) as folder:
        with open(folder + "/state.pt", "rb") as f:
            first = hashlib.sha256(f.read()).hexdigest()
        time.sleep(random.uniform(0, 0.2))  # loading into the model
        with open(folder + "/state.pt", "rb") as f:
            print(first, hashlib.sha256(f.read()).hexdigest(), flush=True)
"""


def test_eight_ranks_restoring_at_random_moments_each_read_the_whole_checkpoint_and_leave_nothing(
        tmpdir_env, s3_prefix):
    """A node's eight ranks, each entering and leaving the copy three times at random moments: every read sees the
    checkpoint whole and unchanged while the rank holds it, and once all have left, no copy or lock file is left."""
    from reclip_ray import storage

    source = tmpdir_env / "ckpt"
    source.mkdir()
    payload = os.urandom(1 << 20)
    (source / "state.pt").write_bytes(payload)
    uri = f"{s3_prefix}/checkpoint_000002"
    storage.upload_dir(str(source), uri)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, uri, str(seed)], stdout=subprocess.PIPE, text=True, env=env)
             for seed in range(8)]
    outputs = [r.communicate(timeout=120)[0] for r in ranks]
    assert [r.returncode for r in ranks] == [0] * 8
    expected = hashlib.sha256(payload).hexdigest()
    assert [line.split() for out in outputs for line in out.splitlines()] == [[expected, expected]] * 24
    assert [n for n in os.listdir(scratch.scratch_root()) if n.startswith("restore-")] == []


def test_the_worker_restores_a_checkpoint_on_s3_through_the_nodes_shared_copy_not_ray_as_directory(
        tmpdir_env, s3_prefix, monkeypatch):
    """RELIABILITY: a worker restarting from a checkpoint on object storage reads it through ``scratch.downloaded``
    (one copy per node, never rewritten under a reader), not Ray's ``Checkpoint.as_directory`` (the tests above show
    why); the copy is gone once the state is loaded. ``Worker._restore`` on its own, with Ray Train's checkpoint."""
    import ray.train
    import torch

    from reclip_ray import storage
    from reclip_ray.train import worker as worker_module
    from reclip_ray.train.checkpoint import TrainState, save_checkpoint
    from reclip_ray.train.worker import Worker

    torch.manual_seed(0)
    saved = torch.nn.Linear(4, 3)
    save_checkpoint(tmpdir_env / "ckpt", saved, torch.optim.AdamW(saved.parameters()),
                    TrainState(samples=256, step=4, phase=0), "train: {}\n")
    uri = f"{s3_prefix}/run/checkpoint_000004"
    storage.upload_dir(str(tmpdir_env / "ckpt"), uri)
    fs, inner = storage.filesystem(uri)

    def refused(*args, **kwargs):
        raise AssertionError("Ray's as_directory / to_directory: a late rank downloads over an earlier one's read")

    monkeypatch.setattr(ray.train.Checkpoint, "as_directory", refused)
    monkeypatch.setattr(ray.train.Checkpoint, "to_directory", refused)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(inner, filesystem=fs))
    copies = []
    real = worker_module.downloaded

    @contextlib.contextmanager
    def spy(path, filesystem):
        with real(path, filesystem) as folder:
            copies.append(folder)
            yield folder

    monkeypatch.setattr(worker_module, "downloaded", spy)
    worker = Worker.__new__(Worker)  # what _restore reads
    worker.cfg = None  # this launch's config: none to name changed model keys against (not needed here)
    worker.model = torch.nn.Linear(4, 3)
    worker.optimizer = torch.optim.AdamW(worker.model.parameters())
    worker.run_dir = f"{s3_prefix}/run"
    worker._restore("the-run")
    assert (worker.state.samples, worker.state.step, worker.state.mlflow_run_id) == (256, 4, "the-run")
    assert worker.restored_from == "checkpoint_000004"
    assert all(torch.equal(a, b) for a, b in zip(worker.model.state_dict().values(), saved.state_dict().values()))
    (folder,) = copies
    assert os.path.dirname(folder) == scratch.scratch_root() and not os.path.exists(folder)
