"""A fresh Python process for the tests that measure memory: the peak RSS of pytest's own process (hundreds of MB,
and a moto server's in some tests) would hide what the code under test allocates."""

from __future__ import annotations

import os
import subprocess
import sys

# ``hwm()`` in the child: its own high-water mark of resident memory (/proc's VmHWM). ``ru_maxrss`` would not do: a
# child starts at its parent's peak.
HWM = ("def hwm():\n"
       "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024\n")


def run_python(script: str, *args: str, timeout: float, text: bool = False) -> subprocess.CompletedProcess:
    """``python -c HWM + script ARGS`` with this checkout's ``reclip_ray`` importable; its output captured."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", HWM + script, *args], capture_output=True, text=text, env=env,
                          timeout=timeout)
