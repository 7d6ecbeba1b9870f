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


MAX_BAD_FRACTION = 0.5  # the largest data.max_bad_fraction: the phase streams read 1 / (1 - it) times their samples


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
    tokenizer_sample_captions: int = 1_000_000  # a tokenizer trained at launch reads this many captions; 0: all
    max_bad_fraction: float = 0.01
    synth_if_missing: bool = False  # make the captioned-shapes dataset when data.train does not exist
    synth_train: int = 20000
    synth_eval: int = 1000
    read_parallelism: int = -1  # read+decode tasks in flight per phase; -1: max(4, the cluster's CPUs)
    decode_batch_size: int = 64  # the fewest rows per decode call and per block (pipeline.block_rows)
    block_mb: float = 8.0  # decoded rows per block the phase's split hands out, in MB; 0: decode_batch_size rows
    shuffle: str = "files"  # files | none: permute the shards per pass, and the rows of each read unit
    shuffle_buffer: int = -1  # rows per worker in the window shuffle; -1: 10x the phase's local batch; 0: none
    group_shards: int = 16  # shards one read task interleaves (a batch mixes rows of this many shards)
    chunk_rows: int = 64  # rows taken from each shard per round: bounds a read task's memory to group x chunk rows
    missing_shards: str = "fail"  # fail | skip: what a shard that disappears during the run does
    use_copies: bool = True  # read the smallest shrunk copy (``data shrink``) that covers a phase's image size
    decode_device: str = "cpu"  # cpu | cuda: decode JPEGs on the training GPU (nvJPEG; data/device_decode.py)


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
    pad_id: int = 0  # filled from the tokenizer by build_model; kept with the exported model
    eot_id: int = -1  # end-of-text id the tower pools at; -1: taken from the tokenizer when the model is built


@dataclass
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    init_logit_bias: float | None = None  # the sigmoid loss's bias; train.loss=siglip sets -10 (and scale log 10)
    grad_checkpointing: bool = False  # the older spelling of train.grad_checkpointing: either turns it on
    init_from: str = ""  # weights to start from: reclip-ray export, open_clip checkpoint or timm ViT (init_weights.py)


@dataclass
class PhaseConfig:
    name: str = "phase"
    image_size: int = 224
    text_length: int = 32
    samples: float = 1.0  # float <= 1: fraction of train.samples (the last one takes rounding); int: a count
    batch_size: int = 0  # 0: train.batch_size
    lr: float = 0.0  # 0: optim.lr (per-phase schedule only: refused under global)
    warmup_samples: float = -1.0  # -1: optim.warmup_samples (per-phase schedule only); 1 = one sample, 1.0 = the phase
    patch_dropout: float = 0.0  # fraction of image patch tokens dropped per training sample (FLIP); never at eval
    micro_batch_size: int = -1  # this phase's train.micro_batch_size (rows per forward/backward); -1: train's


@dataclass
class TrainConfig:
    samples: int = 20000
    batch_size: int = 256  # global batch; each of N workers takes batch_size / N
    seed: int = 0
    log_every_steps: int = 10  # >= 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    collective_timeout_s: int = 600
    loss: str = "clip"  # clip (softmax InfoNCE) | siglip (pairwise sigmoid, learnable bias; no B x B gather)
    local_loss: str = "auto"  # auto (on with > 1 worker) | true | false: each rank builds only its rows of the logits
    micro_batch_size: int = 0  # rows per forward/backward on a worker (exact accumulation); 0: the whole local batch
    compile: bool = False  # torch.compile the model (off until measured faster: BENCHMARKS.md)
    grad_checkpointing: bool = False  # recompute both towers' blocks in backward (less memory, ~1.3x compute)
    grad_reduce: str = "fp32"  # fp32 | bf16: the dtype DDP all-reduces gradients in (bf16: half the bytes; step.py)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_samples: float = 0.05  # float <= 1: fraction of the run (or phase); integer: samples (1 = one, 1.0 = all)
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
    # 0: off. Else also at the first log window this long after the attempt's start or its last checkpoint, by rank
    # 0's clock: the same wall time between checkpoints on 8 GPUs or 64, at 64 px or 224 px.
    every_minutes: float = 0.0
    num_to_keep: int = 2
    # sync: every rank waits while rank 0's checkpoint is copied to run.storage_path (Ray Train's default). async:
    # rank 0 writes it to a local temp folder, a thread copies it, training goes on; it counts as the run's latest
    # once copied (a failure before that restarts from the one before).
    upload: str = "sync"


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
    full_text_length: int = 0  # 0: the last phase's text_length
    at_gflops: list[float] = field(default_factory=list)  # also evaluate + report when training GFLOPs cross these


