"""Speak open_clip: the weight mapping between reclip-ray's CLIP and open_clip's, the export, and loading it back.

reclip-ray's image tower is a timm ``VisionTransformer`` (so one set of weights runs at every RECLIP resolution);
open_clip's is its own ``VisionTransformer``. The two compute the same function once a few layout differences are
handled, all of them in ``rename`` and ``to_open_clip_state`` / ``from_open_clip_state`` below:

- names: timm's ``blocks.i.norm1 / attn.qkv / attn.proj / mlp.fc1`` are open_clip's ``transformer.resblocks.i.ln_1
  / attn.in_proj_* / attn.out_proj / mlp.c_fc`` (both fuse q, k, v in that order into one matrix, so the fused
  weight is copied as it is); ``norm_pre`` is ``ln_pre``; the final norm is ``ln_post`` (timm's ``norm`` with class
  token pooling, ``fc_norm`` with average pooling, which open_clip expresses as ``final_ln_after_pool``);
- shapes: ``cls_token`` [1, 1, C] is ``class_embedding`` [C], ``pos_embed`` [1, N, C] is ``positional_embedding``
  [N, C]; our projections are ``nn.Linear`` weights [E, C], open_clip's are parameters [C, E] (transposed);
- position grid: we store the embeddings on ``vision.base_image_size``'s grid and resample them on the fly; open_clip
  has one fixed size, so the export resamples them once to its image size with timm's own function (the very
  tensor our forward pass would use at that size);
- patch-embed bias: ours has none (CLIP's pre-norm layout); a timm checkpoint with one (``init_from``) has it folded
  into the patch positions' embeddings, which is exact (both are added to every patch token);
- norms: timm's LayerNorm eps is 1e-6, open_clip's default 1e-5: the config carries ``norm_kwargs``;
- text: causal attention, pooled at the first end-of-text token (``pool_type`` ``argmax`` when the end token is the
  largest id, as with CLIP's BPE, else ``eos`` with ``eos_id``); our final LayerNorm runs after pooling and
  open_clip's before, which is the same function because LayerNorm acts on each position alone. open_clip's
  ``encode_text`` wants exactly ``context_length`` tokens; with a causal mask, padding after the end token changes
  nothing, so a shorter phase's tokens padded to the context give the same features (``OpenClipModel`` pads).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reclip_ray.config import full_image_size, full_text_length
from reclip_ray.errors import CheckpointError, ReclipError

if TYPE_CHECKING:
    from reclip_ray.data.images import EvalResize

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TOKENIZER = "tokenizer.json"
README = "README.md"
INSTALL_HINT = "pip install 'reclip-ray[openclip]' (or: pip install open_clip_torch)"

# --------------------------------------------------------------------------------------------------- the mapping

# (reclip-ray name, open_clip name); "{i}" is a block index. Same tensors, same layout: only the names differ.
_RENAMES: tuple[tuple[str, str], ...] = (
    ("visual.patch_embed.proj.weight", "visual.conv1.weight"),
    ("visual.norm_pre.{p}", "visual.ln_pre.{p}"),
    ("visual.blocks.{i}.norm1.{p}", "visual.transformer.resblocks.{i}.ln_1.{p}"),
    ("visual.blocks.{i}.attn.qkv.{p}", "visual.transformer.resblocks.{i}.attn.in_proj_{p}"),
    ("visual.blocks.{i}.attn.proj.{p}", "visual.transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("visual.blocks.{i}.norm2.{p}", "visual.transformer.resblocks.{i}.ln_2.{p}"),
    ("visual.blocks.{i}.mlp.fc1.{p}", "visual.transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("visual.blocks.{i}.mlp.fc2.{p}", "visual.transformer.resblocks.{i}.mlp.c_proj.{p}"),
    ("visual.norm.{p}", "visual.ln_post.{p}"),  # class-token pooling
    ("visual.fc_norm.{p}", "visual.ln_post.{p}"),  # average pooling (final_ln_after_pool)
    ("text.token_embedding.weight", "token_embedding.weight"),
    ("text.positional_embedding", "positional_embedding"),
    ("text.blocks.{i}.ln_1.{p}", "transformer.resblocks.{i}.ln_1.{p}"),
    ("text.blocks.{i}.attn.qkv.{p}", "transformer.resblocks.{i}.attn.in_proj_{p}"),
    ("text.blocks.{i}.attn.proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("text.blocks.{i}.ln_2.{p}", "transformer.resblocks.{i}.ln_2.{p}"),
    ("text.blocks.{i}.mlp.0.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("text.blocks.{i}.mlp.2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}"),
    ("text.ln_final.{p}", "ln_final.{p}"),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),  # the sigmoid loss's (train.loss: siglip); open_clip's CLIP has it too
)
# (reclip-ray name, open_clip name): same values, different shapes (reshaped or transposed by _reshape).
_RESHAPED: tuple[tuple[str, str], ...] = (
    ("visual.cls_token", "visual.class_embedding"),
    ("visual.pos_embed", "visual.positional_embedding"),
    ("image_projection.weight", "visual.proj"),
    ("text_projection.weight", "text_projection"),
)


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped + "$")


_TO_OPEN_CLIP = [(_pattern(a), b) for a, b in _RENAMES]
_FROM_OPEN_CLIP = [(_pattern(b), a) for a, b in _RENAMES]


def rename(key: str, *, to_open_clip: bool, pool: str = "cls") -> str | None:
    """The other side's name of a state-dict key, or None when the key has no counterpart.

    ``pool`` picks where open_clip's ``ln_post`` goes in our model: ``visual.norm`` (cls) or ``visual.fc_norm``
    (avg); timm keeps the other one an Identity.
    """
    for ours, theirs in _RESHAPED:
        if key == (ours if to_open_clip else theirs):
            return theirs if to_open_clip else ours
    table = _TO_OPEN_CLIP if to_open_clip else _FROM_OPEN_CLIP
    for pattern, template in table:
        m = pattern.match(key)
        if m is None:
            continue
        if not to_open_clip and template.startswith("visual.norm.") and pool == "avg":
            template = template.replace("visual.norm.", "visual.fc_norm.")
        groups = m.groupdict()
        return template.replace("{i}", groups.get("i") or "").replace("{p}", groups.get("p") or "")
    return None


def _reshape(ours_key: str, tensor: torch.Tensor, *, to_open_clip: bool) -> torch.Tensor:
    if ours_key == "visual.cls_token":
        return tensor.reshape(-1) if to_open_clip else tensor.reshape(1, 1, -1)
    if ours_key == "visual.pos_embed":
        return tensor[0] if to_open_clip else tensor[None]
    if ours_key in ("image_projection.weight", "text_projection.weight"):
        return tensor.t()
    return tensor


def grid_pos_embed(model: nn.Module, image_size: int) -> torch.Tensor:
    """[1, 1 + g*g, C] position embeddings for ``image_size``, computed exactly as the forward pass does."""
    from timm.layers import resample_abs_pos_embed

    visual = model.visual
    patch = model.cfg.vision.patch_size
    if image_size % patch:
        raise ReclipError(f"image size {image_size} is not a multiple of the model's patch size {patch}")
    grid = (image_size // patch, image_size // patch)
    return resample_abs_pos_embed(visual.pos_embed, new_size=grid, old_size=visual.patch_embed.grid_size,
                                  num_prefix_tokens=visual.num_prefix_tokens)


def to_open_clip_state(model: nn.Module, image_size: int) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` state dict of a reclip-ray model, with the position embeddings at ``image_size``."""
    model = getattr(model, "module", model)
    pool = model.cfg.vision.pool
    unused = "visual.norm." if pool == "avg" else "visual.fc_norm."  # timm keeps the other final norm an Identity
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(unused):
            continue
        if key == "visual.pos_embed":
            with torch.no_grad():
                tensor = grid_pos_embed(model, image_size)
        theirs = rename(key, to_open_clip=True)
        if theirs is None:
            raise CheckpointError(f"no open_clip counterpart for weight {key!r} (model layout not supported)")
        out[theirs] = _reshape(key, tensor.detach(), to_open_clip=True).to("cpu").contiguous().clone()
    return out


