"""The numbers README.md and RELIABILITY.md promise, read from the code that keeps them: the tests of each
mechanism shorten these (a 30 s heartbeat is a 0.05 s one there), so only this file notices a change of the
constant that the docs do not follow (or the reverse)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: re.sub(r"\s+", " ", (ROOT / name).read_text()) for name in ("README.md", "RELIABILITY.md")}


def _said(doc: str, phrase: str) -> None:
    found = phrase in DOCS[doc]  # not in the assert: pytest would print the whole document
    assert found, f"{doc} no longer says {phrase!r}: the code says so now"


def _s(seconds: float) -> str:
    return f"{seconds:g} s"


def test_the_launch_lease():
    from reclip_ray.lease import HEARTBEAT_S, WATCH_S

    _said("README.md", f"a heartbeat every {_s(HEARTBEAT_S)}")
    _said("README.md", f"it watches the file for {_s(WATCH_S)}")
    _said("RELIABILITY.md", f"the next launch watches {_s(WATCH_S)} for its heartbeat (every {_s(HEARTBEAT_S)})")


def test_the_workers_mlflow_writes():
    from reclip_ray import tracking_relay as relay

    tries = {1: "once", 2: "twice", 3: "three times"}[relay.RELAY_ATTEMPTS]
    _said("README.md", f"Each call waits at most {_s(relay.RELAY_TIMEOUT_S)} (the model artifact "
                       f"{relay.ARTIFACT_TIMEOUT_S / 60:g} min) and is tried {tries}")
    _said("README.md", f"the loop waits for them, at most {_s(relay.FLUSH_BEFORE_REPORT_S)}, only before it reports")
    _said("README.md", f"More than {relay.MAX_PENDING_WRITES:,} writes behind")
    _said("RELIABILITY.md", f"wait at most {_s(relay.RELAY_TIMEOUT_S)} each")
    _said("RELIABILITY.md", f"waited for (at most {_s(relay.FLUSH_BEFORE_REPORT_S)}, then a warning)")
    _said("RELIABILITY.md", f"more than {relay.MAX_PENDING_WRITES:,} writes behind")


def test_a_remote_folders_reader_and_the_ranged_copy():
    from reclip_ray import folders, storage

    _said("RELIABILITY.md", f"once nothing there has changed for {_s(folders.WHOLE_WAIT_S)}")
    _said("RELIABILITY.md", f"reads {storage.PART_BYTES >> 20} MB parts, {storage.COPY_THREADS} at a time")
    defaults = inspect.signature(storage.copy_to_local).parameters  # what every caller gets
    assert defaults["part_bytes"].default == storage.PART_BYTES and defaults["threads"].default == storage.COPY_THREADS


def test_ray_trains_retries():
    from reclip_ray.config import CONFIG_PRESETS, load_config

    (retries,) = {load_config(name).run.max_failures for name in CONFIG_PRESETS}  # one default, in every preset
    _said("RELIABILITY.md", f"up to `run.max_failures`, default {retries})")


def test_the_node_view_that_sizes_an_elastic_restart():
    """Ray's numbers, not ours: the elastic test shortens both (it asks the coordinator to refresh and lowers the
    start timeout), so a Ray upgrade that changed them would otherwise leave RELIABILITY's worst cases wrong."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
    from ray.train.v2._internal.constants import (DEFAULT_WORKER_GROUP_START_TIMEOUT_S,
                                                  WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)

    tick = _AutoscalingCoordinatorActor.TICK_INTERVAL_S
    _said("RELIABILITY.md", f"which re-reads the node list every {_s(tick)}")
    _said("RELIABILITY.md", f"a node that joins is used at the next refresh (up to {_s(tick)})")
    timeout = _s(DEFAULT_WORKER_GROUP_START_TIMEOUT_S)
    _said("RELIABILITY.md", f"it waits `{WORKER_GROUP_START_TIMEOUT_S_ENV_VAR}` ({timeout} by default)")


def test_where_a_ray_jobs_outputs_go():
    """``$RECLIP_RAY_HOME``'s default, which README, RELIABILITY, jobs/runtime_env.yaml and the README's ``mlflow ui``
    line spell out; the launch's test (test_tracking.py) checks that the launch uses it."""
    from reclip_ray.job_dir import DEFAULT_HOME, HOME_ENV

    for doc in ("README.md", "RELIABILITY.md"):
        _said(doc, f"`${HOME_ENV}` (default `{DEFAULT_HOME}`)")
    _said("README.md", f"sqlite:///{DEFAULT_HOME.replace('~', '$HOME')}/mlflow.db")
    runtime_env = (ROOT / "jobs" / "runtime_env.yaml").read_text()
    assert f"Default {DEFAULT_HOME}." in runtime_env and f"# {HOME_ENV}:" in runtime_env