@dataclass
class FaultConfig:
    fail_at_samples: int = 0  # testing only: rank fail_rank raises once when this many samples have been seen
    fail_rank: int = 0
    step_delay_s: float = 0.0  # testing only: sleep per step, so a short test run is still alive during a resize
    step_delay_while: str = ""  # testing only: a local file; step_delay_s applies only while it exists ("": always)
    record_rows: bool = False  # testing only: every rank writes the keys it trains, per step, to RUN_DIR/rows/


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
        """Absolute sample count of each phase; the counts add up to ``train.samples`` exactly.

        See ``split_samples``: the last phase given as a fraction absorbs the rounding, because a run whose phases
        stop one sample short of train.samples would look aborted to the driver. The LR schedule uses these counts.
        """
        return split_samples([p.samples for p in self.phases], self.train.samples)


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


def is_fraction(value: float) -> bool:
    """The integer-vs-fraction rule for sample counts (phase ``samples``, ``warmup_samples``).

    A float <= 1 is a fraction of the run (or phase); an integer, or a float > 1 with no fractional part (YAML's
    ``1e6``), is a count of samples. So ``1`` is one sample and ``1.0`` is the whole run. The type decides because
    YAML keeps it, and a value of exactly one is the only place where the two readings collide.
    """
    return isinstance(value, float) and value <= 1.0


def resolve_count(value: float, total: int) -> int:
    """``value`` as a sample count: a fraction (see ``is_fraction``) of ``total``, rounded, or a whole count."""
    if is_fraction(value):
        return int(round(value * total))
    if value != int(value):
        raise ConfigError(f"{value!r} is neither a fraction (a float <= 1) nor a whole number of samples")
    return int(value)


