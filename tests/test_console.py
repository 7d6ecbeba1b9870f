"""The driver's progress display: every line once, one line per log window off a terminal, a live line on one."""

from __future__ import annotations

import io

from reclip_ray.console import ProgressDisplay, _worth_showing, format_window


def _window(seq: int, step: int) -> dict:
    return {"seq": seq, "phase_name": "lowres", "image_size": 32, "step": step, "total_steps": 20, "samples": step * 128,
            "total_samples": 2560, "loss": 4.5, "samples_per_s": 812.0, "data_wait_fraction": 0.02,
            "gflops_total": 18.2 * step, "eta_s": 75}


class _Board:
    """A scripted board: what each poll returns."""

    def __init__(self, polls):
        self.polls = list(polls)

    def take(self):
        return self.polls.pop(0) if self.polls else ({}, [])


def test_off_a_terminal_each_window_and_event_is_one_line_once():
    board = _Board([
        ({}, ["[reclip] phase 0 'lowres': 32 px"]),
        (_window(1, 10), []),
        (_window(1, 10), []),  # the same window polled again: not printed again
        (_window(2, 20), ["[reclip] eval after 'lowres': ..."]),
    ])
    out = io.StringIO()
    display = ProgressDisplay(board.take, stream=out, live=False)
    for _ in range(4):
        display.poll()
    lines = out.getvalue().splitlines()
    assert lines == ["[reclip] phase 0 'lowres': 32 px", format_window(_window(1, 10)),
                     "[reclip] eval after 'lowres': ...", format_window(_window(2, 20))]
    assert "step 10/20  samples 1,280/2,560" in lines[1] and "ETA 1m15s" in lines[1] and "812 samples/s" in lines[1]


def test_on_a_terminal_the_status_line_is_redrawn_and_events_go_above_it():
    board = _Board([(_window(1, 10), []), (_window(2, 20), ["[reclip] eval after 'lowres': ..."])])
    out = io.StringIO()
    with ProgressDisplay(board.take, stream=out, live=True, interval_s=0.01) as display:
        while board.polls:
            pass
    assert display._thread.is_alive() is False
    text = out.getvalue()
    # Each redraw clears the line; the event is printed on its own line and the status drawn again below it.
    assert text.count("\r\x1b[2K" + format_window(_window(1, 10))) == 1
    assert "\r\x1b[2K[reclip] eval after 'lowres': ...\n" + format_window(_window(1, 10)) in text
    assert text.endswith("\r\x1b[2K" + format_window(_window(2, 20)) + "\n")  # the status line is ended at exit


def test_ray_lines_that_reach_the_console():
    assert _worth_showing("ERROR worker died", {})
    assert _worth_showing("WARNING: something odd", {})
    assert not _worth_showing("Reporting training result 3: ...", {})
    assert not _worth_showing("WARNING: 8 PYTHON worker processes have been started on node", {})
    assert not _worth_showing("[reclip] WARNING: shown through the board", {})
    # A sweep's trials have no board: their own warnings are shown from Ray's output, their step lines are not
    assert _worth_showing("[reclip] WARNING: could not write eval.json", {}, own_warnings=True)
    assert not _worth_showing("[reclip] lowres 32px step 9/17 samples 576/1023", {}, own_warnings=True)
    assert _worth_showing("ERROR worker died", {}, own_warnings=True)


def test_a_window_logs_the_phase_peak_gpu_memory_and_it_is_zero_on_cpu():
    """worker_peak_gpu_mib (benchmarks/gpu_check.sh --e2e reads it per phase): on a CPU worker CUDA never starts and
    the key is 0, so a CPU run's metrics keep the same keys as a GPU run's."""
    from types import SimpleNamespace

    from reclip_ray.train.checkpoint import TrainState
    from reclip_ray.train.progress import Window

    plan = SimpleNamespace(index=0, image_size=32, text_length=16)
    metrics = Window().metrics(plan, TrainState(), {"loss": 1.0, "logit_scale": 14.3}, 1e-3, 64, 1)
    assert metrics["worker_peak_gpu_mib"] == 0.0
    assert metrics["worker_peak_rss_mib"] > 0


def test_with_ray_output_redirected_ray_info_lines_go_to_the_file_and_warnings_and_errors_to_both(tmp_path):
    """Ray's loggers print to the console through its own StreamHandler subclass (and Ray Data's logger through
    another, without propagating): once ray.log is open their INFO lines (Tune's "Wrote the latest version of all
    result files", Ray Data's "Starting execution") belong in the file only. In a subprocess: the redirect changes
    the process's logging for good."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import logging
        import ray, ray.data
        from reclip_ray.console import redirect_ray_output
        redirect_ray_output({str(tmp_path)!r})
        logging.getLogger("ray.tune.tune").info("tune-info")
        logging.getLogger("ray.data").info("data-info")
        logging.getLogger("ray.train").warning("train-warning")
        # What Ray's error-channel thread calls, with the raylet's messages to this job
        import ray._private.worker as ray_worker
        for message in ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4",
                        "A worker died or was killed while executing a task by an unexpected system exit."):
            ray_worker.print_to_stdstream({{"lines": [message], "pid": "raylet", "is_err": False}}, ignore_prefix=False)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "train-warning" in console and "tune-info" not in console and "data-info" not in console, console
    # The raylet's messages: a killed worker shown (though it says neither ERROR nor WARNING), the expected note on
    # worker processes not; both in the file
    assert "(raylet) A worker died" in console and "PYTHON worker processes" not in console, console
    log = (tmp_path / "ray.log").read_text()
    assert all(m in log for m in ("tune-info", "data-info", "train-warning", "PYTHON worker processes",
                                  "A worker died")), log


def test_library_logging_redirected_before_start_up_keeps_ray_and_mlflow_start_up_lines_off_the_console(tmp_path):
    """Called before ray.init and the run's first MLflow call (as ``reclip-ray train`` and ``sweep`` do), the
    redirect takes their start-up lines: MLflow's creation of a new SQLite store's tables and Ray's note that the
    local Ray it started has token authentication on (Ray's default) go to ray.log only; Ray's warning that
    authentication is off still reaches the console; Ray Data's logger, which its first import sets up afresh, stays
    redirected. Real MLflow store, Ray's own warning functions; no Ray is started (the session's cluster is the one
    Ray here)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from reclip_ray.console import redirect_library_logging
        redirect_library_logging({str(tmp_path)!r})
        redirect_library_logging({str(tmp_path)!r})  # a second call adds no second file handler
        from mlflow.tracking import MlflowClient
        MlflowClient("sqlite:///" + {str(tmp_path / "mlflow.db")!r}).search_experiments()
        from ray._private.authentication import authentication_token_setup as auth
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
        import logging
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        import ray.data  # configures Ray Data's logger on its first import, its old handlers dropped
        logging.getLogger("ray.data").info("Registered dataset logger")
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    for line in ("Creating initial MLflow database tables", "Token authentication is enabled",
                 "Started a local Ray instance", "Registered dataset logger"):
        assert line not in console, console
    assert "Token authentication is disabled" in console, console
    log = (tmp_path / "ray.log").read_text()
    for line in ("Creating initial MLflow database tables", "Token authentication is enabled",
                 "Token authentication is disabled", "Started a local Ray instance.", "Registered dataset logger"):
        assert log.count(line) == 1, (line, log)
