"""Activation checkpointing (Chen et al. 2016; Korthikanti et al. 2022 for selective).

``full``: every block is recomputed in backward; only its input is kept (PyTorch's
non-reentrant checkpoint wrapper). ``selective``: Megatron-LM's definition -- the core
attention (QK^T, softmax, dropout, probs @ V) is recomputed, its inputs q, k, v kept; with
flash attention that saves only the log-sum-exp, since flash already recomputes the scores.
"""

from __future__ import annotations

from torch import nn

from strategies.model import Attention, Transformer


def apply_activation_checkpointing(model: Transformer, mesh, cfg) -> Transformer:
    mode = cfg.activation_checkpointing
    if mode == "selective":
        for module in model.modules():
            if isinstance(module, Attention):
                module.recompute_core = True
    elif mode == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            checkpoint_wrapper,
        )

        for name, block in list(model.layers.items()):
            model.layers[name] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel
