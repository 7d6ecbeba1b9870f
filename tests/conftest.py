"""Shared fixtures. One Ray instance per pytest session, in its own temp dir, never `ray stop`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Workers inherit this; keeps torch from oversubscribing the two cores CI has.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than cores, so fractional-CPU workers leave room for Ray Data."""
    import ray

    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small captioned-shapes dataset shared by the tests that only read it."""
    from reclip_ray.data.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, train=600, eval=200, seed=0, shard_rows=200)
    return out


@pytest.fixture(scope="session")
def tokenizer_path(synth_dir, tmp_path_factory) -> Path:
    from reclip_ray.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(synth_dir / "train", vocab_size=512, out=out)
    return out
