"""reclip_ray.lease: a second launch of a run (or sweep) that another launch still trains refuses in one line; a
lease whose holder is gone does not hold. Local folders and a real S3 API (moto), the same calls. The CLI's own
refusal, while a run trains on S3, is in ``test_reliability.py::test_on_s3_a_fatal_error_is_not_retried...``."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from reclip_ray import lease, storage
from reclip_ray.errors import ReclipError


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_prefix") + "/run"


def _record(pid: int, host: str | None = None, started: str | None = None, heard_s_ago: float = 1.0,
            job: str | None = None) -> dict:
    now = time.time()
    return {"id": "other", "host": host or socket.gethostname(), "pid": pid,
            "started": lease.process_start(pid) if started is None else started, "ray_job": job,
            "since": now - 600, "heartbeat": now - heard_s_ago}


def test_a_launch_refuses_while_another_live_one_holds_the_folder_and_takes_it_once_that_one_is_gone(folder):
    other = subprocess.Popen(["sleep", "120"])  # the other launch's driver, on this host
    try:
        storage.write_json(storage.join(folder, lease.LEASE_FILE), _record(other.pid, job="raysubmit_abc"))
        with pytest.raises(ReclipError) as refused:
            lease.Lease(folder).take()
        line = str(refused.value)
        assert "\n" not in line and line.startswith(f"{folder} is in use by another launch (pid {other.pid} on "
                                                    f"{socket.gethostname()}, Ray job raysubmit_abc, started 600 s ago")
        assert "stop it first (`ray job stop raysubmit_abc`), then run this command again to resume" in line, line
        assert storage.read_json(storage.join(folder, lease.LEASE_FILE))["id"] == "other"  # untouched
    finally:
        other.kill()
        other.wait()
    # Its process gone (a SIGKILLed driver leaves its lease): taken at once, without waiting for it to expire
    with lease.Lease(folder) as mine:
        assert storage.read_json(mine.path) == mine.record
    assert not storage.exists(mine.path)  # released


def test_who_holds_a_lease_the_same_host_by_process_another_by_heartbeat():
    assert not lease.holds(None)
    assert not lease.holds(_record(os.getpid()))  # this process's own, left by an earlier launch in it
    parent = os.getppid()  # alive, not this process
    assert lease.holds(_record(parent))
    assert not lease.holds(_record(parent, started="1"))  # a reused pid: another start time
    ended = subprocess.Popen(["true"])  # exited, not yet reaped: a zombie is no launch
    deadline = time.time() + 20
    while lease.process_start(ended.pid) is not None and time.time() < deadline:
        time.sleep(0.02)
    assert lease.process_start(ended.pid) is None and ended.poll() == 0
    far = "another-host.example"
    assert lease.holds(_record(1, host=far, heard_s_ago=10))
    assert not lease.holds(_record(1, host=far, heard_s_ago=lease.EXPIRES_S + 1))
    # without a Ray job: how to stop it names the process
    line = lease.refusal("s3://b/runs/r", _record(1, host=far, heard_s_ago=10))
    assert re.search(r"heard from 10 s ago\): stop it first \(Ctrl-C it, or kill 1 on another-host\.example\)",
                     line), line
    assert line.endswith(f"its lease (s3://b/runs/r/{lease.LEASE_FILE}) expires 120 s after it was last heard from")


def test_the_heartbeat_keeps_the_lease_fresh_and_stops_when_another_launch_took_it_over(folder, monkeypatch,
                                                                                          capfd):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    mine = lease.Lease(folder).take()
    try:
        first = storage.read_json(mine.path)["heartbeat"]
        deadline = time.time() + 20
        while storage.read_json(mine.path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert storage.read_json(mine.path)["heartbeat"] > first
        # Another launch judged this one gone and took the folder: this one's heartbeat stops writing, says so
        storage.write_json(mine.path, _record(1, host="another-host.example"))
        deadline = time.time() + 20
        while mine._thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert not mine._thread.is_alive()
    finally:
        mine.release()
    assert storage.read_json(mine.path)["id"] == "other"  # release leaves the other's lease
    assert "another launch took over" in capfd.readouterr().err


def test_a_lease_file_that_is_not_json_does_not_hold_the_folder(tmp_path):
    path = tmp_path / "run" / lease.LEASE_FILE
    path.parent.mkdir()
    path.write_text("not json")
    with lease.Lease(str(tmp_path / "run")) as mine:
        assert storage.read_json(mine.path)["id"] == mine.record["id"]
