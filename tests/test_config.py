"""Config loading: presets, overrides, strict validation with one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from reclip_ray.config import (CONFIG_PRESETS, ConfigError, apply_overrides, from_dict, load_config, load_raw,
                               resolve_count)


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
        (["model.vision.heads=5"], "'model.vision.heads' = 5 does not divide model.vision.width = 128"),
        (["model.text.heads=3"], "'model.text.heads' = 3 does not divide model.text.width = 128"),
        (["model.text.heads=0"], "'model.text.heads' = 0"),
        (["model.vision.base_image_size=36"], "'model.vision.base_image_size' = 36 (the position-embedding grid) is "
                                              "not a positive multiple of the patch size 8"),
        (["train.batch_size=2", "scaling.max_workers=4"], "'train.batch_size' = 2 (a global batch) is smaller than "
                                                          "scaling.max_workers=4"),
        (["phases.1.batch_size=3", "scaling.max_workers=4"], "'phases.1.batch_size' = 3 (a global batch)"),
        (["train.log_every_steps=0"], "'train.log_every_steps' must be >= 1, got 0"),
        (["optim.warmup_samples=1.5"], "'optim.warmup_samples' = 1.5 is neither a count nor a fraction: write an "
                                       "integer for a number of samples (1 means one sample) or a float <= 1"),
        (["optim.warmup_samples=-5"], "'optim.warmup_samples' must be >= 0, got -5"),
        (["optim.warmup_samples=-0.1"], "'optim.warmup_samples' must be >= 0"),
        (["phases.1.warmup_samples=-0.5"], "'phases.1.warmup_samples' must be >= 0; -1: optim.warmup_samples"),
        (["phases.1.warmup_samples=2.5"], "'phases.1.warmup_samples' = 2.5 is neither"),
        (["phases.0.samples=-0.9"], "'phases.0.samples' must be positive"),
        (["phases.0.samples=0"], "'phases.0.samples' must be positive"),
        (["phases.0.samples=1.5"], "'phases.0.samples' = 1.5 is neither"),
        (["phases.1.lr=-1e-4"], "'phases.1.lr' (finetune) must be >= 0"),
        (["optim.lr=0"], "'optim.lr' must be positive"),
        (["optim.weight_decay=-0.1"], "'optim.weight_decay' must be >= 0"),
        (["optim.min_lr_ratio=2"], "'optim.min_lr_ratio' must be in [0, 1]"),
        (["checkpoint.every_samples=-1"], "'checkpoint.every_samples' must be >= 0"),
        (["checkpoint.every_minutes=-0.5"], "'checkpoint.every_minutes' must be >= 0"),
        (["checkpoint.every_minutes=.nan"], "'checkpoint.every_minutes' must be >= 0"),
        (["checkpoint.upload=later"], "'checkpoint.upload' must be sync or async"),
        # Configs Ray Train or the driver used to refuse only after the MLflow run existed:
        (["scaling.gpus_per_worker=0"], "'scaling.gpus_per_worker' = 0 leaves GPU workers without a GPU "
                                        "(scaling.use_gpu=auto); set scaling.use_gpu=false for CPU workers"),
        (["scaling.gpus_per_worker=0", "scaling.use_gpu=true"], "(scaling.use_gpu=true)"),
        (["scaling.gpus_per_worker=0.5"], "'scaling.gpus_per_worker' = 0.5 lets ranks share a GPU, which NCCL "
                                          "refuses (scaling.use_gpu=auto, max_workers=2)"),
        (["data.max_bad_fraction=0.99"], "'data.max_bad_fraction' must be in [0, 0.5], got 0.99"),
        (["train.samples=650", "phases.0.samples=649", "phases.1.samples=1"],
         "'phases.1.samples' (finetune) gives the phase 1 samples, fewer than scaling.max_workers=2"),
        # Model sizes the phase and eval checks divide by, or that would fail in every worker at build:
        (["model.vision.patch_size=0"], "'model.vision.patch_size' must be positive, got 0"),
        (["model.vision.patch_size=-8"], "'model.vision.patch_size' must be positive, got -8"),
        (["model.embed_dim=0"], "'model.embed_dim' must be positive, got 0"),
        (["model.vision.width=0"], "'model.vision.width' must be positive, got 0"),
        (["model.text.depth=0"], "'model.text.depth' must be positive, got 0"),
        (["model.text.context_length=0"], "'model.text.context_length' must be positive, got 0"),
        (["model.vision.mlp_ratio=0"], "'model.vision.mlp_ratio' must be positive, got 0"),
        # What the launch's eval-set check refused only once a run started (and -64 not at all):
        (["eval.full_image_size=60"], "'eval.full_image_size' 60 must be 0 (the last phase's image_size) or a "
                                      "positive multiple of the patch size 8"),
        (["eval.full_image_size=-64"], "'eval.full_image_size' -64 must be 0"),
        # Counts must be whole, however they are written:
        (["train.samples=1.5"], "'train.samples' must be an integer, got 1.5"),
        (["train.samples=1.5e0"], "'train.samples' must be an integer, got '1.5e0'"),
        (["train.samples=.inf"], "'train.samples' must be an integer, got inf"),
        (["train.seed=nan"], "'train.seed' must be an integer, got 'nan'"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_problem(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# One mistake per section check of ``validate`` (each check is a function in a list; a check dropped from it, or a
# rule moved out of every check, fails here), beside the ones above that already reach a check.
SECTION_CASES = [
    (["train.samples=0"], "'train.samples' must be positive, got 0"),  # _check_run_size
    (["phases.1.name=lowres"], "phase names must be unique, got ['lowres', 'lowres']"),  # _check_phases
    (["model.vision.pool=max"], "'model.vision.pool' must be cls or avg, got 'max'"),  # _check_model
    (["optim.schedule=cosine"], "'optim.schedule' must be global or per_phase, got 'cosine'"),  # _check_optim
    (["train.precision=fp16"], "'train.precision' must be auto, fp32 or bf16, got 'fp16'"),  # _check_train
    (["train.local_loss=maybe"], "'train.local_loss' must be auto, true or false, got 'maybe'"),
    (["train.micro_batch_size=-1"], "'train.micro_batch_size' must be a positive number of rows or 0"),
    (["scaling.use_gpu=maybe"], "'scaling.use_gpu' must be auto, true or false, got 'maybe'"),  # _check_scaling
    (["scaling.resources_per_worker={CPU: 1}"], "'scaling.resources_per_worker' takes custom resources"),
    (["scaling.resources_per_worker={node: -1}"], "'scaling.resources_per_worker' must map resource names"),
    (["checkpoint.num_to_keep=0"], "'checkpoint.num_to_keep' must be >= 1, got 0"),  # _check_checkpoint
    (["eval.batch_size=0"], "'eval.batch_size' must be >= 1, got 0"),  # _check_eval
    (["eval.at_gflops=[100, -1]"], "'eval.at_gflops' must be a list of positive GFLOPs, got [100, -1]"),
    (["data.shuffle=rows"], "'data.shuffle' must be files or none, got 'rows'"),  # _check_data
    (["data.shuffle_buffer=-2"], "'data.shuffle_buffer' must be -1 (10x the local batch), 0 (off) or a row count"),
    (["data.group_shards=0"], "'data.group_shards' and 'data.chunk_rows' must be >= 1"),
    (["phases.1.micro_batch_size=-2"], "'phases.1.micro_batch_size' (finetune) must be -1 (train.micro_batch_size), 0"),
    (["data.block_mb=-1"], "'data.decode_batch_size' must be >= 1 and 'data.block_mb' >= 0, got 64 and -1"),
    (["data.decode_batch_size=0"], "'data.decode_batch_size' must be >= 1 and 'data.block_mb' >= 0, got 0 and 8"),
    (["data.missing_shards=warn"], "'data.missing_shards' must be fail or skip, got 'warn'"),
    (["data.decode_device=tpu"], "'data.decode_device' must be cpu or cuda, got 'tpu'"),
    (["data.decode_device=cuda", "scaling.use_gpu=false"], "'data.decode_device=cuda' decodes on the training GPUs"),
    (["data.tokenizer_sample_captions=-1"], "'data.tokenizer_sample_captions' must be a number of captions"),
    (["fault.step_delay_s=-0.5"], "'fault.step_delay_s' must be >= 0, got -0.5"),  # _check_fault
]


@pytest.mark.parametrize("overrides, fragment", SECTION_CASES)
def test_each_section_check_of_validate_runs(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, where", [
    (["run.name=.."], "'run.name' '..'"),
    (["run.name=a/b"], "'run.name' 'a/b'"),
    (["run.name=/abs/run"], "'run.name' '/abs/run'"),
    (["run.name=a\\b"], "'run.name' 'a\\\\b'"),
    (["run.name=a%2Fb"], "'run.name' 'a%2Fb'"),
    (["run.name=a?b"], "'run.name' 'a?b'"),
    (["run.name=a\tb"], "'run.name' 'a\\tb'"),
    (["run.name=" + "x" * 201], "'run.name' 'xxx"),
    (["name=", "run.name="], "'name' (the run's name: run.name is empty) ''"),
    (["name=../up"], "'name' (the run's name: run.name is empty) '../up'"),
])
def test_a_run_name_that_is_no_single_folder_name_is_refused(overrides, where):
    """The run folder is ``storage.join(run.storage_path, name)``: ``..`` or ``/abs`` put it outside the storage
    path, ``a/b`` below it, an empty name made it the storage path itself; a URI's reader decodes ``%2F`` to ``/``
    and cuts at ``?`` (run ``a?b`` shared run ``a``'s folder). Refused at load, naming the key; a saved config that
    holds one still loads (an exported model stays loadable)."""
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert str(info.value).startswith(f"{where}") and "is no folder name for run.storage_path" in str(info.value)
    assert "\n" not in str(info.value)
    from_dict(apply_overrides(load_raw("tiny"), overrides), saved=True)


def test_a_run_name_of_one_folder_is_accepted():
    """Spaces, non-ASCII letters, dots and a sweep trial's ``<sweep>-<trial id>`` are one folder name."""
    for name in ("my run", "résumé-2", "a.b..c", "smoke-5f2a1_00000", "x" * 200):
        assert load_config("tiny", [f"run.name={name}"]).run.name == name
    assert load_config("tiny", ["name=from the file", "run.name="]).name == "from the file"


def test_accepted_edge_values():
    """The edges of the rules above are accepted: CPU workers reserving no GPU, half the rows bad, a phase of
    exactly max_workers samples (one step, a row each)."""
    assert load_config("tiny", ["scaling.gpus_per_worker=0", "scaling.use_gpu=false"]).scaling.gpus_per_worker == 0
    # A share of a GPU is fine for one worker (a sweep's trials side by side on one GPU) and for CPU workers.
    assert load_config("tiny", ["scaling.gpus_per_worker=0.5", "scaling.min_workers=1",
                                "scaling.max_workers=1"]).scaling.gpus_per_worker == 0.5
    cpu = load_config("tiny", ["scaling.gpus_per_worker=0.25", "scaling.use_gpu=false"])
    assert cpu.scaling.gpus_per_worker == 0.25
    assert load_config("tiny", ["data.max_bad_fraction=0.5"]).data.max_bad_fraction == 0.5
    assert load_config("tiny", ["train.samples=650", "phases.0.samples=648", "phases.1.samples=2"]).phase_samples() == [
        648, 2]


def test_the_step_delay_gated_by_a_file_applies_only_while_the_file_exists(tmp_path):
    """fault.step_delay_while, the test hook that lets a reliability test decide how long its run crawls: the delay
    is paid while the file is there, not before it is made nor after it is deleted; without the key it is always
    paid. A gate without a delay, or on an object store (a request per step per rank), is refused."""
    from reclip_ray.train.faults import step_delay_s

    gate = tmp_path / "crawl"
    cfg = load_config("tiny", ["fault.step_delay_s=0.2", f"fault.step_delay_while={gate}"])
    assert step_delay_s(cfg) == 0.0
    gate.touch()
    assert step_delay_s(cfg) == 0.2
    gate.unlink()
    assert step_delay_s(cfg) == 0.0
    assert step_delay_s(load_config("tiny", ["fault.step_delay_s=0.2"])) == 0.2
    assert step_delay_s(load_config("tiny")) == 0.0
    with pytest.raises(ConfigError, match=r"^'fault.step_delay_while' gates fault.step_delay_s, which is 0: set both$"):
        load_config("tiny", [f"fault.step_delay_while={gate}"])
    with pytest.raises(ConfigError, match=r"^'fault.step_delay_while' must be a local file path .* got 's3://b/crawl'$"):
        load_config("tiny", ["fault.step_delay_s=0.2", "fault.step_delay_while=s3://b/crawl"])


def _phases(*samples, total=1000):
    """A tiny-model config whose phases have the given ``samples`` values (fractions or counts)."""
    from reclip_ray.config import from_dict

    phases = [{"name": f"p{i}", "image_size": 32, "text_length": 16, "samples": s} for i, s in enumerate(samples)]
    return from_dict({"model": "tiny", "phases": phases, "train": {"samples": total, "batch_size": 64}})


def test_last_fraction_takes_the_rounding_so_phases_sum_to_train_samples():
    cfg = _phases(0.3333333, 0.3333333, 0.3333333)
    assert cfg.phase_samples() == [333, 333, 334]
    assert sum(cfg.phase_samples()) == cfg.train.samples == 1000
    big = _phases(0.3333333, 0.3333333, 0.3333333, total=2_000_000_000)  # 7 digits: 200 samples short, still ok
    assert sum(big.phase_samples()) == 2_000_000_000


@pytest.mark.parametrize(
    "samples, counts",
    [
        ((0.9, 100), [900, 100]),
        ((100, 0.9), [100, 900]),
        ((0.5, 300, 0.2), [500, 300, 200]),
        ((0.3333333, 333, 0.3333333), [333, 333, 334]),
        ((0.33333, 0.33333, 333), [333, 334, 333]),  # counts are kept as written; the last *fraction* absorbs
        ((400, 600), [400, 600]),
        ((0.333, 0.333, 0.333), [333, 333, 334]),  # 999 of 1000 is within rounding
        ((1000.0,), [1000]),  # an integral float > 1 is a count
    ],
)
def test_mixed_fractions_and_counts(samples, counts):
    assert _phases(*samples).phase_samples() == counts


@pytest.mark.parametrize(
    "samples, fragment",
    [
        ((800, 300), "phase samples (800 + 300 -> 1100) do not add up to train.samples=1000"),
        ((400, 599), "phase samples (400 + 599 -> 999) do not add up to train.samples=1000"),
        ((0.5, 300), "phase samples (0.5 + 300 -> 800.0) do not add up to train.samples=1000"),
        ((1,), "phase samples (1 -> 1) do not add up"),  # the integer 1 is one sample, not the whole run
        ((0.0001, 1000), "'phases.0.samples' (p0) leaves the phase 0 of train.samples=1000"),
    ],
)
def test_phase_totals_that_do_not_match_fail_naming_the_numbers(samples, fragment):
    with pytest.raises(ConfigError) as info:
        _phases(*samples)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_warmup_integer_is_a_count_and_float_one_is_everything():
    from reclip_ray.schedule import Schedule

    assert Schedule.from_config(load_config("tiny", ["optim.warmup_samples=1"])).global_warmup == 1
    cfg = load_config("tiny", ["optim.warmup_samples=1.0"])
    assert Schedule.from_config(cfg).global_warmup == cfg.train.samples
    assert Schedule.from_config(load_config("tiny", ["optim.warmup_samples=2e3"])).global_warmup == 2000
    assert load_config("tiny", ["optim.warmup_samples=0"]).optim.warmup_samples == 0
    with pytest.raises(ConfigError, match="neither a fraction"):
        resolve_count(2.5, 100)


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config("tiny", ["phases.0.image_size=48"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(path.read_text())["phases"][0]["image_size"] == 48


def test_a_config_or_an_override_never_runs_code_from_yaml_tags(tmp_path):
    """RELIABILITY (safety): configs and ``--set`` values are read with ``yaml.safe_load``; a Python tag is refused
    (a file) or stays a string (an override), and nothing runs."""
    marker = tmp_path / "ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: evil\ntrain:\n  seed: {tag}\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: invalid YAML at line 3"):
        load_config(str(path))
    with pytest.raises(ConfigError):  # a string where the seed must be an integer
        load_config("tiny", [f"train.seed={tag}"])
    cfg = load_config("tiny", [f"tracking.experiment={tag}"])  # a key that takes any string ('/': no run.name)
    assert cfg.tracking.experiment == tag and not marker.exists()


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


@pytest.mark.parametrize("text, count", [("1e6", 1_000_000), ("4.0e8", 400_000_000), ("1.0E+6", 1_000_000),
                                         ("2000.0", 2000)])
def test_an_integer_key_takes_a_whole_count_written_in_floating_point(tmp_path, text, count):
    """PyYAML reads ``1e6`` and ``4.0e8`` as strings (and ``1.0E+6`` as a float): a count written so is the count,
    from ``--set`` and from a file alike; ``1.5`` is still refused (the table above)."""
    over = ["phases.0.samples=0.9", "phases.1.samples=0.1"]
    cfg = load_config("tiny", [f"train.samples={text}", f"checkpoint.every_samples={text}", *over])
    assert (cfg.train.samples, cfg.checkpoint.every_samples) == (count, count)
    assert type(cfg.train.samples) is int and sum(cfg.phase_samples()) == count
    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny\ntrain: {{samples: {text}, batch_size: 64}}\n")
    assert load_config(str(path)).train.samples == count


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("config", "'train.batch_size' must be positive, got -1"),
        ("gpus", "'scaling.gpus_per_worker' = 0 leaves GPU workers without a GPU"),
        ("missing data", "data.train not found: "),
        ("schema", "missing image column 'jpg'"),
    ],
)
def test_bad_config_fails_before_ray_starts(tmp_path, synth_dir, case, fragment):
    """The CLI in a fresh process: a user mistake is one line on stderr, exit 2, and nothing was started or made.

    ``RAY_ADDRESS`` names a port nothing listens on: a process that tried to connect to Ray would fail with a Ray
    error (or hang until the timeout) instead of the expected line; ``RAY_TMPDIR`` would be created by a local Ray.
    The working directory must stay empty: no ``reclip_data`` (data made), no ``reclip_runs`` (a tokenizer or run
    folder), no ``mlflow.db`` (a tracking run).
    """
    overrides = {
        "config": ["train.batch_size=-1"],
        "gpus": ["scaling.gpus_per_worker=0", "scaling.use_gpu=true"],
        "missing data": [f"data.train={tmp_path / 'nope' / 'train'}", "data.synth_if_missing=false"],
        "schema": [f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}", "data.image_column=jpg"],
    }[case]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    env.update({"RAY_ADDRESS": "127.0.0.1:1", "RAY_TMPDIR": str(tmp_path / "ray_tmp"), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "reclip_ray", "train"]
    for o in overrides:
        command += ["--set", o]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reclip-ray: error: ") and fragment in lines[0], proc.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == []  # no reclip_data, reclip_runs, mlflow.db
    assert not (tmp_path / "ray_tmp").exists()


def test_absolute_keeps_uris_as_given_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    """Run and data paths reach Ray workers that run in other folders: local ones must be absolute, and a URI
    must stay a URI (``Path("s3://b/x")`` would be the local folder ``s3:/b/x``)."""
    from reclip_ray.config import absolute

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for uri in ("s3://bucket/runs", "s3://bucket/runs/", "gs://b/data/train", "hdfs://nn:8020/d"):
        assert absolute(uri) == uri
    assert absolute("file:///data/x") == "/data/x"  # a local path: the launch checks those with os.path
    assert absolute("") == ""
    assert absolute("data/train") == os.path.join(os.path.realpath(tmp_path), "data", "train")
    assert absolute("~/data") == os.path.join(os.path.realpath(tmp_path), "home", "data")  # no shell expands it
    assert absolute("/abs/x") == "/abs/x"
    assert absolute("x", base=tmp_path / "configs") == os.path.join(os.path.realpath(tmp_path), "configs", "x")
