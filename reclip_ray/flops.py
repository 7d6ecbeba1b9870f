"""Analytical FLOPs of the CLIP towers, the currency RECLIP's savings are measured in.

A multiply-add counts as 2 FLOPs. We count exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts -
matrix multiplies, convolutions and attention (``scaled_dot_product_attention``, the full L x L score matrix even
when causal, as dense kernels compute it) - so the numbers can be checked against it. Not counted: LayerNorm,
GELU, softmax, residual adds, the position-embedding resample and the B x B logits of the loss (per sample
``2 * B * embed_dim``, about 0.2% of ViT-B/16 at 64 px even at batch 32k). Training = 3x forward (backward ~2x).
"""

from __future__ import annotations

from typing import Any

from reclip_ray.config import Config, ModelConfig, TextConfig, VisionConfig


def _block_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    qkv = 2 * tokens * width * 3 * width
    attn = 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v, all heads together
    proj = 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * hidden
    return qkv + attn + proj + mlp


def image_tokens(vision: VisionConfig, image_size: int) -> int:
    return (image_size // vision.patch_size) ** 2 + 1  # + cls token


def image_forward_flops(vision: VisionConfig, image_size: int, embed_dim: int = 0) -> int:
    """Forward FLOPs of one image through the ViT (+ the projection to ``embed_dim`` when given)."""
    patches = (image_size // vision.patch_size) ** 2
    patch_embed = 2 * patches * 3 * vision.patch_size**2 * vision.width
    blocks = vision.depth * _block_flops(patches + 1, vision.width, vision.mlp_ratio)
    return patch_embed + blocks + 2 * vision.width * embed_dim


def text_forward_flops(text: TextConfig, length: int, embed_dim: int = 0) -> int:
    """Forward FLOPs of one caption of ``length`` tokens (+ projection of the pooled token to ``embed_dim``)."""
    return text.depth * _block_flops(length, text.width, text.mlp_ratio) + 2 * text.width * embed_dim


def sample_forward_flops(model_cfg: ModelConfig, image_size: int, text_length: int) -> dict[str, int]:
    image = image_forward_flops(model_cfg.vision, image_size, model_cfg.embed_dim)
    text = text_forward_flops(model_cfg.text, text_length, model_cfg.embed_dim)
    return {"image": image, "text": text, "total": image + text}


def train_flops_per_sample(model_cfg: ModelConfig, image_size: int, text_length: int) -> int:
    return 3 * sample_forward_flops(model_cfg, image_size, text_length)["total"]


def run_flops(cfg: Config) -> dict[str, Any]:
    """Per-phase and total training GFLOPs of a run (what RECLIP's schedule saves vs. all-full-size)."""
    phases = []
    for ph, samples in zip(cfg.phases, cfg.phase_samples()):
        f = sample_forward_flops(cfg.model, ph.image_size, ph.text_length)
        phases.append({
            "name": ph.name,
            "image_size": ph.image_size,
            "text_length": ph.text_length,
            "samples": samples,
            "image_gflops_per_sample": f["image"] / 1e9,
            "text_gflops_per_sample": f["text"] / 1e9,
            "train_gflops": 3 * f["total"] * samples / 1e9,
        })
    return {"phases": phases, "total_train_gflops": sum(p["train_gflops"] for p in phases)}
