"""Config loading: presets, overrides, strict validation with one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from reclip_ray.config import CONFIG_PRESETS, ConfigError, load_config, resolve_count


@pytest.mark.parametrize("name", CONFIG_PRESETS)
def test_presets_load_and_phase_samples_add_up(name):
    cfg = load_config(name)
    assert sum(cfg.phase_samples()) == cfg.train.samples
    assert cfg.model.vision.width > 0 and cfg.model.name == cfg.name
    for ph in cfg.phases:
        assert ph.image_size % cfg.model.vision.patch_size == 0


def test_overrides_reach_nested_lists_and_model_presets():
    cfg = load_config("tiny", ["phases.0.image_size=48", "train.batch_size=64", "model.vision.depth=2", "run.name=x"])
    assert cfg.phases[0].image_size == 48
    assert cfg.train.batch_size == 64
    assert cfg.model.vision.depth == 2 and cfg.model.vision.width == 128  # rest of the preset kept
    assert cfg.run.name == "x"


def test_fraction_versus_count():
    assert resolve_count(0.25, 1000) == 250
    assert resolve_count(300, 1000) == 300
    cfg = load_config("tiny", ["train.samples=1000", "phases.0.samples=800", "phases.1.samples=200"])
    assert cfg.phase_samples() == [800, 200]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["phases.0.samples=0.5"], "do not add up"),
        (["phases.0.image_size=36"], "not a positive multiple of the patch size 8"),
        (["phases.1.text_length=500"], "text_length 500"),
        (["train.batch_size=abc"], "'train.batch_size' must be an integer"),
        (["phases.5.image_size=32"], "not an index"),
        (["optim.lr=fast"], "'optim.lr' must be a number"),
        (["scaling.min_workers=3", "scaling.max_workers=2"], "min_workers <= max_workers"),
        (["scaling.cpus_per_worker=-1"], "must be >= 0"),
        (["model=vit-z"], "unknown model preset 'vit-z'"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_problem(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config("tiny", ["phases.0.image_size=48"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(path.read_text())["phases"][0]["image_size"] == 48


def test_unknown_config_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_cli_prints_one_line_error_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "reclip_ray", "train", "--set", "optim.lrr=1"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["reclip-ray: error: unknown config key 'optim.lrr'; valid keys here: " + lines[0].split("valid keys here: ")[1]]


def test_exponent_without_dot_is_a_number():
    assert load_config("tiny", ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
