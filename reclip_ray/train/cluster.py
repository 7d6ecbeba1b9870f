"""Ray at the driver: connect to a cluster or start a local one, and what the workers ask of it."""

from __future__ import annotations

import math
import os
from typing import Any

from reclip_ray.config import Config, ConfigError


def init_ray(cfg: Config) -> None:
    """Connect to $RAY_ADDRESS (or an already initialised Ray); else start a local one sized for the workers.

    On a 2-core box, workers with a whole CPU each starve Ray Data, so a local Ray gets enough logical CPUs for
    the workers *and* the data pipeline. Either way Ray Data's stats actor is then started from here (see
    ``start_data_stats_actor``).
    """
    import ray

    if not ray.is_initialized():
        _connect(cfg)
    start_data_stats_actor()


def _connect(cfg: Config) -> None:
    import ray

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


def start_data_stats_actor() -> None:
    """Start Ray Data's stats actor from the driver, outside every placement group, unless it runs already.

    Ray Data keeps one detached, named actor per cluster for its dataset metrics and creates it on first use, from
    whichever process runs a dataset first. In a sweep that is a trial, and Tune places everything a trial creates
    in the trial's placement group: the actor died with the first trial to end, the next dataset made a new one,
    and a dataset registered with the dead one failed its updates ("Unhandled error ... _StatsActor
    .update_execution_metrics ... KeyError: 'phase1_..._0'" on the console; Ray 2.60: two or three such deaths in
    a sweep of four trials). Ray Train starts its own such actors with ``scheduling_strategy="DEFAULT"`` for the
    same reason; Ray Data's takes no strategy, so it is made here, where there is no placement group to capture it.
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray that moved it: its metrics are not worth failing a run for
        return
    get_or_create_stats_actor()


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