def split_samples(values: list[float], total: int) -> list[int]:
    """Resolve phase sizes against ``total``; when any is a fraction, the counts sum to ``total`` exactly.

    Each fraction is rounded and the last phase given as a fraction takes what rounding left over (3 x 0.3333333
    of 1000 -> 333, 333, 334). Counts written as integers are kept as written: they are the user's exact word.
    Whether the values are close enough to ``total`` for that to be only rounding is ``validate``'s job.
    """
    counts = [resolve_count(v, total) for v in values]
    fractions = [i for i, v in enumerate(values) if is_fraction(v)]
    if fractions:
        counts[fractions[-1]] += total - sum(counts)
    return counts


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
        number = _number(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or int(number) != number:
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        return value  # keep int vs float: phase samples use the distinction
    if tp is str:
        if isinstance(value, bool) and where.endswith(("use_gpu", "local_loss")):
            return str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
        return str(value)
    return value


def _number(value: Any) -> Any:
    """A string that Python reads as a number, as that float; anything else as it is. PyYAML reads ``1e-3``, ``1e6``
    and ``4.0e8`` (no dot, or no sign in the exponent) as strings, which a YAML file and ``--set`` both hand over."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
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


def from_dict(raw: dict[str, Any], saved: bool = False) -> Config:
    """Validate a raw mapping into a ``Config`` and check the cross-field rules.

    ``saved``: the config a run wrote beside its model or checkpoint (``export``, ``openclip``): the rules added
    since it was written must not make a model unloadable, so the ones that only stop a launch from wasting its
    time (``validate``'s ``LAUNCH_CHECKS``) are skipped."""
    raw = copy.deepcopy(raw)
    raw["model"] = _resolve_model(raw.get("model"))
    _apply_loss_defaults(raw)
    cfg = _build(Config, raw, "")
    validate(cfg, launch=not saved)
    return cfg


def _apply_loss_defaults(raw: dict[str, Any]) -> None:
    """``train.loss: siglip`` starts from the SigLIP paper's temperature and bias (t' = log 10, b = -10), as open_clip's
    ``--siglip`` does; keys the user set win. On the raw mapping, where "not set" is still visible."""
    train = raw.get("train")
    if isinstance(train, dict) and train.get("loss") == "siglip":
        raw["model"].setdefault("init_logit_bias", -10.0)
        raw["model"].setdefault("init_logit_scale", math.log(10.0))


def model_config(raw_model: Any) -> ModelConfig:
    """The model a raw ``model`` entry describes (a preset name, or a mapping with an optional ``preset`` plus
    overrides; None: the default preset), with the same key checks as a whole config. For code that prices a raw
    config it is still editing: a sweep turns its GFLOPs budget into phase lengths before the config is whole."""
    return _build(ModelConfig, _resolve_model(raw_model), "model")


def full_image_size(cfg: Config) -> int:
    """The image size the final model is evaluated and exported at: ``eval.full_image_size``, else the last
    phase's (a sweep trial without its finetune keeps the finetune's)."""
    return cfg.eval.full_image_size or cfg.phases[-1].image_size


def full_text_length(cfg: Config) -> int:
    """The text length the final model is evaluated and exported at: ``eval.full_text_length``, else the last
    phase's. A sweep trial without its finetune keeps the finetune's, as it keeps its image size, so that every
    trial of the sweep is scored on the same captions, none cut shorter."""
    return cfg.eval.full_text_length or cfg.phases[-1].text_length


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, plus ``--set`` overrides, validated."""
    return from_dict(apply_overrides(load_raw(name_or_path), overrides))


def local_loss_enabled(setting: str | bool, world_size: int) -> bool:
    """``train.local_loss``: ``auto`` is on with more than one worker (what open_clip users expect), else as set.

    Local loss is exact with ``gather_with_grad=True`` (see ``reclip_ray.loss``) and needs ``world`` times less
    logits memory per rank, so ``auto`` turns it on whenever there is more than one rank to split the rows over.
    """
    value = str(setting).strip().lower()
    if value == "auto":
        return world_size > 1
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"train.local_loss must be auto, true or false, got {setting!r}")


def phase_micro_batch(cfg: Config, index: int) -> int:
    """Rows per forward/backward on a worker in phase ``index``: the phase's ``micro_batch_size``, else
    ``train.micro_batch_size`` (0: no accumulation). Per phase because a 64 px row holds ~8x less activation memory
    than a 224 px one: one value would either accumulate in the low-resolution phase where it need not, or not
    fit at full resolution (``reclip-ray plan`` prices each phase's memory)."""
    own = cfg.phases[index].micro_batch_size
    return cfg.train.micro_batch_size if own < 0 else own


def validate(cfg: Config, launch: bool = True) -> None:
    """Cross-field rules, checked before anything expensive (Ray, data) starts.

    A mistake that would fail the same way in every worker (and be retried ``run.max_failures`` times) is caught
    here as one line naming the key. Sample amounts (phase ``samples``, ``warmup_samples``) follow one rule: an
    integer is a number of samples and a float <= 1 a fraction, so ``1`` is one sample and ``1.0`` all of them;
    a float > 1 must be whole (``1e6``). Phase sizes must add up to train.samples (see ``_check_phase_total``).

    One check per section, in this order: the run's size first (every later check counts samples or batches),
    then the model (the phases' and the eval's image sizes are multiples of its patch size), the phases, and the
    sections that only look at their own keys. A new key gets its line in its section's check; the scaling check
    comes before the batch and data checks, which read ``scaling.use_gpu`` and ``max_workers`` as valid.
    """
    for check in (_check_run_size, _check_model, _check_phases, _check_optim, _check_train, _check_scaling,
                  _check_batches, _check_checkpoint, _check_eval, _check_data, _check_fault):
        check(cfg)
    if launch:
        for check in LAUNCH_CHECKS:
            check(cfg)


def _check_run_size(cfg: Config) -> None:
    if not cfg.phases:
        raise ConfigError("'phases' must list at least one phase")
    if cfg.train.samples <= 0:
        raise ConfigError(f"'train.samples' must be positive, got {cfg.train.samples}")
    if cfg.train.batch_size <= 0:
        raise ConfigError(f"'train.batch_size' must be positive, got {cfg.train.batch_size}")


def _check_phases(cfg: Config) -> None:
    """Each phase on its own, then their sizes together, then their names (the run folder and MLflow use them)."""
    for i, ph in enumerate(cfg.phases):
        _check_phase(cfg, i, ph)
    _check_phase_total(cfg)
    names = [p.name for p in cfg.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phase names must be unique, got {names}")
    _check_patch_dropout(cfg)
    for i, ph in enumerate(cfg.phases):
        if ph.micro_batch_size < -1:
            raise ConfigError(f"'phases.{i}.micro_batch_size' ({ph.name}) must be -1 (train.micro_batch_size), 0 (no "
                              f"accumulation) or a number of rows, got {ph.micro_batch_size}")


def _check_phase(cfg: Config, i: int, ph: PhaseConfig) -> None:
    where = f"phases.{i} ({ph.name})"
    patch = cfg.model.vision.patch_size
    if ph.image_size <= 0 or ph.image_size % patch:
        raise ConfigError(f"{where}: image_size {ph.image_size} is not a positive multiple of the patch size {patch}")
    if not 2 <= ph.text_length <= cfg.model.text.context_length:
        raise ConfigError(
            f"{where}: text_length {ph.text_length} must be in [2, model.text.context_length="
            f"{cfg.model.text.context_length}]"
        )
    _check_amount(ph.samples, f"phases.{i}.samples", "train.samples", allow_zero=False)
    if ph.batch_size < 0:
        raise ConfigError(f"'phases.{i}.batch_size' ({ph.name}) must be >= 0 (0: train.batch_size), "
                          f"got {ph.batch_size}")
    if ph.lr < 0:
        raise ConfigError(f"'phases.{i}.lr' ({ph.name}) must be >= 0 (0: optim.lr), got {ph.lr}")
    if ph.warmup_samples != -1:
        hint = "; -1: optim.warmup_samples"
        _check_amount(ph.warmup_samples, f"phases.{i}.warmup_samples", "the phase", hint=hint)


def _check_phase_schedule(cfg: Config) -> None:
    """A phase's own ``lr`` / ``warmup_samples`` only exist in the per-phase schedule; the global one reads
    ``optim.lr`` and ``optim.warmup_samples`` alone, so a finetune LR written under it would be trained without."""
    if cfg.optim.schedule != "global":
        return
    for i, ph in enumerate(cfg.phases):
        for key, value, default in (("lr", ph.lr, "0"), ("warmup_samples", ph.warmup_samples, "-1")):
            if value != float(default):
                raise ConfigError(
                    f"'phases.{i}.{key}' ({ph.name}) = {value!r} applies only to a per-phase schedule, and "
                    f"optim.schedule is global (one warmup and cosine over the run): set optim.schedule=per_phase, "
                    f"or phases.{i}.{key}={default} (the run's)")


def _check_eval_size(cfg: Config) -> None:
    """The launch's eval-set check refused a full size off the patch grid too, but only once a run had started."""
    size, patch = cfg.eval.full_image_size, cfg.model.vision.patch_size
    if size < 0 or size % patch:
        raise ConfigError(f"'eval.full_image_size' {size} must be 0 (the last phase's image_size) or a positive "
                          f"multiple of the patch size {patch}")


# A run's name is one folder of run.storage_path (storage.join) and its MLflow run's name. '/' and '\\' would make
# it a path (below or, with '..', outside the storage path); a URI's reader (pyarrow) decodes '%2F' to '/' and cuts
# at '?' or '#' (a run 'a?b' would share run 'a''s folder). Bytes: a folder name holds 255; a sweep adds its trials'
# '-<trial id>' to its name (MLflow keeps 250 characters of a run name).
RUN_NAME_CHARS = "/\\%?#"
MAX_RUN_NAME_BYTES = 200
TRIAL_SUFFIX_BYTES = 32  # a sweep's trial run names: '<sweep>-<Tune's trial id>', '<sweep>-best'


def check_run_name(name: str, where: str, suffix_bytes: int = 0) -> None:
    """``name`` as a run's (or a sweep's) folder name under run.storage_path; ``where`` names its key or file, and
    ``suffix_bytes`` is the room runs named after it need (a sweep's trials)."""
    most = MAX_RUN_NAME_BYTES - suffix_bytes
    if name in ("", ".", "..") or any(ch in RUN_NAME_CHARS or not ch.isprintable() for ch in name) \
            or len(name.encode()) > most:
        raise ConfigError(f"{where} {name!r} is no folder name for run.storage_path: use 1-{most} bytes, not '.' or "
                          f"'..', without {' '.join(RUN_NAME_CHARS)} or control characters")


def _check_run_name(cfg: Config) -> None:
    """The run folder's name: ``run.name``, else the config's ``name`` (``train.prepare``)."""
    if cfg.run.name:
        check_run_name(cfg.run.name, "'run.name'")
    else:
        check_run_name(cfg.name, "'name' (the run's name: run.name is empty)")


# Rules that stop a launch (or a plan) before it wastes its time, skipped for a config a run saved
# (``from_dict(saved=True)``): a model exported before a rule existed must stay loadable.
LAUNCH_CHECKS = (_check_phase_schedule, _check_eval_size, _check_run_name)


def _check_model(cfg: Config) -> None:
    _check_model_sizes(cfg)
    patch = cfg.model.vision.patch_size
    base = cfg.model.vision.base_image_size
    if base <= 0 or base % patch:
        raise ConfigError(f"'model.vision.base_image_size' = {base} (the position-embedding grid) is not a positive "
                          f"multiple of the patch size {patch}")
    if cfg.model.vision.pool not in ("cls", "avg"):
        raise ConfigError(f"'model.vision.pool' must be cls or avg, got {cfg.model.vision.pool!r}")
    _check_heads(cfg)


def _check_model_sizes(cfg: Config) -> None:
    """Every size of the model positive (the heads: ``_check_heads``): the later checks divide by the patch size,
    and a zero width or depth would fail inside every worker at build (or train a tower with no blocks)."""
    m = cfg.model
    sizes = [("embed_dim", m.embed_dim)]
    for tower in ("vision", "text"):
        t = getattr(m, tower)
        sizes += [(f"{tower}.width", t.width), (f"{tower}.depth", t.depth)]
    sizes += [("vision.patch_size", m.vision.patch_size), ("text.context_length", m.text.context_length)]
    for key, value in sizes:
        if value < 1:
            raise ConfigError(f"'model.{key}' must be positive, got {value}")
    for tower in ("vision", "text"):
        ratio = getattr(m, tower).mlp_ratio
        if not ratio > 0:  # also refuses nan
            raise ConfigError(f"'model.{tower}.mlp_ratio' must be positive, got {ratio}")


def _check_train(cfg: Config) -> None:
    _check_loss(cfg)
    t = cfg.train
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"'train.precision' must be auto, fp32 or bf16, got {t.precision!r}")
    if str(t.local_loss).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"'train.local_loss' must be auto, true or false, got {t.local_loss!r}")
    if t.grad_reduce not in ("fp32", "bf16"):
        raise ConfigError(f"'train.grad_reduce' must be fp32 or bf16, got {t.grad_reduce!r}")
    if t.micro_batch_size < 0:
        raise ConfigError(f"'train.micro_batch_size' must be a positive number of rows or 0 (no accumulation), "
                          f"got {t.micro_batch_size}")
    if t.log_every_steps < 1:
        raise ConfigError(f"'train.log_every_steps' must be >= 1, got {t.log_every_steps}")


def _check_scaling(cfg: Config) -> None:
    s = cfg.scaling
    use_gpu = str(s.use_gpu).lower()
    if use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"'scaling.use_gpu' must be auto, true or false, got {s.use_gpu!r}")
    if not 1 <= s.min_workers <= s.max_workers:
        raise ConfigError(f"'scaling' needs 1 <= min_workers <= max_workers, got {s.min_workers}..{s.max_workers}")
    if s.cpus_per_worker < 0 or s.gpus_per_worker < 0:
        raise ConfigError("'scaling.cpus_per_worker' and 'scaling.gpus_per_worker' must be >= 0 (0: the worker "
                          f"reserves none), got {s.cpus_per_worker} / {s.gpus_per_worker}")
    if s.gpus_per_worker == 0 and use_gpu != "false":
        # Ray Train refuses GPU workers without a GPU, but only once the MLflow run exists (auto: on a GPU cluster).
        raise ConfigError(f"'scaling.gpus_per_worker' = 0 leaves GPU workers without a GPU (scaling.use_gpu="
                          f"{use_gpu}); set scaling.use_gpu=false for CPU workers")
    if 0 < s.gpus_per_worker < 1 and use_gpu != "false" and s.max_workers > 1:
        # Ray would place two ranks on one GPU, and NCCL refuses a communicator with two ranks on one device
        # ("Duplicate GPU detected"), at the first collective: after the MLflow run and the data are set up.
        raise ConfigError(f"'scaling.gpus_per_worker' = {s.gpus_per_worker:g} lets ranks share a GPU, which NCCL "
                          f"refuses (scaling.use_gpu={use_gpu}, max_workers={s.max_workers}); use whole GPUs, or one "
                          "worker")
    extra = s.resources_per_worker
    if not isinstance(extra, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in extra.values()):
        raise ConfigError(f"'scaling.resources_per_worker' must map resource names to amounts, got {extra!r}")
    if {"CPU", "GPU"} & set(extra):
        raise ConfigError("'scaling.resources_per_worker' takes custom resources; use cpus_per_worker / gpus_per_worker")


def _check_checkpoint(cfg: Config) -> None:
    if cfg.checkpoint.every_samples < 0:
        raise ConfigError(f"'checkpoint.every_samples' must be >= 0 (0: only at phase ends), "
                          f"got {cfg.checkpoint.every_samples}")
    if not cfg.checkpoint.every_minutes >= 0:  # also refuses nan
        raise ConfigError(f"'checkpoint.every_minutes' must be >= 0 (0: off), got {cfg.checkpoint.every_minutes}")
    if cfg.checkpoint.upload not in ("sync", "async"):
        raise ConfigError(f"'checkpoint.upload' must be sync or async, got {cfg.checkpoint.upload!r}")
    if cfg.checkpoint.num_to_keep < 1:
        raise ConfigError(f"'checkpoint.num_to_keep' must be >= 1, got {cfg.checkpoint.num_to_keep}")


def _check_eval(cfg: Config) -> None:
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"'eval.batch_size' must be >= 1, got {cfg.eval.batch_size}")
    if cfg.eval.full_text_length and not 2 <= cfg.eval.full_text_length <= cfg.model.text.context_length:
        raise ConfigError(f"'eval.full_text_length' {cfg.eval.full_text_length} must be 0 (the last phase's) or in "
                          f"[2, model.text.context_length={cfg.model.text.context_length}]")
    if any(not isinstance(g, (int, float)) or g <= 0 for g in cfg.eval.at_gflops):
        raise ConfigError(f"'eval.at_gflops' must be a list of positive GFLOPs, got {cfg.eval.at_gflops!r}")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if not 0.0 <= d.max_bad_fraction <= MAX_BAD_FRACTION:
        raise ConfigError(f"'data.max_bad_fraction' must be in [0, {MAX_BAD_FRACTION}], got "
                          f"{d.max_bad_fraction}: the phase streams read 1 / (1 - max_bad_fraction) times the "
                          "rows they train, and a set with more bad rows than good ones needs cleaning "
                          "(reclip-ray data inspect)")
    if d.shuffle not in ("files", "none"):
        raise ConfigError(f"'data.shuffle' must be files or none, got {d.shuffle!r}")
    if d.shuffle_buffer < -1:
        raise ConfigError(f"'data.shuffle_buffer' must be -1 (10x the local batch), 0 (off) or a row count, "
                          f"got {d.shuffle_buffer}")
    if d.decode_batch_size < 1 or d.block_mb < 0:
        raise ConfigError(f"'data.decode_batch_size' must be >= 1 and 'data.block_mb' >= 0, got {d.decode_batch_size} "
                          f"and {d.block_mb:g}")
    if d.group_shards < 1 or d.chunk_rows < 1:
        raise ConfigError(f"'data.group_shards' and 'data.chunk_rows' must be >= 1, got {d.group_shards} "
                          f"and {d.chunk_rows}")
    if d.missing_shards not in ("fail", "skip"):
        raise ConfigError(f"'data.missing_shards' must be fail or skip, got {d.missing_shards!r}")
    if d.decode_device not in ("cpu", "cuda"):
        raise ConfigError(f"'data.decode_device' must be cpu or cuda, got {d.decode_device!r}")
    if d.decode_device == "cuda" and str(cfg.scaling.use_gpu).lower() == "false":
        raise ConfigError("'data.decode_device=cuda' decodes on the training GPUs, but scaling.use_gpu=false")
    if d.tokenizer_sample_captions < 0:
        raise ConfigError(f"'data.tokenizer_sample_captions' must be a number of captions, or 0 for all of them, "
                          f"got {d.tokenizer_sample_captions}")


