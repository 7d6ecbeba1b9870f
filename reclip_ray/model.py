"""CLIP with a timm ViT image tower that runs at any resolution from one set of weights.

RECLIP trains most samples at a small image size and finetunes briefly at full size. The image tower is a timm
``VisionTransformer`` with ``dynamic_img_size=True``: the learned position embeddings are stored once, on the grid
of ``vision.base_image_size``, and resampled (bicubic, antialiased) on the fly in every forward pass for the
current grid. We deliberately never *replace* the stored embeddings when a phase changes: the parameters are the
same tensors in every phase, so a checkpoint taken mid-phase restores exactly the model that was running, resuming
needs no knowledge of which phase resized what, and the optimizer state always matches the parameter shapes. The
cost is one small interpolation per forward pass (not counted as FLOPs; it is independent of batch size).

Patch dropout (FLIP, ``phases[i].patch_dropout``) is timm's ``PatchDropout`` in the ViT's ``patch_drop`` slot, after
the position embeddings and before the blocks: per sample, an argsort of Gaussian noise on the device picks the
kept patches (one batched gather, no host sync, no loop over samples); the class token is always kept, and in
eval mode nothing is dropped. The module has no parameters, so ``set_patch_dropout`` swaps it at each phase start
on the live model without touching weights, optimizer state or checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from reclip_ray.config import ModelConfig
from reclip_ray.text import TextTransformer


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v, t = cfg.vision, cfg.text
        if t.vocab_size <= 0:
            raise ValueError("model.text.vocab_size must be > 0 (build_model fills it from the tokenizer)")
        for key in ("pad_id", "eot_id"):
            if getattr(t, key) >= t.vocab_size:
                raise ValueError(f"model.text.{key}={getattr(t, key)} is not below vocab_size={t.vocab_size}")
        if v.base_image_size % v.patch_size:
            raise ValueError(f"base_image_size {v.base_image_size} is not a multiple of patch_size {v.patch_size}")
        self.cfg = cfg
        self.visual = VisionTransformer(
            img_size=v.base_image_size,
            patch_size=v.patch_size,
            embed_dim=v.width,
            depth=v.depth,
            num_heads=v.heads,
            mlp_ratio=v.mlp_ratio,
            num_classes=0,
            global_pool="token" if v.pool == "cls" else "avg",
            class_token=True,  # counted in FLOPs even with avg pooling
            pre_norm=True,  # CLIP's ln_pre
            dynamic_img_size=True,
        )
        self.text = TextTransformer(t, t.vocab_size)
        self.image_projection = nn.Linear(v.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(t.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=v.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=t.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.max_log_logit_scale = math.log(cfg.max_logit_scale)
        # The sigmoid loss's learnable bias (train.loss: siglip); None keeps the CLIP loss's parameter set.
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block of both towers in backward instead of keeping its activations."""
        self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable

    def set_patch_dropout(self, rate: float) -> None:
        """Drop ``rate`` of the image patch tokens in training forwards from now on; 0: keep all (module docstring).

        Setting the rate already in place is a no-op, so a compiled model does not recompile at a phase that keeps it.
        """
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"patch dropout must be in [0, 1), got {rate!r}")
        if rate == self.patch_dropout:
            return
        prefix = self.visual.num_prefix_tokens  # the class token: never dropped
        self.visual.patch_drop = PatchDropout(rate, num_prefix_tokens=prefix) if rate > 0 else nn.Identity()

    @property
    def patch_dropout(self) -> float:
        return float(getattr(self.visual.patch_drop, "prob", 0.0))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_projection(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_projection(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def clamp_logit_scale_(self) -> None:
        """Keep the stored parameter in range too (Adam momentum can push it past the forward clamp)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_log_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        logit_scale = self.logit_scale.clamp(max=self.max_log_logit_scale).exp()
        return image_features, text_features, logit_scale


def set_patch_dropout(model: nn.Module, rate: float) -> None:
    """Set the patch dropout of a CLIP, DDP-wrapped or not: the trainers call it at each phase start (and resume)."""
    getattr(model, "module", model).set_patch_dropout(rate)


def build_model(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    *,
    tokenizer: Any = None,
    eot_id: int | None = None,
    pad_id: int | None = None,
) -> CLIP:
    """Build from a model config, with the text ids taken from the tokenizer that will feed the model.

    ``tokenizer`` (anything with ``vocab_size``, ``eot_id`` and ``pad_id``, e.g. a CaptionTokenizer) fills
    ``cfg.text.vocab_size``, ``eot_id`` and ``pad_id``; explicit ``vocab_size`` / ``eot_id`` / ``pad_id`` win over
    it. The text tower pools at ``eot_id``, so a model whose ids do not come from its tokenizer pools the wrong
    token without any error. The config is copied, so the returned ``model.cfg`` is complete: export writes it as
    config.yaml and ``load_model`` rebuilds the same ids from it.
    """
    import copy

    cfg = copy.deepcopy(cfg)
    ids = {"vocab_size": vocab_size, "eot_id": eot_id, "pad_id": pad_id}
    for key, value in ids.items():
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, key)
        if value is not None:
            setattr(cfg.text, key, int(value))
    return CLIP(cfg)
