"""The exported inference model: a folder that opens without Ray, written atomically.

``model.safetensors`` (weights; no pickle, so loading runs no code), ``config.yaml`` (the full run config with
``model.text.vocab_size``, ``eot_id`` and ``pad_id`` filled in from the tokenizer) and ``tokenizer.json``. A legacy
``model.pt`` is accepted only through ``torch.load(weights_only=True)``, which refuses pickles that would construct
arbitrary objects or call functions.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from reclip_ray import storage
from reclip_ray.config import Config, ConfigError, from_dict
from reclip_ray.errors import CheckpointError
from reclip_ray.folders import local_copy, write_folder_atomic

WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def export_model(model: torch.nn.Module, tokenizer: Any, config: Config, out_dir: str | os.PathLike, *,
                 format: str = "reclip", image_size: int | None = None) -> Path | str:
    """Write model + config + tokenizer to ``out_dir`` (replacing an earlier export there, and refusing a folder
    that holds anything else: ``folders.check_replaceable``); returns the path (a ``Path`` for a
    local folder, the URI string for a remote one: ``s3://bucket/models/x``).

    Everything is written into a sibling temp folder that is renamed into place at the end, so a crash never
    leaves a folder that looks like an export but holds half a model (on an object store, see
    ``folders.write_folder_atomic``). ``format="open_clip"`` writes an open_clip
    ``local-dir:`` folder instead, fixed at ``image_size`` (default: the run's full resolution); see
    ``reclip_ray.openclip.export_open_clip``.
    """
    if format == "open_clip":
        from reclip_ray.openclip import export_open_clip

        return export_open_clip(model, tokenizer, config, out_dir, image_size=image_size)
    if format != "reclip":
        raise ValueError(f"export format must be reclip or open_clip, got {format!r}")
    from safetensors.torch import save_file

    model = _unwrap(model)
    cfg = copy.deepcopy(config)
    cfg.model = copy.deepcopy(getattr(model, "cfg", cfg.model))  # the model's own config has vocab_size filled
    # Shared tensors (tied weights) cannot be saved as aliases; independent contiguous copies load back fine.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(cfg.to_yaml())
        (tmp / TOKENIZER).write_text(tokenizer.to_json())

    return write_folder_atomic(out_dir, write, replaces=(WEIGHTS, LEGACY_WEIGHTS, CONFIG, TOKENIZER))


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, Config) from an exported folder, local or a URI (downloaded first)."""
    try:
        with local_copy(path) as local:
            return _load_export_dir(Path(local), str(path), device)
    except FileNotFoundError:
        raise CheckpointError(f"exported model not found: {path}") from None


def _load_export_dir(root: Path, shown: str, device: str | torch.device):
    """``load_export`` of a local folder; errors name ``shown`` (the path the user gave, maybe a URI)."""
    from reclip_ray.model import build_model

    if not root.is_dir():
        raise CheckpointError(f"exported model not found: {shown} is not a directory")
    for name in (CONFIG, TOKENIZER):
        if not (root / name).is_file():
            raise CheckpointError(f"{shown}: missing {name} (not an exported reclip-ray model)")
    try:
        cfg = from_dict(yaml.safe_load((root / CONFIG).read_text()) or {}, saved=True)
    except (ConfigError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{storage.join(shown, CONFIG)}: {str(exc).splitlines()[0]}") from None
    tokenizer = _matching_tokenizer(root, cfg)
    state = load_state(root)
    text = cfg.model.text
    # The saved ids win; an export from before eot_id was saved (-1) takes it from its tokenizer.
    model = build_model(cfg.model, tokenizer=tokenizer, vocab_size=text.vocab_size or None,
                        eot_id=text.eot_id if text.eot_id >= 0 else None, pad_id=text.pad_id)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{shown}: weights do not match config.yaml: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer, cfg


def _matching_tokenizer(root: Path, cfg: Config):
    """The export's tokenizer with its pad / end tokens pinned to the ids saved in config.yaml.

    The model pools at the saved ``eot_id``; if the tokenizer were left to find its special tokens by name (a
    training run may have named them explicitly) it could write a different end token and every text feature
    would be pooled at the wrong position. Exports from before the ids were saved (``eot_id`` -1) find them by name.
    """
    from reclip_ray.data.tokenizer import load_tokenizer

    text = cfg.model.text
    if text.eot_id < 0:
        return load_tokenizer(root / TOKENIZER)
    return load_tokenizer(root / TOKENIZER, pad=text.pad_id, eot=text.eot_id)  # DataError names a missing id


def load_state(root: Path) -> dict[str, torch.Tensor]:
    """The weights of a local export folder (``model.safetensors``, else a legacy ``model.pt`` read with
    ``weights_only``); also what ``init_weights`` reads from a reclip-ray export."""
    if (root / WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(root / WEIGHTS))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{root / WEIGHTS}: unreadable safetensors file ({exc})") from None
    if (root / LEGACY_WEIGHTS).is_file():
        import pickle

        try:
            state = torch.load(root / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{root / LEGACY_WEIGHTS}: refused to load (weights_only): {first}") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{root / LEGACY_WEIGHTS}: not a state dict of tensors")
        return state
    raise CheckpointError(f"{root}: no {WEIGHTS} or {LEGACY_WEIGHTS}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(CLIP in eval mode, CaptionTokenizer) from an exported folder (local or a URI); no Ray needed."""
    model, tokenizer, _ = load_export(path, device)
    return model, tokenizer