def from_open_clip_state(
    state: dict[str, torch.Tensor], *, pool: str = "cls"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict in reclip-ray names, open_clip keys with no counterpart). Shapes are the checkpoint's: the
    position grid is fitted to a model later (``reclip_ray.init_weights``)."""
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in state.items():
        if key == "text_projection.weight":  # open_clip's proj_bias=True layout: already an nn.Linear weight
            out["text_projection.weight"] = tensor
            continue
        ours = rename(key, to_open_clip=False, pool=pool)
        if ours is None:
            unused.append(key)
            continue
        out[ours] = _reshape(ours, tensor, to_open_clip=False)
    return out, unused


def timm_vit_to_reclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (image tower only) in reclip-ray names; a patch-embed bias is folded into the patch
    positions' embeddings (both are added to every patch token, so this is exact up to float rounding)."""
    state = {f"visual.{k}": v for k, v in state.items()}
    bias = state.pop("visual.patch_embed.proj.bias", None)
    if bias is not None and "visual.pos_embed" in state:
        pos = state["visual.pos_embed"].clone()
        prefix = pos.shape[1] - _square_below(pos.shape[1])
        pos[:, prefix:] += bias.to(pos.dtype)
        state["visual.pos_embed"] = pos
    return state


def _square_below(n: int) -> int:
    """The largest square <= n: a pos_embed of n rows holds that many patch positions (the rest are prefix tokens)."""
    g = int(n ** 0.5)
    return g * g


