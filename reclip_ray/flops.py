"""Analytical FLOPs of the CLIP towers, the currency RECLIP's savings are measured in.

A multiply-add counts as 2 FLOPs. We count exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts -
matrix multiplies, convolutions and attention (``scaled_dot_product_attention``, the full L x L score matrix even
when causal, as dense kernels compute it) - so the numbers can be checked against it. Not counted: LayerNorm,
GELU, softmax, residual adds and the position-embedding resample. Training = 3x forward (backward ~2x).

The loss's logits are counted when the global batch B is given (``global_batch``; the trainer, ``run_flops``,
``reclip-ray plan`` and the sweep budget all pass the phase's configured global batch): the one B x B x embed_dim
matrix multiply of the global batch, ``2 * B * embed_dim`` forward FLOPs per sample (0.8% of ViT-B/16 at 64 px and
16 tokens at B = 32,768; the phase's short last step is counted at the full batch's rate). That is the model's
count - a property of the config, the same for any worker count, ``train.local_loss`` and
``train.micro_batch_size`` - not what the hardware executes: without ``local_loss`` every one of the N ranks
builds the whole B x B matrix (N times the count: at 64 workers that is about half the towers' FLOPs again),
with it each rank builds its b x B rows twice, image->text and text->image (2x the count, and N times less logits
memory per rank); gradient accumulation re-runs each tower forward once more (4x forward instead of 3x), as
activation checkpointing does. Those are costs of the execution, as in the MFU-vs-HFU distinction, and are not in
``gflops_total``.

Patch dropout (``phases[i].patch_dropout``, FLIP) is counted as run: the patch embedding sees every patch, the
blocks see the kept patches plus the class token (``kept_patches``: the count timm's ``PatchDropout`` keeps, with
its rounding). Evaluation runs every token and is not in the training count.
"""

from __future__ import annotations

from typing import Any, Sequence

from reclip_ray.config import Config, ModelConfig, TextConfig, VisionConfig


def _block_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    qkv = 2 * tokens * width * 3 * width
    attn = 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v, all heads together
    proj = 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * hidden
    return qkv + attn + proj + mlp


def kept_patches(patches: int, patch_dropout: float) -> int:
    """Patch tokens a training forward keeps out of ``patches`` at drop rate ``patch_dropout``.

    timm's ``PatchDropout`` keeps ``max(1, int(L * (1 - p)))``: rounded down, in float arithmetic (so 100 patches
    at p = 0.9 keep 9, not 10, because ``1 - 0.9`` is just under 0.1); the same expression here counts exactly the
    tokens that run (tests/test_patch_dropout.py compares it with the model's shapes).
    """
    if patch_dropout <= 0:
        return patches
    return max(1, int(patches * (1.0 - patch_dropout)))


