"""``train/cluster.py``: what the config asks of Ray Train's ScalingConfig (no Ray started)."""

from __future__ import annotations

import pytest

from reclip_ray.config import ConfigError, load_config
from reclip_ray.train.cluster import check_decode_device, scaling_config


def test_an_elastic_run_asks_ray_train_for_a_range_checked_at_the_configured_interval():
    """RELIABILITY: when a node joins an elastic run it scales back up, "checked every
    ``scaling.resize_check_interval_s``": the value Ray Train's resize monitor is given."""
    cfg = load_config("tiny", ["scaling.min_workers=2", "scaling.max_workers=8", "scaling.resize_check_interval_s=7",
                               "scaling.cpus_per_worker=0", "scaling.resources_per_worker={slot: 1}"])
    scaling = scaling_config(cfg, gpu=False)
    assert scaling.num_workers == (2, 8) and scaling.elastic_resize_monitor_interval_s == 7
    assert scaling.resources_per_worker == {"CPU": 0, "slot": 1} and not scaling.use_gpu


def test_a_fixed_gpu_run_asks_for_its_gpu_share_and_cpus():
    cfg = load_config("tiny", ["scaling.min_workers=4", "scaling.max_workers=4", "scaling.cpus_per_worker=6"])
    scaling = scaling_config(cfg, gpu=True)
    assert scaling.num_workers == 4 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 6, "GPU": cfg.scaling.gpus_per_worker}
    check_decode_device(load_config("tiny", ["data.decode_device=cuda"]), gpu=True)
    with pytest.raises(ConfigError, match="'data.decode_device=cuda' needs GPU workers"):
        check_decode_device(load_config("tiny", ["data.decode_device=cuda"]), gpu=False)
