"""Core attention: fused SDPA (flash / memory-efficient kernels) or an explicit eager path.

The eager path materialises the s x s scores and saves the softmax output, as Korthikanti
et al. 2022 count (2as^2b bytes in 16-bit, plus dropout mask and output with dropout); the
planner's ``--attention eager`` predicts exactly this path. Causal masking everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "flash",
                   dropout: float = 0.0) -> torch.Tensor:
    """q: [b, heads, s, d]; k, v: [b, kv_heads, s, d]. Returns [b, heads, s, d]."""
    if kernel == "eager":
        return eager_attention(q, k, v, dropout)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                          enable_gqa=k.shape[1] != q.shape[1])


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Scores, softmax and probs @ v as separate ops. GQA repeats k and v to every query head
    (as Megatron's unfused path does), so the matmuls save full-width k and v."""
    heads, s, d = q.shape[1], q.shape[2], q.shape[3]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    # The causal mask is added (addition saves nothing), not masked_fill'ed (which would save
    # an s x s mask per layer).
    causal = torch.full((s, s), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d)) + causal, dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)
