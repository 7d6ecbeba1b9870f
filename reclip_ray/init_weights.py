"""``model.init_from``: start a run from existing weights instead of a random initialisation.

Accepted sources, told apart by their keys (not by file names, which users rename):

- a reclip-ray export folder (``config.yaml`` + ``model.safetensors`` / ``model.pt``) or a state dict saved from
  a reclip-ray model;
- an open_clip checkpoint: a ``local-dir:`` folder (``open_clip_config.json`` + weights) or a file (``.safetensors``,
  ``.bin``, ``.pt``, ``.pth``; a ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are accepted);
- a timm ViT state dict (``cls_token``, ``pos_embed``, ``patch_embed``, ``blocks.*``): the image tower only.

Whatever fits is loaded: position embeddings are resampled to the model's grid (bicubic, antialiased: timm's
function, the one the forward pass uses), a longer text context is cut to the model's, and tensors whose shapes
still differ (another vocabulary, another width) are skipped. One line reports what was loaded, missing,
unexpected and resized, because a silent partial load is the bug that costs a whole run. Pickles are read with
``torch.load(weights_only=True)`` only. A resumed run never gets here: the checkpoint wins (see train/worker.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reclip_ray.config import ConfigError
from reclip_ray.errors import CheckpointError, ReclipError

KEY = "model.init_from"


def check_init_from(path: str) -> str:
    """The absolute path (or the URI) of ``model.init_from``; a one-line ConfigError naming the key when it does
    not exist."""
    from reclip_ray import storage
    from reclip_ray.config import absolute

    if not path:
        return path
    full = absolute(path)
    try:
        found = storage.exists(full)
    except ReclipError as exc:  # an unknown scheme, no credentials
        raise ConfigError(f"'{KEY}': {exc}") from None
    if not found:
        raise ConfigError(f"'{KEY}' not found: {full} (a reclip-ray export, an open_clip checkpoint or a timm ViT "
                          "state dict)")
    return full


def read_state(path: str | os.PathLike, *, pool: str = "cls") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in reclip-ray names, source kind) from any accepted source; shapes are the checkpoint's.

    ``pool`` is the target model's image pooling: it decides which timm norm open_clip's ``ln_post`` becomes.
    A URI (file or folder) is copied to this process's scratch folder first (in a run, rank 0 alone reads it:
    ``init_from_rank0``).
    """
    from reclip_ray.folders import local_copy

    try:
        with local_copy(path) as local:
            raw = _read_any(Path(local))
    except FileNotFoundError:
        raise CheckpointError(f"{KEY}: not found: {path}") from None
    root = str(path)
    kind = detect_kind(raw)
    if kind == "reclip-ray":
        return raw, kind
    if kind == "open_clip":
        from reclip_ray.openclip import from_open_clip_state

        converted, unused = from_open_clip_state(raw, pool=pool)
        for key in unused:  # kept, so that the report counts them as unexpected
            converted.setdefault(f"<open_clip>.{key}", raw[key])
        return converted, kind
    if kind == "timm":
        from reclip_ray.openclip import timm_vit_to_reclip

        return timm_vit_to_reclip(raw), kind
    if kind == "open_clip (timm trunk)":
        from reclip_ray.openclip import timm_vit_to_reclip

        trunk = {k[len("visual.trunk."):]: v for k, v in raw.items() if k.startswith("visual.trunk.")}
        out = timm_vit_to_reclip(trunk)
        for key, value in raw.items():
            if not key.startswith("visual.trunk."):
                out[f"<open_clip>.{key}"] = value
        return out, kind
    sample = ", ".join(list(raw)[:4])
    raise CheckpointError(f"{KEY}: {root} holds no reclip-ray, open_clip or timm ViT weights (keys: {sample}, ...)")


def detect_kind(state: dict[str, torch.Tensor]) -> str:
    """Which layout a state dict is in, from the names only reclip-ray, open_clip or timm use."""
    keys = set(state)
    if any(k.startswith(("visual.blocks.", "text.blocks.")) for k in keys) or "image_projection.weight" in keys:
        return "reclip-ray"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip (timm trunk)"
    if keys & {"visual.conv1.weight", "visual.class_embedding", "token_embedding.weight", "text_projection"}:
        return "open_clip"
    if any(k.startswith("transformer.resblocks.") for k in keys):
        return "open_clip"
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm"
    return "unknown"