def _check_fault(cfg: Config) -> None:
    """The test hooks: a file that gates the step delay is a local path each rank stats every step, and gates
    nothing without a delay (a test that sets only the file would wait on a run that never slows down)."""
    f = cfg.fault
    if f.step_delay_s < 0:
        raise ConfigError(f"'fault.step_delay_s' must be >= 0, got {f.step_delay_s}")
    if f.step_delay_while and "://" in f.step_delay_while:
        raise ConfigError(f"'fault.step_delay_while' must be a local file path (each rank checks it every step), "
                          f"got {f.step_delay_while!r}")
    if f.step_delay_while and not f.step_delay_s:
        raise ConfigError("'fault.step_delay_while' gates fault.step_delay_s, which is 0: set both")


def _check_amount(value: float, key: str, whole: str, *, allow_zero: bool = True, hint: str = "") -> None:
    """One sample-count key against the integer-vs-fraction rule of ``is_fraction``, naming the key on failure.

    ``1.5`` is rejected rather than truncated: it is either a typo for a fraction or a count, and guessing wrong
    changes a phase or a warmup by orders of magnitude.
    """
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else 'positive'}{hint}, got {value!r}")
    if not is_fraction(value) and value != int(value):
        raise ConfigError(
            f"'{key}' = {value!r} is neither a count nor a fraction: write an integer for a number of samples "
            f"(1 means one sample) or a float <= 1 for a fraction of {whole} (1.0 means all of it){hint}"
        )


