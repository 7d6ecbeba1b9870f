"""Checkpoint folders a dead process leaves on a node are removed by the next worker that starts there; a live
process's are never touched (``reclip_ray/train/scratch.py``). Real processes: a SIGKILL, a clean exit, one still
running, each in its own interpreter, as Ray's worker processes are."""

from __future__ import annotations

import os
import signal
import tempfile

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