def image_tokens(vision: VisionConfig, image_size: int, patch_dropout: float = 0.0) -> int:
    """Tokens the ViT's blocks run on: the kept patches + the class token."""
    return kept_patches((image_size // vision.patch_size) ** 2, patch_dropout) + 1


def image_forward_flops(vision: VisionConfig, image_size: int, embed_dim: int = 0, patch_dropout: float = 0.0) -> int:
    """Forward FLOPs of one image through the ViT (+ the projection to ``embed_dim`` when given).

    With ``patch_dropout`` the patch embedding still runs on every patch (tokens are dropped after it), the blocks
    on the kept ones.
    """
    patches = (image_size // vision.patch_size) ** 2
    patch_embed = 2 * patches * 3 * vision.patch_size**2 * vision.width
    tokens = image_tokens(vision, image_size, patch_dropout)
    blocks = vision.depth * _block_flops(tokens, vision.width, vision.mlp_ratio)
    return patch_embed + blocks + 2 * vision.width * embed_dim


def text_forward_flops(text: TextConfig, length: int, embed_dim: int = 0) -> int:
    """Forward FLOPs of one caption of ``length`` tokens (+ projection of the pooled token to ``embed_dim``)."""
    return text.depth * _block_flops(length, text.width, text.mlp_ratio) + 2 * text.width * embed_dim


def logits_forward_flops(embed_dim: int, global_batch: int) -> int:
    """Forward FLOPs per sample of the global batch's B x B logits (one row of ``image @ text.T``): ``2 B D``."""
    return 2 * global_batch * embed_dim


def sample_forward_flops(model_cfg: ModelConfig, image_size: int, text_length: int,
                         global_batch: int = 0, *, patch_dropout: float = 0.0) -> dict[str, int]:
    """Per-sample forward FLOPs: ``image``, ``text``, ``logits`` (0 without ``global_batch``) and their ``total``."""
    image = image_forward_flops(model_cfg.vision, image_size, model_cfg.embed_dim, patch_dropout)
    text = text_forward_flops(model_cfg.text, text_length, model_cfg.embed_dim)
    logits = logits_forward_flops(model_cfg.embed_dim, global_batch)
    return {"image": image, "text": text, "logits": logits, "total": image + text + logits}


def train_flops_per_sample(model_cfg: ModelConfig, image_size: int, text_length: int, global_batch: int = 0, *,
                           patch_dropout: float = 0.0) -> int:
    """Training FLOPs per sample (3x forward); with ``global_batch`` the logits are in it (module docstring)."""
    return 3 * sample_forward_flops(model_cfg, image_size, text_length, global_batch,
                                    patch_dropout=patch_dropout)["total"]


def phase_global_batch(cfg: Config, phase_index: int) -> int:
    """The global batch a phase trains at (``phases.N.batch_size``, else ``train.batch_size``)."""
    return cfg.phases[phase_index].batch_size or cfg.train.batch_size


def phase_train_flops_per_sample(cfg: Config, phase_index: int) -> int:
    """Training FLOPs per sample of a phase as configured (image size, text length, global batch, patch dropout):
    what the trainer adds to ``gflops_total`` per sample, and what ``run_flops`` and ``reclip-ray plan`` count."""
    ph = cfg.phases[phase_index]
    return train_flops_per_sample(cfg.model, ph.image_size, ph.text_length, phase_global_batch(cfg, phase_index),
                                  patch_dropout=ph.patch_dropout)


def run_flops(cfg: Config) -> dict[str, Any]:
    """Per-phase and total training GFLOPs of a run (what RECLIP's schedule saves vs. all-full-size)."""
    phases = []
    for i, (ph, samples) in enumerate(zip(cfg.phases, cfg.phase_samples())):
        f = sample_forward_flops(cfg.model, ph.image_size, ph.text_length, phase_global_batch(cfg, i),
                                 patch_dropout=ph.patch_dropout)
        phases.append({
            "name": ph.name,
            "image_size": ph.image_size,
            "patch_dropout": ph.patch_dropout,
            "image_tokens": image_tokens(cfg.model.vision, ph.image_size, ph.patch_dropout),
            "text_length": ph.text_length,
            "samples": samples,
            "image_gflops_per_sample": f["image"] / 1e9,
            "text_gflops_per_sample": f["text"] / 1e9,
            "logits_gflops_per_sample": f["logits"] / 1e9,
            "train_gflops": 3 * f["total"] * samples / 1e9,
            "image_train_gflops": 3 * f["image"] * samples / 1e9,  # the image tower's share (RECLIP's main saving)
            "text_train_gflops": 3 * f["text"] * samples / 1e9,
        })
    return {"phases": phases, "total_train_gflops": sum(p["train_gflops"] for p in phases),
            "total_image_train_gflops": sum(p["image_train_gflops"] for p in phases),
            "total_text_train_gflops": sum(p["text_train_gflops"] for p in phases)}


def milestones_crossed(milestones: Sequence[float], before: float, after: float) -> list[float]:
    """The compute milestones (GFLOPs) a step took the run past: ``before < m <= after``.

    A sweep's ASHA compares trials at these (``eval.at_gflops``); the worker reports at the first step that
    crosses one, so every trial is compared within one step of the same compute.
    """
    return [m for m in milestones if before < m <= after]


# ---------------------------------------------------------------------------------------------------- parameters


def _block_params(width: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block: qkv and output projections, the MLP (all with biases), two LayerNorms."""
    hidden = int(width * mlp_ratio)
    return (3 * width * width + 3 * width) + (width * width + width) + 2 * width * hidden + hidden + width + 4 * width


def model_parameters(model: ModelConfig, vocab_size: int) -> int:
    """The model's parameter count, exactly as ``model.build_model`` builds it (tested against torch): what a
    checkpoint's size follows from without building the model (``reclip-ray plan`` runs without torch)."""
    v, t = model.vision, model.text
    patches = (v.base_image_size // v.patch_size) ** 2
    vision = (3 * v.patch_size ** 2 * v.width  # patch embedding (a conv; no bias under ln_pre, as timm and CLIP)
              + v.width + (patches + 1) * v.width  # class token, position embeddings at base_image_size
              + 2 * v.width + v.depth * _block_params(v.width, v.mlp_ratio) + 2 * v.width)  # ln_pre, blocks, norm
    text = (vocab_size * t.width + t.context_length * t.width  # token and position embeddings
            + t.depth * _block_params(t.width, t.mlp_ratio) + 2 * t.width)  # blocks, ln_final
    heads = (v.width + t.width) * model.embed_dim + 1 + (model.init_logit_bias is not None)  # projections, scale, bias
    return vision + text + heads
