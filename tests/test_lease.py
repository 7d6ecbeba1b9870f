"""reclip_ray.lease: a second launch of a run (or sweep) that another launch still trains refuses in one line; a
lease whose holder is gone does not hold. Local folders and a real S3 API (moto), the same calls. The CLI's own
refusal, while a run trains on S3, is in ``test_reliability.py::test_on_s3_a_fatal_error_is_not_retried...``, a
sweep's in ``test_sweep.py::test_a_sweep_stopped_by_ctrl_c...``."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from reclip_ray import lease, storage
from reclip_ray.errors import ReclipError

ELSEWHERE = "another-host.example/0c1d/4026531836"  # another machine's host name, boot id and pid namespace


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_prefix") + "/run"


def _record(pid: int, where: str | None = None, started: str | None = None, job: str | None = None) -> dict:
    now = time.time()
    return {"id": "other", "machine": where or lease.machine(), "pid": pid,
            "started": lease.process_start(pid) if started is None else started, "ray_job": job,
            "since": now - 600, "heartbeat": now - 1}


def test_a_launch_refuses_while_another_live_one_holds_the_folder_and_takes_it_once_that_one_is_gone(folder):
    other = subprocess.Popen(["sleep", "120"])  # the other launch's driver, on this machine
    path = storage.join(folder, lease.LEASE_FILE)
    try:
        storage.write_json(path, _record(other.pid, job="raysubmit_abc"))
        with pytest.raises(ReclipError) as refused:
            lease.Lease(folder).take()
        line = str(refused.value)
        assert "\n" not in line and line.startswith(f"{folder} is in use by another launch (pid {other.pid} on "
                                                    f"{socket.gethostname()}, Ray job raysubmit_abc, started 600 s ago")
        assert line.endswith("stop it first (`ray job stop raysubmit_abc`), then run this command again to resume; "
                             f"if it is gone and this persists, delete {path}"), line
        assert storage.read_json(path)["id"] == "other"  # untouched
    finally:
        other.kill()
        other.wait()
    # Its process gone (a SIGKILLed driver leaves its lease): taken at once, without waiting for a heartbeat
    t0 = time.monotonic()
    with lease.Lease(folder) as mine:
        assert time.monotonic() - t0 < lease.WATCH_S / 2
        assert storage.read_json(mine.path) == mine.record
    assert not storage.exists(mine.path)  # released


def test_on_this_machine_a_lease_holds_while_its_process_lives_elsewhere_its_heartbeat_decides():
    assert not lease.alive_here(_record(os.getpid()))  # this process's own, left by a launch that did not release
    parent = os.getppid()  # alive, not this process
    assert lease.alive_here(_record(parent)) is True
    assert lease.alive_here(_record(parent, started="1")) is False  # a reused pid: another start time
    assert lease.alive_here(_record(parent, started="")) is None  # no start time to compare: the heartbeat decides
    assert lease.alive_here(_record(parent, where=ELSEWHERE)) is None  # another machine (or container)
    assert lease.alive_here({**_record(parent), "pid": None}) is False  # not a lease a launch wrote
    assert lease.alive_here(_record(0)) is False
    ended = subprocess.Popen(["true"])  # exited, not yet reaped: a zombie is no launch
    deadline = time.time() + 20
    while lease.process_start(ended.pid) is not None and time.time() < deadline:
        time.sleep(0.02)
    assert lease.process_start(ended.pid) is None and ended.poll() == 0


def test_a_launch_still_running_in_this_process_holds_the_folder(tmp_path):
    first = lease.Lease(str(tmp_path / "run")).take()
    try:
        with pytest.raises(ReclipError, match="is in use by another launch"):
            lease.Lease(str(tmp_path / "run")).take()
    finally:
        first.release()
    with lease.Lease(str(tmp_path / "run")):
        pass


def test_a_lease_from_another_machine_holds_only_if_its_heartbeat_beats(folder, monkeypatch):
    monkeypatch.setattr(lease, "WATCH_S", 1.0)
    path = storage.join(folder, lease.LEASE_FILE)
    storage.write_json(path, _record(1, where=ELSEWHERE))  # its launch died: no beat
    t0 = time.monotonic()
    with lease.Lease(folder):
        assert time.monotonic() - t0 >= 1.0  # watched for WATCH_S first
    beating, stop = _record(1, where=ELSEWHERE), threading.Event()
    storage.write_json(path, beating)

    def beat() -> None:
        while not stop.wait(0.1):
            beating["heartbeat"] += 1
            storage.write_json(path, beating)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(ReclipError, match=r"\(pid 1 on another-host\.example, started 600 s ago, heard from"):
            lease.Lease(folder).take()
    finally:
        stop.set()
        thread.join()


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
        # Another launch judged this one gone and took the folder: this one's heartbeat stops writing, says so.
        # (A beat that read the file just before the other's write puts its own back, as two launches could without
        # a conditional PUT: the other's next write, as its heartbeat would, takes it again.)
        deadline = time.time() + 20
        while mine._thread.is_alive() and time.time() < deadline:
            if storage.read_json(mine.path)["id"] != "other":
                storage.write_json(mine.path, _record(1, where=ELSEWHERE))
            time.sleep(0.05)
        assert not mine._thread.is_alive()
    finally:
        mine.release()
    assert storage.read_json(mine.path)["id"] == "other"  # release leaves the other's lease
    assert "another launch took over" in capfd.readouterr().err


def test_two_launches_in_the_same_moment_one_goes_on_and_the_other_refuses(folder, monkeypatch):
    """Both read the folder free before either writes (a barrier in the write, as two launches made in the same
    second are): the one whose write lands last goes on, the other reads its lease back overwritten and refuses."""
    monkeypatch.setattr(lease, "SETTLE_S", 0.5)
    launches = [lease.Lease(folder), lease.Lease(folder)]
    first, last = (launch.record["id"] for launch in launches)
    both_read = threading.Barrier(2, timeout=30)
    write = storage.write_json

    def write_once_both_read(path, obj, **kwargs):
        both_read.wait()
        if obj["id"] == last:
            time.sleep(0.1)  # lands after the first one's, well inside its SETTLE_S
        write(path, obj, **kwargs)

    monkeypatch.setattr(storage, "write_json", write_once_both_read)
    outcomes: dict[str, object] = {}

    def take(launch: lease.Lease) -> None:
        try:
            outcomes[launch.record["id"]] = launch.take()
        except ReclipError as exc:
            outcomes[launch.record["id"]] = exc

    threads = [threading.Thread(target=take, args=(launch,)) for launch in launches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    monkeypatch.setattr(storage, "write_json", write)
    assert outcomes[last] is launches[1], outcomes
    assert isinstance(outcomes[first], ReclipError), outcomes
    assert str(outcomes[first]).startswith(f"{folder} is in use by another launch (pid {os.getpid()} on ")
    assert storage.read_json(launches[1].path)["id"] == last
    with pytest.raises(ReclipError, match="is in use by another launch"):  # the one that went on holds the folder
        lease.Lease(folder).take()
    launches[1].release()
    assert not storage.exists(launches[1].path)


def test_two_launch_processes_at_the_same_instant_leave_exactly_one_holding_the_folder(tmp_path):
    """Two drivers take one folder's lease at the same wall-clock instant, as ``benchmarks/lease_race.py`` has them
    (without the read-back both took it in 18 of 20 of its tries here)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lease_race.py"
    spec = importlib.util.spec_from_file_location("lease_race_under_test", script)
    race = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(race)
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}  # the children run in an empty folder
    said, module = race.trial(str(tmp_path / "run"), env)
    assert said == ["refused", "took"] and module == lease.__file__, (said, module)
    assert not (tmp_path / "run" / lease.LEASE_FILE).exists()  # released by the one that took it


