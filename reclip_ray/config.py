"""Typed run configuration: YAML in, validated dataclasses out.

One YAML document describes a whole run. Loading is strict (an unknown key is an error that names the key and the
valid ones) because a silently ignored typo in a 20-GPU-hour config is the most expensive bug there is. Overrides
use dotted paths with list indices (``phases.0.image_size=48``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from reclip_ray.errors import ReclipError


class ConfigError(ReclipError, ValueError):
    """A user mistake in a config file, a preset name or an override; printed as one line."""


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    train: str = "reclip_data/train"
    eval: str = "reclip_data/eval"
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"
    key_column: str = "key"
    tokenizer: str = ""  # path to tokenizer.json; empty: train one on data.train at launch (vocab_size below)
    vocab_size: int = 1024  # only used when the tokenizer is trained at launch
    max_bad_fraction: float = 0.01
    synth_if_missing: bool = False  # make the captioned-shapes dataset when data.train does not exist
    synth_train: int = 20000
    synth_eval: int = 1000
    read_parallelism: int = -1  # read+decode tasks in flight per phase; -1: max(4, the cluster's CPUs)
    decode_batch_size: int = 64
    shuffle: str = "files"  # files | none; row-level shuffling is local to the read blocks
    missing_shards: str = "fail"  # fail | skip: what a shard that disappears during the run does


@dataclass
class VisionConfig:
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: str = "cls"  # cls | avg
    base_image_size: int = 224  # grid the position embeddings are stored at; resampled on the fly for other sizes


@dataclass
class TextConfig:
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    context_length: int = 77  # longest text_length any phase may use
    vocab_size: int = 0  # 0: taken from the tokenizer when the model is built
    pad_id: int = 0


@dataclass
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    grad_checkpointing: bool = False


@dataclass
class PhaseConfig:
    name: str = "phase"
    image_size: int = 224
    text_length: int = 32
    samples: float = 1.0  # float <= 1: fraction of train.samples; int: absolute count
    batch_size: int = 0  # 0: train.batch_size
    lr: float = 0.0  # 0: optim.lr (per-phase schedule only)
    warmup_samples: float = -1.0  # -1: optim.warmup_samples (per-phase schedule only); fractions allowed


@dataclass
class TrainConfig:
    samples: int = 20000
    batch_size: int = 256  # global batch; each of N workers takes batch_size / N
    seed: int = 0
    log_every_steps: int = 10
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    collective_timeout_s: int = 600


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_samples: float = 0.05  # fraction of the run (or of each phase) when <= 1, else a count
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    schedule: str = "global"  # global: one warmup + cosine over the run | per_phase: each phase its own
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class ScalingSection:
    min_workers: int = 1
    max_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resize_check_interval_s: float = 60.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources, e.g. a node type


@dataclass
class CheckpointSection:
    every_samples: int = 0  # 0: only at phase ends
    num_to_keep: int = 2


@dataclass
class RunSection:
    name: str = ""  # empty: derived from the config name
    storage_path: str = "reclip_runs"
    max_failures: int = 2


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = ""  # empty: the config name


@dataclass
class EvalConfig:
    batch_size: int = 256
    at_phase_end: bool = True
    full_image_size: int = 0  # 0: the last phase's image_size


@dataclass
class FaultConfig:
    fail_at_samples: int = 0  # testing only: rank fail_rank raises once when this many samples have been seen
    fail_rank: int = 0
    step_delay_s: float = 0.0  # testing only: sleep per step, so a short test run is still alive during a resize


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def phase_samples(self) -> list[int]:
        """Absolute sample count of each phase (fractions resolved against train.samples)."""
        return [resolve_count(p.samples, self.train.samples) for p in self.phases]


# --------------------------------------------------------------------------------------------------------------
# Model presets (plain data; reclip_ray.model builds them)
# --------------------------------------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the embedded default: patch 8 so a 32 px image still has 16 tokens.
    "tiny": {
        "embed_dim": 128,
        "vision": {"patch_size": 8, "width": 128, "depth": 4, "heads": 4, "pool": "cls", "base_image_size": 64},
        "text": {"width": 128, "depth": 3, "heads": 4, "context_length": 32},
    },
    "small": {
        "embed_dim": 256,
        "vision": {"patch_size": 8, "width": 256, "depth": 6, "heads": 4, "pool": "cls", "base_image_size": 128},
        "text": {"width": 256, "depth": 4, "heads": 4, "context_length": 32},
    },
    # OpenAI CLIP ViT-B/16 sizes.
    "vit-b-16": {
        "embed_dim": 512,
        "vision": {"patch_size": 16, "width": 768, "depth": 12, "heads": 12, "pool": "cls", "base_image_size": 224},
        "text": {"width": 512, "depth": 12, "heads": 8, "context_length": 77},
    },
    # OpenAI CLIP ViT-L/14 tower sizes at patch 16 (the CLIPA recipe's ViT-L/16).
    "vit-l-16": {
        "embed_dim": 768,
        "vision": {"patch_size": 16, "width": 1024, "depth": 24, "heads": 16, "pool": "cls", "base_image_size": 224},
        "text": {"width": 768, "depth": 12, "heads": 12, "context_length": 77},
    },
}

CONFIG_PRESETS = ("tiny", "small", "vit-b-16", "vit-l-16")
DEFAULT_PRESET = "tiny"


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def resolve_count(value: float, total: int) -> int:
    """A float <= 1 is a fraction of ``total``; anything else is an absolute count."""
    if isinstance(value, float) and value <= 1.0:
        return int(round(value * total))
    return int(value)


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and mistyped values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path or 'config'}' must be a mapping, got {type(raw).__name__}")
    hints = _field_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in valid:
            raise ConfigError(f"unknown config key '{where}'; valid keys here: {', '.join(valid)}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is Union:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        return value  # keep int vs float: phase samples use the distinction
    if tp is str:
        if isinstance(value, bool) and where.endswith("use_gpu"):
            return str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
        return str(value)
    return value


def _resolve_model(raw: Any) -> dict[str, Any]:
    """``model`` may be a preset name, or a mapping with an optional ``preset`` key plus overrides."""
    if raw is None:
        raw = DEFAULT_PRESET
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"'model' must be a preset name or a mapping, got {raw!r}")
    raw = copy.deepcopy(raw)
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; valid: {', '.join(MODEL_PRESETS)}")
    merged = _deep_merge(copy.deepcopy(MODEL_PRESETS[preset]), raw)
    merged.setdefault("name", preset)
    return merged


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def load_raw(name_or_path: str | None) -> dict[str, Any]:
    """The raw YAML mapping for a preset name or a file path (no validation yet)."""
    name_or_path = name_or_path or DEFAULT_PRESET
    path = Path(name_or_path)
    if name_or_path in CONFIG_PRESETS:
        text = resources.files("reclip_ray").joinpath("presets", f"{name_or_path}.yaml").read_text()
        source = f"preset '{name_or_path}'"
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        source = str(path)
    else:
        raise ConfigError(f"unknown config '{name_or_path}': not a preset ({', '.join(CONFIG_PRESETS)}) nor a YAML file")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a YAML mapping")
    if "name" not in raw:
        raw["name"] = path.stem if source != f"preset '{name_or_path}'" else name_or_path
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.path=value`` strings; list items are addressed by index (``phases.1.samples=0.2``)."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        set_path(raw, dotted, value)
    return raw


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``value`` at a dotted path inside nested dicts/lists, creating mappings as needed."""
    parts = dotted.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{part}' is not an index of a {len(node)}-item list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if part == "model" and i == 0 and not last and isinstance(node.get("model"), str):
            node["model"] = {"preset": node["model"]}
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a ``Config`` and check the cross-field rules."""
    raw = copy.deepcopy(raw)
    raw["model"] = _resolve_model(raw.get("model"))
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, plus ``--set`` overrides, validated."""
    return from_dict(apply_overrides(load_raw(name_or_path), overrides))