# --------------------------------------------------------------------------------------------------- export


def open_clip_model_cfg(model: nn.Module, image_size: int) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for a reclip-ray model at ``image_size`` (see the module doc for each choice)."""
    model = getattr(model, "module", model)
    v, t = model.cfg.vision, model.cfg.text
    vocab = t.vocab_size
    # argmax pools the largest id: the first end token when that is the vocabulary's last id (CLIP's BPE).
    pool = "argmax" if t.eot_id == vocab - 1 else "eos"
    # A model trained with the sigmoid loss keeps its bias: open_clip's CLIP creates the parameter only when
    # init_logit_bias is set (the trained value then comes with the weights).
    logit_bias = getattr(model, "logit_bias", None)
    bias = {} if logit_bias is None else {"init_logit_bias": float(logit_bias.detach())}
    return {
        **bias,
        "embed_dim": int(model.cfg.embed_dim),
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": int(image_size),
            "patch_size": int(v.patch_size),
            "width": int(v.width),
            "layers": int(v.depth),
            "head_width": int(v.width // v.heads),
            "mlp_ratio": float(v.mlp_ratio),
            "no_ln_pre": False,
            "pool_type": "avg" if v.pool == "avg" else "tok",
            "final_ln_after_pool": v.pool == "avg",
            "norm_kwargs": {"eps": float(model.visual.norm_pre.eps)},
        },
        "text_cfg": {
            "context_length": int(t.context_length),
            "vocab_size": int(vocab),
            "width": int(t.width),
            "heads": int(t.heads),
            "layers": int(t.depth),
            "mlp_ratio": float(t.mlp_ratio),
            "pad_id": int(t.pad_id),
            "eos_id": int(t.eot_id),
            "pool_type": pool,
            "no_causal_mask": False,
            "proj_bias": False,
            "norm_kwargs": {"eps": float(model.text.ln_final.eps)},
        },
    }


def default_export_size(config: Any, model: nn.Module) -> int:
    """The resolution an export is made for: the run's full resolution (``eval.full_image_size``, else the last
    phase's size), which is also what ``reclip-ray eval`` uses; the base grid's size without a config."""
    if config is not None:
        return int(full_image_size(config))
    return int(getattr(model, "module", model).cfg.vision.base_image_size)


def export_open_clip(model: nn.Module, tokenizer: Any, config: Any, out_dir: str | os.PathLike, *,
                     image_size: int | None = None) -> Path | str:
    """Write an open_clip ``local-dir:`` folder: ``open_clip_config.json``, ``open_clip_model.safetensors``,
    ``tokenizer.json`` and a README; returns its path (a URI stays a string: ``folders.write_folder_atomic``).
    Replaced atomically if it holds an earlier open_clip export; a folder holding anything else is refused.

    ``open_clip.create_model_and_transforms("local-dir:OUT")`` then builds the same model, fixed at
    ``image_size`` (default: the run's full resolution). With the CLIP tokenizer (``data.tokenizer: clip``)
    ``open_clip.get_tokenizer("local-dir:OUT")`` gives the same tokens; with a tokenizer trained here the README
    says how to tokenize (open_clip would pick CLIP's BPE, whose ids mean nothing to this model).
    """
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    size = int(image_size or default_export_size(config, model))
    state = to_open_clip_state(model, size)
    t = model.cfg.text
    clip_bpe = bool(getattr(tokenizer, "clip_bpe", False))  # CaptionTokenizer: CLIP's vocabulary (data.tokenizer=clip)
    meta = {
        "format": 1,
        "tokenizer": "clip" if clip_bpe else TOKENIZER,
        "pad_id": int(t.pad_id),
        "sot_id": int(getattr(tokenizer, "sot_id", -1)),
        "eot_id": int(t.eot_id),
        "text_length": full_text_length(config) if config is not None else int(t.context_length),
        "image_size": size,
        "config": _config_dict(config, model),
    }
    from reclip_ray.pixels import CLIP_MEAN, CLIP_STD

    doc = {
        "model_cfg": open_clip_model_cfg(model, size),
        "preprocess_cfg": {"size": size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        "reclip_ray": meta,
    }
    from reclip_ray.folders import write_folder_atomic
    from reclip_ray.storage import name

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(doc, indent=2))
        (tmp / TOKENIZER).write_text(tokenizer.to_json())
        (tmp / README).write_text(_readme(name(str(out_dir)), meta, t.context_length))

    return write_folder_atomic(out_dir, write, replaces=(OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, TOKENIZER, README))


def _config_dict(config: Any, model: nn.Module) -> dict[str, Any] | None:
    if config is None:
        return None
    cfg = copy.deepcopy(config)
    cfg.model = copy.deepcopy(model.cfg)  # vocab_size / eot_id / pad_id filled in
    return cfg.to_dict()


def _readme(folder: str, meta: dict[str, Any], context_length: int) -> str:
    size, ids = meta["image_size"], f"pad={meta['pad_id']}, eot={meta['eot_id']}"
    lines = [
        f"# {folder}: a reclip-ray model in open_clip's format",
        "",
        f"Image size {size} px (open_clip's VisionTransformer has one fixed size; "
        "`force_image_size=N` resamples the position embeddings).",
        "",
        "```python",
        "import open_clip",
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{folder}')",
        "```",
        "",
    ]
    if meta["tokenizer"] == "clip":
        lines.append(f"Tokenize with open_clip: `tokenizer = open_clip.get_tokenizer('local-dir:{folder}')` "
                     f"(OpenAI's CLIP BPE, {context_length} tokens).")
    else:
        lines.append(
            "Tokenize with this model's own BPE, not open_clip.get_tokenizer (that is CLIP's, whose ids mean nothing "
            f"here): `from reclip_ray.data.tokenizer import load_tokenizer; tok = load_tokenizer('{folder}/"
            f"{TOKENIZER}', {ids}); text = torch.from_numpy(tok.encode(captions, {context_length}))`.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- loading back


def is_open_clip_dir(path: str | os.PathLike) -> bool:
    """An open_clip ``local-dir:`` folder (ours or anyone's; local or a URI), as opposed to a reclip-ray export."""
    from reclip_ray.storage import is_file, join

    return is_file(join(str(path), OPEN_CLIP_CONFIG)) and not is_file(join(str(path), "config.yaml"))


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise ReclipError(f"this needs open_clip, which is not installed: {INSTALL_HINT}") from None
    return open_clip


def _per_channel(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    """An open_clip mean or std (3 values, 1, or unset) as 3 floats."""
    return default if value is None else tuple(np.broadcast_to(np.asarray(value, dtype=np.float64), 3).tolist())


def eval_resize(preprocess_cfg: dict[str, Any], where: str) -> EvalResize:
    """An open_clip model's eval resize (``images.EvalResize``) from its ``preprocess_cfg``, read as open_clip's
    ``image_transform`` reads it: ``resize_mode`` shortest (unset: shortest), squash or longest (the longer side
    resized, the rest centre-padded with ``fill_color``: an integer 0-255, unset 0, or three of them),
    ``interpolation`` bicubic (unset, or 'random', a training setting that open_clip also reads as bicubic here) or
    bilinear; every mode makes open_clip's pixels (``EvalResize.open_clip``: ``shortest`` cropped as torchvision
    crops, transparent images not composited but converted as open_clip converts them). Anything else is refused in
    one line naming ``where``: scoring a model on other pixels than its own transform's would be scoring another
    model."""
    from reclip_ray.data.images import INTERPOLATIONS, RESIZE_MODES, EvalResize

    mode = preprocess_cfg.get("resize_mode") or "shortest"
    interpolation = preprocess_cfg.get("interpolation") or "bicubic"
    interpolation = "bicubic" if interpolation == "random" else interpolation
    if mode not in RESIZE_MODES:
        raise CheckpointError(f"{where}: preprocess_cfg resize_mode {mode!r} is not supported by reclip-ray eval, "
                              f"which resizes {', '.join(map(repr, RESIZE_MODES))}")
    if interpolation not in INTERPOLATIONS:
        raise CheckpointError(f"{where}: preprocess_cfg interpolation {interpolation!r} is not supported by "
                              f"reclip-ray eval, which resizes {' or '.join(map(repr, INTERPOLATIONS))}")
    if mode != "longest":  # open_clip pads only there; another mode's fill_color is not read
        return EvalResize(mode, interpolation, open_clip=True)
    return EvalResize(mode, interpolation, _fill_color(preprocess_cfg.get("fill_color"), where), open_clip=True)


def _fill_color(value: Any, where: str) -> tuple[int, int, int]:
    """open_clip's ``fill_color`` (what torchvision's ``pad`` takes: one integer for every channel, or one per
    channel; unset: 0) as an RGB triple; anything else a one-line error rather than a guess at a colour."""
    value = 0 if value is None else value
    channels = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    whole = all(isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer() and 0 <= c <= 255
                for c in channels)
    if len(channels) != 3 or not whole:
        raise CheckpointError(f"{where}: preprocess_cfg fill_color {value!r} is not a colour reclip-ray eval pads "
                              "with (an integer 0-255, or a list of 3)")
    red, green, blue = (int(c) for c in channels)
    return red, green, blue


class OpenClipModel(nn.Module):
    """An open_clip model behind reclip-ray's ``encode_image`` / ``encode_text`` (what ``evaluate`` calls).

    open_clip's ``encode_text`` adds all ``context_length`` position embeddings, so shorter token rows are padded
    to the context here; with its causal mask that does not change the end token's feature.

    Images arrive normalised with CLIP's mean and std (``pixels.normalize_images``); a model whose folder says
    other ones (``preprocess_cfg``: 0.5 and 0.5 for SigLIP and many timm towers) gets them re-normalised to its own,
    as open_clip's transform would have, instead of inputs shifted by up to 0.9 of its std. ``eval_resize`` says
    how its images are to be made square (``eval_resize``: the folder's resize mode and interpolation), which the
    evaluator decodes with; the default is reclip-ray's own.
    """

    def __init__(self, model: nn.Module, pad_id: int = 0, resize: EvalResize | None = None) -> None:
        super().__init__()
        from reclip_ray.data.images import EVAL_RESIZE

        self.model = model
        self.eval_resize = resize or EVAL_RESIZE
        self.pad_id = int(pad_id)
        self.context_length = int(model.context_length)
        from reclip_ray.pixels import CLIP_MEAN, CLIP_STD

        visual = getattr(model, "visual", model)
        mean, std = (_per_channel(getattr(visual, name, None), clip)
                     for name, clip in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)))
        self.renormalize = mean != CLIP_MEAN or std != CLIP_STD
        if self.renormalize:  # x_theirs = (x * clip_std + clip_mean - mean) / std
            mean, std, clip_mean, clip_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
                                              for v in (mean, std, CLIP_MEAN, CLIP_STD))
            self.register_buffer("pixel_scale", clip_std / std, persistent=False)
            self.register_buffer("pixel_shift", (clip_mean - mean) / std, persistent=False)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.renormalize:
            images = images * self.pixel_scale.to(images.dtype) + self.pixel_shift.to(images.dtype)
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"text length {length} exceeds the model's context_length {self.context_length}")
        if length < self.context_length:
            tokens = F.pad(tokens, (0, self.context_length - length), value=self.pad_id)
        return self.model.encode_text(tokens, normalize=normalize)


