"""Ray at the driver: connect to a cluster or start a local one, and what the workers ask of it."""

from __future__ import annotations

import math
import os
from typing import Any

from reclip_ray.config import Config, ConfigError


def init_ray(cfg: Config) -> None:
    """Connect to $RAY_ADDRESS (or an already initialised Ray); else start a local one sized for the workers.

    On a 2-core box, workers with a whole CPU each starve Ray Data, so a local Ray gets enough logical CPUs for
    the workers *and* the data pipeline.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # No runtime_env here: inside `ray job submit` the job's own runtime env applies, and Ray refuses a second
        # one from the driver. Workers set their torch threads from scaling.cpus_per_worker themselves.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    needed = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker + 2
    # The dashboard stays on (Ray's default): Ray Train's placement-group cleaner and the state API need it; without
    # it a worker group killed mid-run (a sweep trial stopped early) keeps its CPUs reserved forever.
    # address="local": a new Ray even when /tmp/ray/ray_current_cluster names another (`ray start`, a test cluster).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), runtime_env=env)


def use_gpu(cfg: Config) -> bool:
    """``scaling.use_gpu``: true, false, or ``auto`` (whether the cluster has GPUs)."""
    import ray

    setting = str(cfg.scaling.use_gpu).lower()
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


def check_decode_device(cfg: Config, gpu: bool) -> None:
    if cfg.data.decode_device == "cuda" and not gpu:
        raise ConfigError("'data.decode_device=cuda' needs GPU workers, and this cluster has no GPU "
                          "(set data.decode_device=cpu)")


def scaling_config(cfg: Config, gpu: bool) -> Any:
    """Ray Train's ScalingConfig: a fixed worker count, or (min, max) for an elastic run."""
    import ray.train

    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    workers = (
        cfg.scaling.min_workers
        if cfg.scaling.min_workers == cfg.scaling.max_workers
        else (cfg.scaling.min_workers, cfg.scaling.max_workers)
    )
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                   elastic_resize_monitor_interval_s=cfg.scaling.resize_check_interval_s)
