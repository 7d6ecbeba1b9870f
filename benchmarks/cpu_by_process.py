"""Where a command's CPU goes on this machine, by kind of process: Ray's daemons, each Ray actor class, the command
itself, and the kernel's own threads.

Why: on the 2-core VM the test suite is CPU-bound (its cores are busy ~75 % of its wall time), so its time is
the CPU its processes use. A Ray cluster's processes rename themselves (``ray::RayTrainWorker``, ``ray::IDLE``),
and most live for seconds, so ``top`` cannot add them up. This runs the command and samples ``/proc`` every
``--every`` seconds: each process's last user+system CPU seen, grouped by its name (a Ray worker by the
name it had once it was no longer idle; a kernel thread by its ``comm``). A process that lives less than one
sample, and the CPU a process spends after its last sample, are missed: the totals are lower bounds.

Usage::

    python benchmarks/cpu_by_process.py -- python -m pytest -q tests/test_job_submit.py

Prints the command's wall time, the CPU seen in all, and the top ``--top`` kinds; with ``--json FILE`` all of it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
DAEMONS = ("gcs_server", "dashboard/agent", "dashboard.py", "log_monitor", "monitor.py", "runtime_env",
           "dashboard")


def kind(pid: str, cmdline: str) -> str:
    """A process's kind from its command line (NULs as spaces)."""
    line = cmdline.strip()
    if line.startswith("ray::"):
        return "ray::" + line[5:].split(" ")[0][:48]
    if "default_worker.py" in line:
        return "ray::(starting)"
    if not line:  # a kernel thread (or a zombie)
        try:
            with open(f"/proc/{pid}/comm") as f:
                return "kernel:" + f.read().strip().split("/")[0]
        except OSError:
            return "kernel:?"
    first = line.split(" ")[0]
    if first.endswith("/raylet"):
        return "raylet"
    for daemon in DAEMONS:
        if daemon in line:
            return daemon
    return os.path.basename(first) + " " + " ".join(line.split(" ")[1:4])[:60]


def sample(seen: dict[str, tuple[float, str]], skip: set[str]) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in skip:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rfind(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / HZ
            name = seen.get(pid, (0.0, ""))[1]
            if not name or name in ("ray::IDLE", "ray::(starting)"):  # named once it stops being generic
                with open(f"/proc/{pid}/cmdline") as f:
                    name = kind(pid, f.read().replace("\0", " "))
        except (OSError, IndexError, ValueError):
            continue
        seen[pid] = (cpu, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples of /proc")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="write every kind's CPU seconds and process count here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    before: dict[str, tuple[float, str]] = {}
    sample(before, set())  # what ran before the command: only its growth counts
    seen: dict[str, tuple[float, str]] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    skip = {str(os.getpid())}
    while proc.poll() is None:
        sample(seen, skip)
        time.sleep(args.every)
    wall = time.perf_counter() - start
    cpu: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for pid, (seconds, name) in seen.items():
        old = before.get(pid)
        cpu[name] += seconds - (old[0] if old and old[1] == name else 0.0)
        count[name] += 1
    total = sum(cpu.values())
    own = resource.getrusage(resource.RUSAGE_SELF)
    busy = total / max(wall, 1e-9)
    print(f"wall {wall:.1f} s, exit {proc.returncode}; CPU seen {total:.1f} s ({busy:.2f} cores busy); "
          f"this sampler's own: {own.ru_utime + own.ru_stime:.1f} s")
    for name, seconds in cpu.most_common(args.top):
        print(f"{seconds:9.1f} s {100 * seconds / max(total, 1e-9):5.1f} % {count[name]:5d} proc  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "wall_s": wall, "exit": proc.returncode, "cpu_s": total,
                       "sampler_cpu_s": own.ru_utime + own.ru_stime,
                       "kinds": {n: {"cpu_s": round(s, 2), "processes": count[n]} for n, s in cpu.most_common()}},
                      f, indent=1)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
