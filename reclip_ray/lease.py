"""One launch at a time per run folder (and per sweep folder): the launching driver's lease.

The README's way to resume is to run the same command again. When the first launch is still alive, a second one
trained the same run beside it: a `ray job submit` whose terminal was closed, or whose client was Ctrl-C'd, goes on
training on the cluster, and a user who reruns the command "to resume" started a second Ray Train controller on
the same folder. The two rewrite one checkpoint snapshot and delete each other's checkpoints, a restart may restore
the other's, and both drivers log into one MLflow run (its id is read from the run folder). Nothing failed loudly.

So the launch writes ``RUN_DIR/.launch.json`` (who: machine, pid, the Ray job; a heartbeat every ``HEARTBEAT_S``),
and a launch that finds another's lease refuses with one line that says how to stop that one. A lease whose holder
is gone does not hold, so a killed launch never blocks the next: on the same machine (host name, boot and pid
namespace) its process is looked up, by pid and start time so that a reused pid is not mistaken for it; from
another machine, or where the start time cannot be read, its heartbeat is watched for up to ``WATCH_S`` and the
holder counts as alive only if it beats (no clocks compared). Released when the launch ends, whatever its outcome.

Two launches made in the same second both find the folder free and both write (a read then a write: pyarrow has
no conditional PUT, so neither write can fail). So a launch that wrote its lease waits ``SETTLE_S`` (or twice its
own write's time, if longer) and reads it back: the last write stands, on S3 as on a local disk, and only the
launch whose lease is still there goes on; the other refuses, in the same line as any refusal. Both go on only if
one of them took longer than that wait between reading the folder free and its write landing (a store stalled for
a second in that instant): not a lock, but the same second is covered. Cost: ``SETTLE_S`` once per launch, and
one small object checked and rewritten every ``HEARTBEAT_S`` (on S3 a HEAD, a GET, a HEAD and a PUT).
"""

from __future__ import annotations

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
WATCH_S = 1.5 * HEARTBEAT_S  # how long a launch watches a lease it cannot judge by its process for a heartbeat
SETTLE_S = 1.0  # how long a launch waits after writing its lease before reading it back (the module docstring)

_HELD: set[str] = set()  # ids of the leases this process holds now (a launch still running in it is alive)


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def machine() -> str:
    """Which machine and pid namespace this process runs in: two containers may share a host name (a pod's,
    ``docker --hostname``) but not a boot id and a pid namespace, and a pid means something only within one."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{_read_first_line('/proc/sys/kernel/random/boot_id')}/{namespace}"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as an opaque token (Linux: its start time in clock ticks since boot, from
    /proc), so a pid reused by a later process is told apart; "" where that cannot be read (no /proc, or hidden);
    None if there is no such process, or only its zombie."""
    if pid <= 0:
        return None
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


def alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the launch that wrote ``holder`` is alive, judged by its process; None where that cannot be told
    (another machine, or no start time to compare), and the heartbeat must."""
    if holder.get("id") in _HELD:
        return True  # a launch still running in this process (a thread, a notebook cell)
    if holder.get("machine") != machine():
        return None
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False  # not a lease a launch wrote
    if pid == os.getpid():
        return False  # this process's own, left by an earlier launch in it that did not release it
    started = process_start(pid)
    if started is None:
        return False
    if not started or not holder.get("started"):
        return None
    return started == holder["started"]  # else the pid was reused by another process


def refusal(folder: str, holder: dict[str, Any], now: float | None = None) -> str:
    """The one line a launch that finds ``holder``'s lease on ``folder`` says."""
    now = time.time() if now is None else now

    def ago(key: str) -> str:
        try:
            return f"{now - float(holder[key]):.0f} s ago"
        except (KeyError, TypeError, ValueError):
            return "at an unknown time"

    job, pid, host = holder.get("ray_job"), holder.get("pid"), _host(holder)
    stop = f"`ray job stop {job}`" if job else f"Ctrl-C it, or kill {pid} on {host}"
    return (f"{folder} is in use by another launch (pid {pid} on {host}{f', Ray job {job}' if job else ''}, started "
            f"{ago('since')}, heard from {ago('heartbeat')}): stop it first ({stop}), then run this command again "
            f"to resume; if it is gone and this persists, delete {storage.join(folder, LEASE_FILE)}")


