"""Activation checkpointing as the frameworks ship it (Chen et al. 2016; Korthikanti et al.
2022 for selective; torchtitan for op-level and layer selective checkpointing).

- ``full``: every block is recomputed in backward; only its input is kept (PyTorch's
  non-reentrant checkpoint wrapper).
- ``selective``: Megatron-LM's definition -- the core attention (QK^T, softmax, dropout,
  probs @ V) is recomputed, its inputs q, k, v kept; with flash attention that saves only the
  log-sum-exp, since flash already recomputes the scores.
- ``op``: torchtitan's op-level selective checkpointing (torchtitan 0.3.0,
  torchtitan/distributed/activation_checkpoint.py, ``SelectiveAC``): inside each block, the
  outputs of compute-intensive ops (the partitioner's ``compute_intensive_ops``: mm, bmm,
  addmm, the flash and efficient SDPA kernels), SDPA variants and reduce-scatters are saved,
  except every second matmul, which is recomputed with everything else;
  ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` applies the policy. On CPU
  the flash kernel is ``_scaled_dot_product_flash_attention_for_cpu``, which the partitioner's
  list lacks: we save it too, as torchtitan's list does the GPU kernel, so a CPU run measures
  what a GPU run saves.
- ``layer:N``: every N-th block (the N-th, 2N-th, ...) fully checkpointed, the others not
  (torchtitan's layer selective checkpointing, ``selective_ac_option = N`` in its releases
  before 0.3).
"""

from __future__ import annotations

from torch import nn

from planner.configs import parse_checkpointing
from strategies.model import Attention, Transformer


def _op_level_policy():
    """A fresh policy per checkpointed forward (torchtitan counts matmuls per block call)."""
    import torch
    from torch._functorch.partitioners import get_default_op_list
    from torch.utils.checkpoint import CheckpointPolicy

    save = {op.default for op in get_default_op_list().compute_intensive_ops}
    save |= {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default,
             torch.ops.aten._scaled_dot_product_attention_math.default,
             torch.ops.aten.linear.default,
             # an MoE's routing (its ties could pick other experts when recomputed) and its
             # dispatch, as torchtitan 0.3.0's _get_default_save_ops
             torch.ops.aten.topk.default,
             torch.ops._c10d_functional.all_to_all_single.default,
             torch.ops._c10d_functional.reduce_scatter_tensor.default}
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.linear.default)
    counts = {False: 0, True: 0}

    def policy(ctx, func, *args, **kwargs):
        if func in matmuls:
            counts[ctx.is_recompute] += 1
        if func in save:
            if func in matmuls and counts[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: Transformer, mesh, cfg) -> Transformer:
    policy, every = parse_checkpointing(cfg.activation_checkpointing)
    if policy == "selective":
        for module in model.modules():
            if isinstance(module, Attention):
                module.recompute_core = True
        return model
    if policy == "none":
        return model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    for name, block in list(model.layers.items()):
        if policy == "full" or (policy == "layer" and (int(name) + 1) % every == 0):
            model.layers[name] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        elif policy == "op":
            model.layers[name] = checkpoint_wrapper(
                block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                context_fn=lambda: create_selective_checkpoint_contexts(_op_level_policy()))
    return model


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel
