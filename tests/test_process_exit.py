"""``cli.exit_process``, the end of every ``reclip-ray`` process: it skips the interpreter's teardown of the heap
(BENCHMARKS.md, "CLI exit") but must still do what that exit does for a program's output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_exit_process_joins_threads_runs_atexit_handlers_and_flushes_before_it_exits(tmp_path):
    """A non-daemon thread still writing, an atexit handler, a thread pool never shut down, a logging handler and
    unterminated stdout/stderr text: all done, in the interpreter's order (threads before atexit handlers), and the
    status is the command's."""
    script = textwrap.dedent(f"""
        import atexit, logging, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from reclip_ray.cli import exit_process

        out = Path({str(tmp_path)!r})
        def late():
            time.sleep(0.5)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        pool = ThreadPoolExecutor(1)
        pool.submit(lambda: (time.sleep(0.3), (out / "pool").write_text("done")))
        atexit.register(lambda: (out / "atexit").write_text(",".join(sorted(p.name for p in out.iterdir()))))
        logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
        logging.info("logged")
        sys.stdout.write("no newline")
        sys.stderr.write("err tail")
        exit_process(7)
        (out / "after").write_text("exit_process returned")
        """)
    # Block-buffered stdio, as a process whose output goes to a file or a pipe has (unless PYTHONUNBUFFERED is set)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "no newline", "err tail")
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "pool").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "log.txt,pool,thread"  # the threads had ended when it ran
    assert "logged" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "after").exists()


def test_the_entry_points_end_through_exit_process():
    """``reclip-ray`` (the console script), ``python -m reclip_ray`` and the ``jobs/`` scripts all call ``cli.run``
    (read from their sources), and ``run`` ends the process with the command's status: a config error's 2."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"] == {
        "reclip-ray": "reclip_ray.cli:run"}
    for script in [root / "reclip_ray" / "__main__.py", *sorted((root / "jobs").glob("*.py"))]:
        assert "from reclip_ray.cli import run\n" in script.read_text(), script
    proc = subprocess.run([sys.executable, "-m", "reclip_ray", "train", "--set", "optim.lrr=1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown config key 'optim.lrr'" in proc.stderr, proc.stderr