def validate(cfg: Config) -> None:
    """Cross-field rules, checked before anything expensive (Ray, data) starts."""
    if not cfg.phases:
        raise ConfigError("'phases' must list at least one phase")
    if cfg.train.samples <= 0:
        raise ConfigError(f"'train.samples' must be positive, got {cfg.train.samples}")
    if cfg.train.batch_size <= 0:
        raise ConfigError(f"'train.batch_size' must be positive, got {cfg.train.batch_size}")
    patch = cfg.model.vision.patch_size
    for i, ph in enumerate(cfg.phases):
        where = f"phases.{i} ({ph.name})"
        if ph.image_size <= 0 or ph.image_size % patch:
            raise ConfigError(f"{where}: image_size {ph.image_size} is not a positive multiple of the patch size {patch}")
        if not 2 <= ph.text_length <= cfg.model.text.context_length:
            raise ConfigError(
                f"{where}: text_length {ph.text_length} must be in [2, model.text.context_length="
                f"{cfg.model.text.context_length}]"
            )
        if ph.samples <= 0:
            raise ConfigError(f"{where}: samples must be positive, got {ph.samples}")
        if ph.batch_size < 0:
            raise ConfigError(f"{where}: batch_size must be >= 0, got {ph.batch_size}")
    counts = cfg.phase_samples()
    total = sum(counts)
    if abs(total - cfg.train.samples) > len(counts):  # rounding of fractions may lose a sample per phase
        desc = " + ".join(str(p.samples) for p in cfg.phases)
        raise ConfigError(
            f"phase samples ({desc} -> {total}) do not add up to train.samples={cfg.train.samples}"
        )
    names = [p.name for p in cfg.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phase names must be unique, got {names}")
    if cfg.model.vision.pool not in ("cls", "avg"):
        raise ConfigError(f"'model.vision.pool' must be cls or avg, got {cfg.model.vision.pool!r}")
    if cfg.optim.schedule not in ("global", "per_phase"):
        raise ConfigError(f"'optim.schedule' must be global or per_phase, got {cfg.optim.schedule!r}")
    if cfg.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"'train.precision' must be auto, fp32 or bf16, got {cfg.train.precision!r}")
    if str(cfg.scaling.use_gpu).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"'scaling.use_gpu' must be auto, true or false, got {cfg.scaling.use_gpu!r}")
    if not 1 <= cfg.scaling.min_workers <= cfg.scaling.max_workers:
        raise ConfigError(
            f"'scaling' needs 1 <= min_workers <= max_workers, got {cfg.scaling.min_workers}..{cfg.scaling.max_workers}"
        )
    if cfg.scaling.cpus_per_worker < 0 or cfg.scaling.gpus_per_worker < 0:
        raise ConfigError("'scaling.cpus_per_worker' and 'scaling.gpus_per_worker' must be >= 0 (0: the worker "
                          f"reserves none), got {cfg.scaling.cpus_per_worker} / {cfg.scaling.gpus_per_worker}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"'data.max_bad_fraction' must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.data.shuffle not in ("files", "none"):
        raise ConfigError(f"'data.shuffle' must be files or none, got {cfg.data.shuffle!r}")
    if cfg.data.missing_shards not in ("fail", "skip"):
        raise ConfigError(f"'data.missing_shards' must be fail or skip, got {cfg.data.missing_shards!r}")
    extra = cfg.scaling.resources_per_worker
    if not isinstance(extra, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in extra.values()):
        raise ConfigError(f"'scaling.resources_per_worker' must map resource names to amounts, got {extra!r}")
    if {"CPU", "GPU"} & set(extra):
        raise ConfigError("'scaling.resources_per_worker' takes custom resources; use cpus_per_worker / gpus_per_worker")


def absolute(path: str, base: str | os.PathLike | None = None) -> str:
    """Make a local path absolute (Ray workers run in other directories); URIs pass through."""
    if "://" in path or not path:
        return path
    return str((Path(base) if base else Path.cwd()).joinpath(path).resolve())
