"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory (Ray Train persists and rotates it): ``state.pt`` holds tensors only and is loaded
with ``weights_only=True`` so a checkpoint can never run code; ``meta.json`` holds the schedule position and
bookkeeping and is written last, so a directory without it is an interrupted save and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import Any

import torch

from reclip_ray.errors import CheckpointError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"


class CheckpointClock:
    """``checkpoint.every_minutes``: whether that long has passed since the attempt started or last checkpointed.

    Only rank 0's clock counts (``Worker.log_window`` shares its answer with every rank), so all ranks checkpoint
    at the same step. A wall-time interval is what a run on 64 GPUs needs as much as one on 8: a sample-count
    interval that gives a checkpoint every 7 minutes on 8 GPUs gives one every 50 s on 64, and phases whose
    samples cost ~10x apart (64 px, 224 px) get intervals ~10x apart."""

    def __init__(self, minutes: float) -> None:
        self.interval_s = 60.0 * minutes
        self.start()

    def start(self) -> None:
        self.t0 = monotonic()

    def due(self) -> bool:
        return self.interval_s > 0 and monotonic() - self.t0 >= self.interval_s


@dataclass
class TrainState:
    """Position in the run. Keyed by samples seen, so a resize to another worker count changes nothing."""

    samples: int = 0
    step: int = 0
    phase: int = 0
    phase_done: bool = False  # the phase at index ``phase`` has finished (its end checkpoint)
    restarts: int = 0
    mlflow_run_id: str = ""
    rows_seen: int = 0  # rows trained or dropped as bad, settled at checkpoints (exact across restarts)
    rows_bad: int = 0
    rows_absent: int = 0  # not samples (failed downloads): never counted as bad
    data: dict[str, Any] = field(default_factory=dict)  # feed.DataPosition of the phase in progress
    gflops: float = 0.0
    eval: dict[str, float] = field(default_factory=dict)
    loss: float | None = None  # the last step's: what an attempt restarted at the run's last checkpoint reports


def phase_finished(index: int, phase: int, phase_done: bool) -> bool:
    """Whether a run at ``phase`` (its end checkpoint written when ``phase_done``) has trained phase ``index``."""
    return phase > index or (phase == index and bool(phase_done))


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config_yaml: str,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # No RNG state: each start seeds every rank from train.seed, the restart count and the rank (Worker), so an attempt
    # after a failure draws other patch-dropout masks than the one that failed; rank 0's state, the only one a
    # checkpoint could hold, would be the wrong state for every other rank.
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    _atomic_torch_save(payload, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(config_yaml)
    _atomic_write_text(directory / META_FILE, json.dumps(dataclasses.asdict(state), indent=2))
    return directory


def read_state(directory: str | Path, source: str | None = None) -> TrainState:
    meta = Path(directory) / META_FILE
    if not meta.is_file():
        raise CheckpointError(f"{source or directory}: no {META_FILE}; the checkpoint is incomplete "
                              "(interrupted save?)")
    raw = json.loads(meta.read_text())
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in raw.items() if k in known})


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    source: str | None = None,
    config: Any = None,
) -> TrainState:
    """Restore model (and optimizer) in place and return the run position. ``source`` is where the checkpoint
    lives when ``directory`` is a local copy of it (a URI): errors name it, since the copy is gone by the time the
    user reads them. ``config``, this launch's: a checkpoint whose tensors do not fit its model is a
    ``CheckpointError`` that names the model keys that changed (deterministic: the run is not retried).

    Read to host memory, whatever the model's device: ``load_state_dict`` copies the weights and the optimizer's
    moments to their parameters' device, but leaves AdamW's step counters where they were loaded. Loaded onto a
    GPU, they stay there, and AdamW (neither fused nor capturable) reads each one back to the host twice a step:
    two waits for the GPU per parameter tensor, every step of a resumed run."""
    directory = Path(directory)
    shown = source.rstrip("/") if source else str(directory)
    state = read_state(directory, shown)
    try:
        payload = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{shown}: missing {STATE_FILE}") from None
    except Exception as exc:  # weights_only refuses pickled code: surface it as a checkpoint problem
        from reclip_ray import storage

        raise CheckpointError(
            f"{storage.join(shown, STATE_FILE)}: refused to load ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(payload["model"])
        if optimizer is not None:
            load_optimizer(optimizer, payload["optimizer"])
    except (RuntimeError, ValueError) as exc:
        if not _does_not_fit(exc):  # a CUDA error or an out-of-memory is not the checkpoint's: Ray Train retries
            raise
        raise CheckpointError(_mismatch_message(directory, shown, exc, config)) from None
    return state  # a checkpoint from before 2026-12 also holds rank 0's RNG state ("rng"): not used (save_checkpoint)


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved moments and step counts, under this launch's hyperparameters.

    ``Optimizer.load_state_dict`` also puts back every saved group setting: a relaunch with another
    ``optim.weight_decay``, ``betas`` or ``eps`` would train on with the first launch's values while its config (and
    every later checkpoint's ``config.yaml``) said otherwise. The LR is set at every step anyway; the others are
    taken from the optimizer this launch built, as the config says."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)


def _does_not_fit(exc: Exception) -> bool:
    """torch's words for tensors or parameter groups that do not match the model or optimizer being loaded."""
    text = str(exc)
    if isinstance(exc, ValueError):  # Optimizer.load_state_dict: other groups, or other parameter counts in them
        return "parameter group" in text
    return text.startswith("Error(s) in loading state_dict")


def _mismatch_message(directory: Path, shown: str, exc: Exception, config: Any) -> str:
    """One line for a checkpoint whose tensors do not fit this launch's model: the model keys that differ from the
    checkpoint's ``config.yaml`` (and ``train.loss``: SigLIP adds a bias) with the ``--set`` to rerun with, else
    the first line of torch's error."""
    changed = []
    if config is not None:
        try:
            import yaml

            from reclip_ray.config import from_dict

            saved = from_dict(yaml.safe_load((directory / CONFIG_FILE).read_text()), saved=True)
            changed = _model_keys_changed(saved, config)
        except Exception:  # noqa: BLE001 - no readable config.yaml: torch's own words below
            changed = []
    if not changed:
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{shown}: the checkpoint does not fit this launch's model ({type(exc).__name__}: {first})"
    was = ", ".join(f"{key}={old}" for key, old, _ in changed)
    now = ", ".join(f"{key}={new}" for key, _, new in changed)
    rerun = " ".join(f"--set {key}={old}" for key, old, _ in changed)
    return (f"{shown} was made with {was}, this launch has {now}: its weights do not fit; rerun with {rerun} "
            f"(or a new run.name)")


def _model_keys_changed(saved: Any, now: Any) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this launch's) for the keys that shape the weights: the model's sizes (not its
    name, its start values or where it starts from) and ``train.loss``."""
    from reclip_ray.tracking import flatten

    skip = {f"model.{key}" for key in ("name", "init_from", "grad_checkpointing", "init_logit_scale",
                                         "init_logit_bias", "max_logit_scale")}

    def flat(cfg: Any) -> dict[str, Any]:
        model = {k: v for k, v in flatten(dataclasses.asdict(cfg.model), "model.").items() if k not in skip}
        return {"train.loss": cfg.train.loss, **model}

    old, new = flat(saved), flat(now)
    return [(key, old[key], new[key]) for key in new if key in old and old[key] != new[key]]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
