"""One launch at a time per run folder (and per sweep folder): the launching driver's lease.

The README's way to resume is to run the same command again. When the first launch is still alive, a second one
trained the same run beside it: a `ray job submit` whose terminal was closed, or whose client was Ctrl-C'd, goes on
training on the cluster, and a user who reruns the command "to resume" started a second Ray Train controller on
the same folder. The two rewrite one checkpoint snapshot and delete each other's checkpoints, a restart may restore
the other's, and both drivers log into one MLflow run (its id is read from the run folder). Nothing failed loudly.

So the launch writes ``RUN_DIR/.launch.json`` (who: host, pid, the Ray job; when: a heartbeat every
``HEARTBEAT_S``), and a launch that finds another's lease refuses with one line that says how to stop that one. A
lease whose holder is gone does not hold: on the same host its process is checked (pid and start time, so a
reused pid is not mistaken for it); from another host, the lease expires ``EXPIRES_S`` after its last heartbeat.
Released when the launch ends, whatever its outcome; a SIGKILLed launch leaves it to expire (at once on its host).

What it is not: a lock against two launches made in the same second (a read then a write, no conditional PUT:
pyarrow has none); the case it is for is a launch made while another has been training for a while. Heartbeat ages
compare two hosts' clocks. Cost: one small object, rewritten every ``HEARTBEAT_S`` (a GET, a HEAD and a PUT).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from reclip_ray import storage
from reclip_ray.errors import ReclipError

LEASE_FILE = ".launch.json"
HEARTBEAT_S = 30.0
EXPIRES_S = 120.0  # four missed heartbeats


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as an opaque token (Linux: its start time in clock ticks since boot, from
    /proc), so a pid reused by a later process is told apart; "" where that cannot be read (no /proc); None if
    there is no such process, or only its zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: alive
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(command)", which may hold spaces
    except (OSError, IndexError):
        return ""
    return None if fields[0] == "Z" else fields[19]  # fields 3 (state) and 22 (starttime) of proc(5)


def _ray_job() -> str | None:
    """The Ray job submission id when this driver runs as a `ray job submit` entrypoint (Ray's job supervisor
    hands it to the driver in its job config), for the refusal's `ray job stop ID`."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def holds(holder: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether ``holder`` (a lease file's contents) still holds the folder against this process."""
    if not holder:
        return False
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return False  # this process's own, left by an earlier launch in it (a test, a notebook)
        started = process_start(pid)
        if started is None:
            return False
        return not started or not holder.get("started") or started == holder["started"]  # else a reused pid
    return now - float(holder.get("heartbeat", 0)) < EXPIRES_S


def refusal(folder: str, holder: dict[str, Any], now: float | None = None) -> str:
    """The one line a launch that finds ``holder``'s lease on ``folder`` says."""
    now = time.time() if now is None else now
    job = holder.get("ray_job")
    stop = f"`ray job stop {job}`" if job else f"Ctrl-C it, or kill {holder.get('pid')} on {holder.get('host')}"
    return (f"{folder} is in use by another launch (pid {holder.get('pid')} on {holder.get('host')}"
            f"{f', Ray job {job}' if job else ''}, started {now - float(holder.get('since', now)):.0f} s ago, heard "
            f"from {now - float(holder.get('heartbeat', now)):.0f} s ago): stop it first ({stop}), then run this "
            f"command again to resume. If it is gone, its lease ({storage.join(folder, LEASE_FILE)}) expires "
            f"{EXPIRES_S:.0f} s after it was last heard from")


class Lease:
    """This launch's lease on ``folder``: ``take`` (or refuse), a heartbeat thread, ``release``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.path = folder, storage.join(folder, LEASE_FILE)
        now = time.time()
        self.record = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": process_start(os.getpid()), "ray_job": _ray_job(), "since": now,
                       "heartbeat": now}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> Lease:
        """Write this launch's lease, unless another launch holds the folder (ReclipError, one line)."""
        holder = self._read()
        if holds(holder):
            raise ReclipError(refusal(self.folder, holder))
        storage.write_json(self.path, self.record)
        self._thread = threading.Thread(target=self._beat, name="reclip-launch-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this launch's. Never raises: it runs as the
        launch ends, and must not mask the launch's own outcome."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self._read() or {}).get("id") == self.record["id"]:
                storage.delete_file(self.path)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            print(f"[reclip] WARNING: could not remove the launch lease {self.path}: {exc}", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = storage.read_json(self.path)
        except ValueError:  # not JSON: not a lease any launch wrote (writes are whole)
            return None
        return holder if isinstance(holder, dict) else None

    def _beat(self) -> None:
        """Rewrite the heartbeat until released; stop, saying so, if another launch has taken the lease over
        (it judged this one gone: the two now train one folder, which only the user can settle)."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = self._read()
                if (holder or {}).get("id") != self.record["id"]:
                    print(f"[reclip] WARNING: another launch took over {self.path} "
                          f"(pid {(holder or {}).get('pid')} on {(holder or {}).get('host')}); this one trains on "
                          "beside it: stop one of them", file=sys.stderr, flush=True)
                    return
                self.record["heartbeat"] = time.time()
                storage.write_json(self.path, self.record)
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat tries again
                print(f"[reclip] WARNING: launch lease heartbeat failed: {exc}", file=sys.stderr, flush=True)
