"""benchmarks/gpu_e2e.py's CPU accounting: which cores Ray Data kept busy while the GPU trained a phase (issue 26,
item 2: decode cores per GPU measured through the real pipeline on the device's own cores)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("title, group", [
    ("ray::ReadItems->MapBatches(read_and_decode)", "data"),
    ("ray::MapBatches(read_groups)->MapBatches(decode_batch)", "data"),
    ("ray::SplitCoordinator.get", "data"),
    ("ray::RayTrainWorker.run_train_fn", "train"),
    ("ray::IDLE", "other"),
    ("/usr/bin/python3 -m reclip_ray train --config vit-b-16", "other"),
])
def test_cpu_groups_by_ray_process_title(e2e, title, group):
    assert e2e.cpu_group(title) == group


def test_a_busy_process_counts_for_its_group_from_proc(e2e):
    """/proc read for real: a child that spins under a data-task-like title shows up as ``data`` CPU, counted from
    zero since it was born after the first reading (0.2 s of the 1 s it spun before the second: a loaded machine
    gives it less than a core)."""
    before = e2e._proc_cpu()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass",
                              "MapBatches(fake)"])
    try:
        time.sleep(1.0)
        after = e2e._proc_cpu()
    finally:
        child.kill()
        child.wait(timeout=30)
    spent = e2e.cpu_deltas(before, after)
    assert spent["data"] >= 0.2, spent


def test_a_data_task_that_ended_between_two_readings_still_counts_as_data(e2e):
    task = "ray::MapBatches(read_groups)->MapBatches(decode_batch)"
    before = {(1, 5): (10.0, task), (2, 5): (3.0, "ray::IDLE"), (3, 5): (1.0, "ray::RayTrainWorker.run_train_fn")}
    after = {(1, 5): (10.4, "ray::IDLE"), (2, 5): (3.2, "ray::IDLE"), (3, 5): (1.9, "ray::RayTrainWorker"),
             (4, 7): (0.3, task)}  # pid 4 was born in between
    spent = e2e.cpu_deltas(before, after)
    assert spent == pytest.approx({"data": 0.7, "train": 0.9, "other": 0.2})


def test_a_resume_gap_is_not_a_window_and_cores_are_cpu_over_window_time(e2e):
    logged = [100.0, 101.0, 102.0, 103.0, 160.0, 161.0, 162.0]  # a kill and a resume between 103 and 160
    windows = e2e.steady_windows(logged)
    assert windows == [(100.0, 101.0), (101.0, 102.0), (102.0, 103.0), (160.0, 161.0), (161.0, 162.0)]
    samples = [{"t": 100.5, "data": 3.0}, {"t": 101.0, "data": 3.0}, {"t": 130.0, "data": 50.0},
               {"t": 161.5, "data": 4.0}]
    # 10 data CPU-seconds inside 5 s of windows; the sample in the gap is not counted.
    assert e2e.data_cores(windows, samples) == 2.0
    assert e2e.data_cores(windows, []) is None and e2e.steady_windows([5.0]) == []


def test_data_read_ahead_of_the_steady_windows_still_counts_for_its_phase(e2e):
    """A phase that fits in the read-ahead is read before its steady windows (the CPU dry run's lowres: all 7.8 data
    CPU-seconds before its second logging), so ``data_cores`` reads 0 there; ``phase_data_cpu`` gives each reading to
    the phase of the next logging time: what the phase's reads cost, wherever they fell."""
    logged = {0: [10.0, 12.0, 14.0], 1: [30.0, 32.0]}
    samples = [{"t": 5.0, "data": 4.0}, {"t": 9.0, "data": 3.0},  # phase 0 read ahead, before its first logging
               {"t": 13.0, "data": 0.0}, {"t": 20.0, "data": 2.0},  # phase 1's reads, after phase 0's last logging
               {"t": 31.0, "data": 0.5}, {"t": 40.0, "data": 9.0}]  # the last one after every logging: left out
    assert e2e.data_cores(e2e.steady_windows(logged[0]), samples) == 0.0
    assert e2e.phase_data_cpu(logged, samples) == {0: 7.0, 1: 2.5}
