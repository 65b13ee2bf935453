"""What differs between training engines, in one table.

The same ZeRO stage or tensor-parallel layout costs different bytes in different engines:
FSDP2 pads every tensor to the shard group while DeepSpeed flattens, ZeroRedundancyOptimizer
gives whole tensors to ranks while Megatron's distributed optimizer splits one flat buffer,
PyTorch's sequence-parallel linear layers save the all-gathered input while Megatron saves
the local shard and gathers again in backward. trainplan predicts the engine the user names:
``pytorch`` (what ``trainplan run`` executes: DDP, ZeroRedundancyOptimizer, FSDP2, DTensor),
``megatron`` (Megatron-LM) or ``deepspeed`` (DeepSpeed ZeRO, with Megatron-DeepSpeed for
tensor and pipeline parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from planner.params import MEGATRON_VOCAB_MULTIPLE


@dataclass(frozen=True)
class EngineSemantics:
    zero1_partition: Literal["greedy-tensors", "flat"]
    """ZeroRedundancyOptimizer assigns whole tensors greedily; Megatron/DeepSpeed split a flat buffer."""

    sharding: Literal["per-tensor-dim0", "flat"]
    """How ZeRO-2/3 shard: FSDP2 pads each tensor's dim 0; DeepSpeed one flat buffer."""

    zero2_gathers_params: bool
    """FSDP2's ZeRO-2 (reshard_after_forward=False) keeps only a parameter shard between steps
    and all-gathers the full parameters for forward/backward; DeepSpeed ZeRO-2 keeps the full
    16-bit parameters on every rank (the ZeRO paper's P_os+g)."""

    grads_between_steps: bool
    """Gradient memory survives ``zero_grad``: DDP buckets, Megatron's and DeepSpeed's
    contiguous gradient buffers. FSDP2 creates sharded gradients in backward and
    ``zero_grad(set_to_none=True)`` frees them."""

    fp32_main_grads_in_optimizer: bool
    """With 16-bit gradients and fp32 master weights, Megatron keeps an fp32 copy of the
    gradients in the optimizer between steps (its table: 20 bytes/param, 4 + 16/d distributed).
    PyTorch and DeepSpeed cast the gradients to fp32 only during the step (a temporary)."""

    sp_saves_gathered_input: bool
    """With sequence parallelism, a column-parallel linear's input is all-gathered along the
    sequence. DTensor's ColwiseParallel saves the gathered input for backward; Megatron saves
    the local shard and all-gathers it again in backward (Korthikanti et al. 2022, sec. 4.2.2)."""

    vocab_multiple: int
    """Vocabulary padded to a multiple of this times tp (Megatron: 128)."""

    reduce_bucket_elements: int
    """Transient gradient-reduction bucket in elements (0: none beyond the gradients themselves).
    DeepSpeed's default reduce_bucket_size is 5e8 elements."""


ENGINES: dict[str, EngineSemantics] = {
    "pytorch": EngineSemantics(
        zero1_partition="greedy-tensors",
        sharding="per-tensor-dim0",
        zero2_gathers_params=True,
        grads_between_steps=False,
        fp32_main_grads_in_optimizer=False,
        sp_saves_gathered_input=True,
        vocab_multiple=1,
        reduce_bucket_elements=0,
    ),
    "megatron": EngineSemantics(
        zero1_partition="flat",
        sharding="flat",
        zero2_gathers_params=False,
        grads_between_steps=True,
        fp32_main_grads_in_optimizer=True,
        sp_saves_gathered_input=False,
        vocab_multiple=MEGATRON_VOCAB_MULTIPLE,
        reduce_bucket_elements=0,
    ),
    "deepspeed": EngineSemantics(
        zero1_partition="flat",
        sharding="flat",
        zero2_gathers_params=False,
        grads_between_steps=True,
        fp32_main_grads_in_optimizer=False,
        sp_saves_gathered_input=False,
        vocab_multiple=MEGATRON_VOCAB_MULTIPLE,
        reduce_bucket_elements=500_000_000,
    ),
}