def _check_phase_total(cfg: Config) -> None:
    """Phase sizes must add up to train.samples: exactly for counts, up to rounding when fractions are used.

    The slack is one sample, or a millionth of the run, per fraction (``0.3333333`` has only seven digits); the
    rounding itself is then absorbed by ``split_samples`` so the run ends exactly at train.samples.
    """
    total = cfg.train.samples
    values = [p.samples for p in cfg.phases]
    n_fractions = sum(1 for v in values if is_fraction(v))
    nominal = sum(v * total if is_fraction(v) else v for v in values)
    if abs(nominal - total) > n_fractions * max(1.0, total * 1e-6):
        desc = " + ".join(str(v) for v in values)
        shown = round(nominal, 2) if n_fractions else int(nominal)
        raise ConfigError(f"phase samples ({desc} -> {shown}) do not add up to train.samples={total}")
    for i, (ph, n) in enumerate(zip(cfg.phases, split_samples(values, total))):
        if n <= 0:
            raise ConfigError(f"'phases.{i}.samples' ({ph.name}) leaves the phase {n} of train.samples={total}")


def _check_patch_dropout(cfg: Config) -> None:
    """A drop rate of 1 (or more) would leave no patch; timm's module asserts, so it fails here as one line."""
    for i, ph in enumerate(cfg.phases):
        p = ph.patch_dropout
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"'phases.{i}.patch_dropout' ({ph.name}) must be in [0, 1) (the fraction of image "
                              f"patch tokens dropped in training), got {p!r}")