def _read_any(root: Path) -> dict[str, torch.Tensor]:
    if root.is_dir():
        if (root / "config.yaml").is_file():
            from reclip_ray.export import load_state

            return load_state(root)
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                     "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.pt", "model.pth"):
            if (root / name).is_file():
                return _read_file(root / name)
        raise CheckpointError(f"{KEY}: {root} is a folder without weights (no config.yaml + model.safetensors, "
                              "no open_clip_model.safetensors)")
    return _read_file(root)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{KEY}: {path}: unreadable safetensors file ({exc})") from None
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{KEY}: {path}: refused to load (weights_only): {first}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{KEY}: {path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _fit(key: str, tensor: torch.Tensor, target: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor | None, str]:
    """``tensor`` shaped for the model's ``key`` (None if it cannot be), and a note when it was resized."""
    if tensor.shape == target.shape:
        return tensor, ""
    if key == "visual.pos_embed" and tensor.ndim == 3 and tensor.shape[-1] == target.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        prefix = model.visual.num_prefix_tokens
        old = tensor.shape[1] - prefix
        g_old = int(round(old ** 0.5))
        if g_old * g_old != old:
            return None, ""
        grid = tuple(model.visual.patch_embed.grid_size)
        resized = resample_abs_pos_embed(tensor.float(), new_size=grid, old_size=(g_old, g_old),
                                         num_prefix_tokens=prefix)
        return resized, f"visual.pos_embed {g_old}x{g_old}->{grid[0]}x{grid[1]}"
    if key == "text.positional_embedding" and tensor.ndim == 2 and tensor.shape[1] == target.shape[1]:
        n = min(tensor.shape[0], target.shape[0])
        out = target.detach().clone()
        out[:n] = tensor[:n]
        return out, f"text.positional_embedding {tensor.shape[0]}->{target.shape[0]}"
    return None, ""


def _summary(keys: list[str]) -> str:
    """A few names, or counts per top-level part ('40 (text: 38, text_projection: 1, logit_scale: 1)'), so the
    report stays one line."""
    if len(keys) <= 3:
        return f"{len(keys)}" + (f" ({', '.join(keys)})" if keys else "")
    counts: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        counts[head] = counts.get(head, 0) + 1
    return f"{len(keys)} ({', '.join(f'{name}: {n}' for name, n in counts.items())})"


def init_from_rank0(model: nn.Module, path: str | os.PathLike, rank: int) -> str | None:
    """``init_from`` on rank 0 of a run; the report line there, None on the other ranks, which read nothing.

    The run's DDP wrap (``Worker._wrap_ddp``, DDP's ``init_sync``) broadcasts rank 0's parameters and buffers to
    every rank, so the others need not each read the weights: a 64-GPU run read (and copied from s3://) a 1.7 GB
    vit-l-16 file 64 times. A wrap that does not broadcast (FSDP's default) would leave them untrained: it must not
    come without another way to sync. A failure here ends rank 0's attempt, and Ray Train stops the group."""
    return init_from(model, path) if rank == 0 else None


def init_from(model: nn.Module, path: str | os.PathLike) -> str:
    """Load what fits of ``path`` into ``model`` (in place) and return the one-line report.

    Raises CheckpointError when nothing at all fits (the wrong file, or another architecture), since a run that
    silently trains from scratch after asking for weights is worse than one that does not start.
    """
    core = getattr(model, "module", model)
    state, kind = read_state(path, pool=core.cfg.vision.pool)
    target = core.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    resized: list[str] = []
    unexpected = [k for k in state if k not in target]
    for key, tensor in state.items():
        if key not in target:
            continue
        fitted, note = _fit(key, tensor, target[key], core)
        if fitted is None:
            skipped.append(f"{key} {list(tensor.shape)} vs {list(target[key].shape)}")
            continue
        loaded[key] = fitted.to(dtype=target[key].dtype)
        if note:
            resized.append(note)
    if not loaded:
        raise CheckpointError(f"{KEY}: nothing in {path} ({kind}) fits this model: {len(skipped)} tensors of other "
                              f"shapes, {len(unexpected)} with other names")
    missing = [k for k in target if k not in loaded and k not in {s.split(" ")[0] for s in skipped}]
    result = core.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    line = (f"init_from {path} ({kind}): loaded {len(loaded)}/{len(target)} tensors; missing {_summary(missing)}; "
            f"unexpected {_summary(unexpected)}")
    if resized:
        line += f"; resized {', '.join(resized)}"
    if skipped:
        shown = "; ".join(skipped[:3]) + (f"; +{len(skipped) - 3} more" if len(skipped) > 3 else "")
        line += f"; skipped (shape) {len(skipped)}: {shown}"
    return line