class OpenClipTokenizer:
    """open_clip's tokenizer behind ``CaptionTokenizer.encode`` (int64 rows of a given length)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.sot_id = int(getattr(tokenizer, "sot_token_id", -1))
        self.eot_id = int(getattr(tokenizer, "eot_token_id", -1))
        self.pad_id = 0
        self.vocab_size = int(getattr(tokenizer, "vocab_size", 0))

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, length), np.int64)
        return self._tok(list(texts), context_length=length).numpy().astype(np.int64)


def load_open_clip_export(path: str | os.PathLike, device: str | torch.device = "cpu",
                          image_size: int = 0) -> tuple[OpenClipModel, Any, Any]:
    """(model, tokenizer, Config) of an open_clip folder, built by open_clip itself (what CLIP_benchmark runs).

    The Config is the training run's when the folder is a reclip-ray export, else a minimal one (one phase at the
    folder's image size and context length), with ``eval.full_image_size`` set to the model's image size so that
    ``reclip-ray eval`` evaluates at the size open_clip built. ``image_size`` other than the folder's is passed to
    open_clip as ``force_image_size`` (it resamples the position embeddings). A URI is downloaded first.
    """
    from reclip_ray.folders import local_copy

    with local_copy(path) as local:
        return _load_open_clip_dir(Path(local), device, image_size)


def _load_open_clip_dir(root: Path, device: str | torch.device, image_size: int) -> tuple[OpenClipModel, Any, Any]:
    from reclip_ray.config import ConfigError, from_dict

    open_clip = _import_open_clip()
    try:
        doc = json.loads((root / OPEN_CLIP_CONFIG).read_text())
        model_cfg = doc["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{root / OPEN_CLIP_CONFIG}: not an open_clip config ({exc})") from None
    meta = doc.get("reclip_ray") or {}
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    built = int(vision.get("image_size", 224))
    kwargs = {"force_image_size": image_size} if image_size and image_size != built else {}
    name = f"local-dir:{root}"
    try:
        model = open_clip.create_model(name, device=device, **kwargs).eval()
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{root}: open_clip could not load it: {str(exc).splitlines()[0]}") from None
    size = int(image_size or built)
    if meta.get("tokenizer", "clip") == "clip":
        tokenizer: Any = OpenClipTokenizer(open_clip.get_tokenizer(name))
    else:
        from reclip_ray.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(root / meta["tokenizer"], pad=int(meta["pad_id"]), eot=int(meta["eot_id"]))
    raw = meta.get("config") or {
        "name": root.name,
        "model": {"vision": {"patch_size": int(vision.get("patch_size", 16)), "base_image_size": built}},
        "phases": [{"name": "eval", "image_size": built, "text_length": int(text.get("context_length", 77)),
                    "samples": 1.0}],
    }
    try:
        cfg = from_dict(raw, saved=True)
    except ConfigError as exc:
        raise CheckpointError(f"{root / OPEN_CLIP_CONFIG}: {str(exc).splitlines()[0]}") from None
    cfg.eval.full_image_size = size
    # what open_clip's transform reads: the folder's preprocess_cfg merged with its defaults (open_clip >= 2.23)
    preprocess = getattr(getattr(model, "visual", model), "preprocess_cfg", None) or doc.get("preprocess_cfg") or {}
    resize = eval_resize(preprocess, str(root / OPEN_CLIP_CONFIG))
    return OpenClipModel(model, pad_id=int(text.get("pad_id", 0)), resize=resize).to(device).eval(), tokenizer, cfg