def test_a_lease_file_that_is_not_json_does_not_hold_the_folder(tmp_path):
    path = tmp_path / "run" / lease.LEASE_FILE
    path.parent.mkdir()
    path.write_text("not json")
    with lease.Lease(str(tmp_path / "run")) as mine:
        assert storage.read_json(mine.path)["id"] == mine.record["id"]


def test_a_refused_launch_ran_its_checks_first_and_touched_neither_mlflow_nor_ray(make_cfg, tmp_path, monkeypatch):
    """RELIABILITY: the second launch refuses after its checks of data and config (a mistake in the command is
    said first, whatever holds the folder) and before MLflow or Ray: no run opened, no attempt counted."""
    from reclip_ray.errors import DataError
    from reclip_ray.train import launch
    from reclip_ray.train.run_state import read_run_state

    def not_reached(*args, **kwargs):
        raise AssertionError("a refused launch must not reach MLflow or Ray")

    monkeypatch.setattr(launch, "open_mlflow_run", not_reached)
    monkeypatch.setattr(launch, "init_ray", not_reached)
    cfg = make_cfg("held")
    run_dir = str(tmp_path / "runs" / "held")
    other = subprocess.Popen(["sleep", "120"])  # the launch that trains the run, on this machine
    try:
        storage.write_json(storage.join(run_dir, lease.LEASE_FILE), _record(other.pid))
        with pytest.raises(DataError, match=f"^data.train not found: {re.escape(str(tmp_path / 'no-such-data'))}$"):
            launch.run_training(make_cfg("held", train=tmp_path / "no-such-data"))
        with pytest.raises(ReclipError, match=f"^{re.escape(run_dir)} is in use by another launch \\(pid {other.pid} "):
            launch.run_training(cfg)
    finally:
        other.kill()
        other.wait()
    assert read_run_state(run_dir) == {}  # no attempt counted