def _host(holder: dict[str, Any]) -> str:
    return str(holder.get("machine", "?")).split("/")[0]


def _ray_job() -> str | None:
    """The Ray job submission id when this driver runs as a `ray job submit` entrypoint (Ray's job supervisor
    hands it to the driver in its job config), for the refusal's `ray job stop ID`."""
    from reclip_ray.job_dir import ray_job_config

    metadata = ray_job_config().get("metadata")
    return metadata.get("job_submission_id") if isinstance(metadata, dict) else None


class Lease:
    """This launch's lease on ``folder``: ``take`` (or refuse), a heartbeat thread, ``release``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.path = folder, storage.join(folder, LEASE_FILE)
        now = time.time()
        self.record = {"id": uuid.uuid4().hex, "machine": machine(), "pid": os.getpid(),
                       "started": process_start(os.getpid()), "ray_job": _ray_job(), "since": now, "heartbeat": now}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a heartbeat's write and the release's delete never cross
        self._thread: threading.Thread | None = None

    def take(self) -> Lease:
        """Write this launch's lease, unless another live launch holds the folder or wrote its own in the same
        moment (ReclipError, one line: see the module docstring)."""
        holder = self._read()
        live = self._live_holder(holder) if holder is not None else None
        if live is not None:
            raise ReclipError(refusal(self.folder, live))
        t0 = time.monotonic()
        storage.write_json(self.path, self.record)
        _HELD.add(self.record["id"])  # a launch in this process that reads it now finds it held
        time.sleep(max(SETTLE_S, 2 * (time.monotonic() - t0)))
        landed = self._read()
        if (landed or {}).get("id") != self.record["id"]:  # another launch wrote after this one: it goes on
            _HELD.discard(self.record["id"])
            raise ReclipError(refusal(self.folder, landed) if landed else
                              f"{self.path} was removed while this launch took it: run this command again")
        self._thread = threading.Thread(target=self._beat, name="reclip-launch-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this launch's. Never raises: it runs as the
        launch ends, and must not mask the launch's own outcome."""
        self._stop.set()
        _HELD.discard(self.record["id"])
        try:
            with self._lock:
                if (self._read() or {}).get("id") == self.record["id"]:
                    storage.delete_file(self.path)
        except Exception as exc:  # noqa: BLE001 - the next launch judges it gone by its process or heartbeat
            print(f"[reclip] WARNING: could not remove the launch lease {self.path}: {exc}", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _live_holder(self, holder: dict[str, Any]) -> dict[str, Any] | None:
        """The lease of a live launch that holds the folder (``holder``, or what replaced it while watched); None
        if its holder is gone."""
        verdict = alive_here(holder)
        if verdict is not None:
            return holder if verdict else None
        print(f"[reclip] {self.path}: another launch's lease (pid {holder.get('pid')} on {_host(holder)}); "
              f"watching up to {WATCH_S:.0f} s for its heartbeat", flush=True)
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline:
            time.sleep(min(2.0, WATCH_S / 10))
            now = self._read()
            if now is None:
                return None  # released
            if now.get("id") != holder.get("id") or now.get("heartbeat") != holder.get("heartbeat"):
                return now  # it beats, or another launch has just taken it
        return None

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
                with self._lock:
                    if self._stop.is_set():
                        return
                    holder = self._read()
                    if (holder or {}).get("id") != self.record["id"]:
                        print(f"[reclip] WARNING: another launch took over {self.path} (pid "
                              f"{(holder or {}).get('pid')}); this one trains on beside it: stop one of them",
                              file=sys.stderr, flush=True)
                        return
                    self.record["heartbeat"] = time.time()
                    storage.write_json(self.path, self.record)
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat tries again
                print(f"[reclip] WARNING: launch lease heartbeat failed: {exc}", file=sys.stderr, flush=True)