def _check_batches(cfg: Config) -> None:
    """Every step must give each of up to max_workers workers at least one sample: every global batch, and every
    phase (its short last step joins the full one before it when it is smaller, ``schedule.PhasePlan.batch_at``,
    but a phase of one short step has none to join)."""
    workers = cfg.scaling.max_workers
    batches = [("train.batch_size", cfg.train.batch_size)]
    batches += [(f"phases.{i}.batch_size", p.batch_size) for i, p in enumerate(cfg.phases) if p.batch_size]
    for key, batch in batches:
        if batch < workers:
            raise ConfigError(f"'{key}' = {batch} (a global batch) is smaller than scaling.max_workers={workers}; "
                              "each worker needs at least one sample per step")
    for i, (ph, n) in enumerate(zip(cfg.phases, cfg.phase_samples())):
        if n < workers:
            raise ConfigError(f"'phases.{i}.samples' ({ph.name}) gives the phase {n} samples, fewer than "
                              f"scaling.max_workers={workers}; each worker needs at least one sample per step")


def _check_heads(cfg: Config) -> None:
    """Attention splits the width evenly across heads; otherwise the model fails inside every worker at build."""
    for tower in ("vision", "text"):
        t = getattr(cfg.model, tower)
        if t.heads < 1 or t.width < 1 or t.width % t.heads:
            raise ConfigError(f"'model.{tower}.heads' = {t.heads} does not divide model.{tower}.width = {t.width}")


