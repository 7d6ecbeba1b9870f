"""What one GPU holds during a training step: the activations saved for backward and the model's states. An
estimate from the config, for ``reclip-ray plan`` (which notes a phase that would not fit); the GPU job
(``benchmarks/gpu_e2e.py``) prints it beside the peak the worker measured.

Activations, per sample, under bf16 autocast (the GPU default) with the fused attention kernels timm calls
(``scaled_dot_product_attention``: no L x L matrix kept). Each transformer block keeps, per token, its two LayerNorm
inputs in fp32 (the residual stream is fp32: 8 x width bytes), the bf16 inputs of its four matmuls and the
attention's q, k, v and output (14 x width), and the MLP's hidden activation twice in bf16 (GELU's input, fc2's
input: 4 x mlp_ratio x width): ``(22 + 4 mlp_ratio) x width`` bytes per token, 38 x width at mlp_ratio 4. Measured
(``tests/test_memory.py``, saved-tensor hooks on CPU): 36 x width, so ``BLOCK_BYTES`` is fitted to it as
``(20 + 4 mlp_ratio)``. The image path (the normalised fp32 image, its bf16 copy for the patch embedding) keeps
about 30 bytes per pixel. The text tower's causal mask and the pooled features are small. vit-b-16: 9.3 MB per
sample at 64 px (16 tokens of text), 74 MB at 224 px (32 tokens).

Per step, also: fp32 weights, their gradients and AdamW's two moments (16 bytes per parameter) plus the bf16
weight copies autocast makes (2): ``STATE_BYTES_PER_PARAM``; and the loss's logits, fp32, each rank's rows against
the global batch (with ``local_loss``; else the whole batch), in both directions, with their softmax and gradients
(about six such matrices). With ``train.micro_batch_size`` a worker holds one micro-batch's activations plus every
row's cached features. With ``train.grad_checkpointing`` (or ``model.grad_checkpointing``) each block keeps only its
input, the fp32 residual stream (4 x width bytes per token: measured exactly so), and the backward recomputes one
block at a time, whose activations are then held on top. Not counted: the CUDA context and allocator slack (a few
hundred MB to a few GB), kernels' workspaces.
"""

from __future__ import annotations

from reclip_ray.config import ModelConfig
from reclip_ray.flops import image_tokens

IMAGE_BYTES_PER_PIXEL = 30
STATE_BYTES_PER_PARAM = 18
LOGIT_MATRICES = 6  # image->text and text->image logits, their softmax, their gradients: fp32 rows x global batch


def block_bytes_per_token(width: int, mlp_ratio: float) -> float:
    """Bytes one transformer block saves for backward per token (module docstring: fitted to the measurement)."""
    return (20 + 4 * mlp_ratio) * width


def _towers(model: ModelConfig, image_size: int, text_length: int, patch_dropout: float):
    v, t = model.vision, model.text
    return [(v.depth, image_tokens(v, image_size, patch_dropout), v.width, v.mlp_ratio),
            (t.depth, text_length, t.width, t.mlp_ratio)]


def activation_bytes_per_sample(model: ModelConfig, image_size: int, text_length: int, patch_dropout: float = 0.0,
                                grad_checkpointing: bool = False) -> float:
    """Bytes both towers save for backward per training sample (bf16 autocast); with ``grad_checkpointing``, each
    block's fp32 input only."""
    per_token = (lambda width, ratio: 4 * width) if grad_checkpointing else block_bytes_per_token
    towers = _towers(model, image_size, text_length, patch_dropout)
    return sum(depth * tokens * per_token(width, ratio) for depth, tokens, width, ratio in towers) \
        + IMAGE_BYTES_PER_PIXEL * image_size**2


def step_gpu_bytes(model: ModelConfig, parameters: int, image_size: int, text_length: int, *, rows: int,
                   global_batch: int, micro_batch: int = 0, local_loss: bool = True, patch_dropout: float = 0.0,
                   grad_checkpointing: bool = False) -> float:
    """One worker's GPU memory in a step: model states, one pass's activations (``rows``, its share of the global
    batch, or a micro-batch of it; with ``grad_checkpointing`` plus one block's, recomputed in the backward), the
    cached features of accumulation and the loss's logits."""
    per_pass = rows if not 0 < micro_batch < rows else micro_batch
    per_sample = activation_bytes_per_sample(model, image_size, text_length, patch_dropout, grad_checkpointing)
    if grad_checkpointing:
        per_sample += max(tokens * block_bytes_per_token(width, ratio)
                          for _, tokens, width, ratio in _towers(model, image_size, text_length, patch_dropout))
    activations = per_pass * per_sample
    cached = 2 * rows * model.embed_dim * 4 if per_pass < rows else 0
    logits = LOGIT_MATRICES * (rows if local_loss else global_batch) * global_batch * 4
    return STATE_BYTES_PER_PARAM * parameters + activations + cached + logits
