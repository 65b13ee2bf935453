"""Context parallelism: each sequence split over the cp ranks, attention computed as a ring.

Liu et al. 2023 ("Ring Attention with Blockwise Transformers"): every rank holds a block of the
sequence; keys and values travel around the ring while each rank attends its queries to the
block it holds, merging the partial results by their log-sum-exp. PyTorch implements it for
``torch.distributed.tensor.experimental.context_parallel`` (torchtitan's
``--parallelism.context_parallel_degree``): ``_templated_ring_attention`` and its backward in
torch/distributed/tensor/experimental/_context_parallel/_attention.py, with round-robin load
balancing (rank r holds chunks r and 2cp - 1 - r of 2cp, so every rank gets the same share of the
causal triangle) and k, v all-gathered once per pass. ``context_parallel`` reaches those functions
by dispatching SDPA's CUDA kernels on DTensors; on a CPU it fails ("_scaled_dot_product_flash_
attention_for_cpu does not have a sharding strategy registered", torch 2.13), so this module calls
the same ring functions directly with the kernel of the device: the CPU flash kernel on a CPU,
PyTorch's own ring flash handlers on CUDA. Everything else (FSDP over dp x cp, the loss per rank
averaged by the gradient reduction) is the layout's usual engine.
"""

from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten


def load_balanced_shard(tensor: torch.Tensor, dim: int, rank: int, cp: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``tensor`` along ``dim``: chunks rank and 2cp - 1 - rank of 2cp
    (PyTorch's round-robin load balancer for causal attention)."""
    chunks = tensor.chunk(2 * cp, dim=dim)
    return torch.cat((chunks[rank], chunks[2 * cp - 1 - rank]), dim=dim)


class _RingAttention(torch.autograd.Function):
    """Causal ring attention over the cp group on q, k, v [batch, heads, local tokens, head_dim]
    (k, v with the same head count as q). Saves what SDPA's flash kernel saves: q, k, v, the
    output and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, mesh):
        from torch.distributed.tensor.experimental._context_parallel import _attention as ring

        if q.device.type == "cuda":
            out, lse, *rest = ring._scaled_dot_product_ring_flash_attention(mesh, q, k, v, is_causal=True)
        else:
            out, lse, *rest = ring._templated_ring_attention(
                mesh.get_group(), 2, aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v,
                is_causal=True, dropout_p=0.0)
        # [batch, tokens, heads, head_dim] memory, as SDPA's flash kernels return it: the caller's
        # transpose and reshape for the output projection are then views, not a copy
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        ctx.mesh, ctx.rest = mesh, rest
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from torch.distributed.tensor.experimental._context_parallel import _attention as ring

        q, k, v, out, lse = ctx.saved_tensors
        if q.device.type == "cuda":
            cum_q, cum_k, max_q, max_k, seed, offset = ctx.rest[:6]
            dq, dk, dv, *_ = ring._scaled_dot_product_ring_flash_attention_backward(
                ctx.mesh, grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
        else:
            dq, dk, dv, *_ = ring._templated_ring_attention_backward(
                ctx.mesh.get_group(), 2, aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                grad_out=grad_out, grad_out_name="grad_out", query=q, key=k, value=v, out=out, logsumexp=lse,
                is_causal=True, dropout_p=0.0)
        return dq, dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh) -> torch.Tensor:
    # grouped-query attention: the CPU kernel attends grouped heads itself; on CUDA the layout is
    # refused before a run starts (planner/capabilities.py)
    return _RingAttention.apply(q, k, v, mesh)


def apply_context_parallel(model: nn.Module, cp_mesh, cfg) -> None:
    """Route every attention of ``model`` through the ring over ``cp_mesh`` and tell the model
    which positions of each sequence this rank holds (its RoPE tables follow)."""
    if cfg.cp == 1:
        return
    for module in model.modules():  # strategies.model's Attention and Transformer carry these slots
        if hasattr(module, "cp_mesh"):
            module.cp_mesh = cp_mesh
        if hasattr(module, "cp_shard"):
            module.cp_shard = (cp_mesh.get_local_rank(), cfg.cp)