def _check_optim(cfg: Config) -> None:
    """Optimiser values that no run can use: found here instead of as a NaN or an exception in the workers."""
    o = cfg.optim
    if o.schedule not in ("global", "per_phase"):
        raise ConfigError(f"'optim.schedule' must be global or per_phase, got {o.schedule!r}")
    if o.lr <= 0:
        raise ConfigError(f"'optim.lr' must be positive, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError(f"'optim.weight_decay' must be >= 0, got {o.weight_decay}")
    if o.grad_clip < 0:
        raise ConfigError(f"'optim.grad_clip' must be >= 0 (0: no clipping), got {o.grad_clip}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"'optim.min_lr_ratio' must be in [0, 1], got {o.min_lr_ratio}")
    whole = "the run (of each phase with optim.schedule=per_phase)"
    _check_amount(o.warmup_samples, "optim.warmup_samples", whole)


def _check_loss(cfg: Config) -> None:
    """``train.loss`` and the model's logit bias go together: the sigmoid loss trains it, the CLIP loss has none
    (an unused parameter would also stop DDP)."""
    loss, bias = cfg.train.loss, cfg.model.init_logit_bias
    if loss not in ("clip", "siglip"):
        raise ConfigError(f"'train.loss' must be clip or siglip, got {loss!r}")
    if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float))):
        raise ConfigError(f"'model.init_logit_bias' must be a number, got {bias!r}")
    if loss == "siglip" and bias is None:
        raise ConfigError("'train.loss=siglip' needs 'model.init_logit_bias' (leave it unset for the paper's -10)")
    if loss == "clip" and bias is not None:
        raise ConfigError(f"'model.init_logit_bias' ({bias}) is the sigmoid loss's bias; set train.loss=siglip or "
                          "remove it")


def absolute(path: str, base: str | os.PathLike | None = None) -> str:
    """Make a local path absolute (Ray workers run in other directories; ``~`` is the user's home, which no shell
    expands inside ``--set key=~/x``); a ``file://`` URI becomes the plain path it names (the launch looks at local
    paths with ``os.path``, to which ``file:///d/train`` is missing: a preset with ``data.synth_if_missing`` wrote
    synthetic shards over the dataset there); other URIs (``s3://b/x``) pass through exactly as given."""
    if path.startswith("file://"):
        path = path[len("file://"):] or "/"
    if "://" in path or not path:
        return path
    return str((Path(base) if base else Path.cwd()).joinpath(os.path.expanduser(path)).resolve())
