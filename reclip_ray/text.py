"""The text tower: a causal transformer over token ids, pooled at the end-of-text token.

The pooled position is the first ``eot_id`` in each row (CLIP / open_clip pool at the end-of-text token too; they
take ``argmax`` of the ids, which assumes eot is the largest id). The ids come from the tokenizer, never from
defaults: with the standard CLIP BPE ``<|endoftext|>`` is 49407 and padding is 0 or eot itself, so "last non-pad"
or a fixed id would pool the wrong token. Taking the *first* eot stays right when pad == eot. A row without eot
(hand-made ids) pools its last position. Attention is causal, so the eot token never sees the padding after it and
its feature is the same at any ``text_length``. Positional
embeddings are learned for ``context_length`` positions and a shorter phase simply uses the first ``L`` of them, so
RECLIP's short-text main phase and longer-text finetune share one set of weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reclip_ray.config import TextConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token ids [N, L] (L <= context_length) -> pooled features [N, width] after the final LayerNorm."""

    def __init__(self, cfg: TextConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError("the text tower needs vocab_size > 0 (take it from the tokenizer)")
        self.context_length = cfg.context_length
        self.pad_id = cfg.pad_id
        self.eot_id = cfg.eot_id  # < 0: not known (model built without a tokenizer); see pool_positions
        self.width = cfg.width
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(TextBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.grad_checkpointing = False
        self._init_weights(cfg.depth)

    def _init_weights(self, depth: int) -> None:
        # GPT-2 / open_clip style: small embeddings, residual projections scaled down with depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = 0.02 / (2 * max(depth, 1)) ** 0.5
        for blk in self.blocks:
            for lin in (blk.attn.qkv, blk.mlp[0]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            for lin in (blk.attn.proj, blk.mlp[2]):
                nn.init.normal_(lin.weight, std=proj_std)
                nn.init.zeros_(lin.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"text length {L} exceeds the model's context_length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_positions(tokens)]
        return self.ln_final(pooled)

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the token each row is pooled at: its first ``eot_id``, else its last position.

        Without a known eot id (``eot_id < 0``: a model built from a bare vocab size, as in older call sites and
        benchmarks) this keeps the earlier rule, the last non-pad position, so those callers behave as before.
        """
        L = tokens.shape[1]
        if self.eot_id < 0:
            positions = torch.arange(L, device=tokens.device).expand_as(tokens)
            return torch.where(tokens != self.pad_id, positions, torch.zeros_like(positions)).amax(dim=1)
        is_eot = tokens == self.eot_id
        first = is_eot.int().argmax(dim=1)  # argmax returns the first maximum
        return torch.where(is_eot.any(dim=1), first, torch.full_like(first, L - 1))
