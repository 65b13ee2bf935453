"""Precision recipes: how many bytes each kind of state takes per element.

| recipe | params | grads | fp32 master | Adam m, v | compute | who uses it |
|---|---|---|---|---|---|---|
| fp32 | 4 | 4 | - | 4 + 4 | 4 | reference runs |
| bf16-mixed | 2 | 2 | 4 | 4 + 4 | 2 | DeepSpeed / Megatron bf16 (ZeRO paper: 2 + 2 + 12) |
| fp16-mixed | 2 | 2 | 4 | 4 + 4 | 2 | the same with loss scaling |
| bf16-mixed-fp32-grads | 2 | 4 | 4 | 4 + 4 | 2 | Megatron-LM's default (fp32 main grads: 18 B/param) |
| amp-bf16 | 4 | 4 | - | 4 + 4 | 2 | torch.autocast; FSDP2 MixedPrecisionPolicy(param_dtype=bf16) |
| bf16 | 2 | 2 | - | 2 + 2 | 2 | pure bf16, optimizer state included |
| fp8-tensorwise, fp8-rowwise | 4 | 4 | - | 4 + 4 | 2 (fp8 GEMMs) | amp-bf16 under FSDP2 with torchao's Float8Linear (planner/float8.py) |
| fp8-delayed, fp8-current, fp8-blockwise, mxfp8 | 2 (+ cached FP8 copies) | 4 | 4 | 4 + 4 | 2 (fp8 GEMMs) | Megatron-Core with Transformer Engine's recipes (planner/te_fp8.py) |

``gather_bytes`` is the dtype FSDP/ZeRO-3 all-gathers parameters in (bf16 under FSDP2's
MixedPrecisionPolicy even though the shard is fp32); ``reduce_bytes`` the dtype gradients are
reduce-scattered in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    param_bytes: int
    grad_bytes: int
    master_bytes: int
    state_bytes: int
    compute_bytes: int
    compute_dtype: str
    gather_bytes: int
    reduce_bytes: int

    @property
    def has_master(self) -> bool:
        return self.master_bytes > 0


RECIPES: dict[str, Recipe] = {
    "fp32": Recipe(4, 4, 0, 4, 4, "fp32", 4, 4),
    "bf16-mixed": Recipe(2, 2, 4, 4, 2, "bf16", 2, 2),
    "fp16-mixed": Recipe(2, 2, 4, 4, 2, "fp16", 2, 2),
    "bf16-mixed-fp32-grads": Recipe(2, 4, 4, 4, 2, "bf16", 2, 4),
    "amp-bf16": Recipe(4, 4, 0, 4, 2, "bf16", 2, 4),
    "bf16": Recipe(2, 2, 0, 2, 2, "bf16", 2, 2),
    # torchao Float8 training: amp-bf16's states; the projections' GEMMs in fp8 (planner/float8.py)
    "fp8-tensorwise": Recipe(4, 4, 0, 4, 2, "bf16", 2, 4),
    "fp8-rowwise": Recipe(4, 4, 0, 4, 2, "bf16", 2, 4),
    # Transformer Engine's FP8 under Megatron-Core: bf16-mixed-fp32-grads' states; the
    # projections' GEMMs in fp8 and their cached FP8 weights (planner/te_fp8.py)
    "fp8-delayed": Recipe(2, 4, 4, 4, 2, "bf16", 2, 4),
    "fp8-current": Recipe(2, 4, 4, 4, 2, "bf16", 2, 4),
    "fp8-blockwise": Recipe(2, 4, 4, 4, 2, "bf16", 2, 4),
    "mxfp8": Recipe(2, 4, 4, 4, 2, "bf16", 2, 4),
}

# Which precisions run fp8 GEMMs, by whose recipe (the name each recipe goes by there):
# torchao's Float8Linear under FSDP2 (planner/float8.py) and Transformer Engine's recipes under
# Megatron-Core (planner/te_fp8.py)
FLOAT8_RECIPES = {"fp8-tensorwise": "tensorwise", "fp8-rowwise": "rowwise"}
TE_RECIPES = {"fp8-delayed": "delayed", "fp8-current": "current", "fp8-blockwise": "blockwise", "mxfp8": "mxfp8"}

OPTIMIZER_STATES = {"adamw": 2, "adamw8bit": 2, "sgd": 1}
"""State tensors per parameter: Adam's m and v; SGD's momentum buffer."""

# 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each state
# element is one byte, with an fp32 absmax per block of 256 (torchao.optim.AdamW8bit's default
# block_size=256; bitsandbytes' blockwise kernels use the same block).
ADAM8BIT_BLOCK = 256
# strategies/kernels/adam8bit.py updates a tensor CHUNK elements at a time; its scratch per
# element (fp32 m, v, gradient, update and the dequantisation's indices) and the fixed part (the
# codes' midpoint tables), measured on the reference model (fp32, bf16-mixed, LoRA; torch 2.13)
ADAM8BIT_CHUNK = 1 << 14
ADAM8BIT_SCRATCH_PER_ELEMENT = 25
ADAM8BIT_SCRATCH_FIXED = 2048


# Megatron's precision-aware optimizer keeps Adam's moments in these dtypes (megatron/training/
# arguments.py:3675-3684, --exp-avg-dtype / --exp-avg-sq-dtype; fp8 is a per-tensor-scaled
# Float8Tensor: transformer_engine/pytorch/optimizers/fused_adam.py:84-93, 204-304)
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def optimizer_state_bytes(optimizer: str, numel: int, state_bytes: int,
                          moments: tuple[str, str] = ("fp32", "fp32")) -> int:
    """Bytes of the optimizer's state tensors for ``numel`` parameters (no master copy);
    ``moments``: Adam's first and second moment dtypes where the precision-aware optimizer sets
    them (else the recipe's ``state_bytes`` each)."""
    if optimizer == "adamw8bit":
        return OPTIMIZER_STATES[optimizer] * (numel + 4 * -(-numel // ADAM8BIT_BLOCK))
    if optimizer == "adamw" and moments != ("fp32", "fp32"):
        return numel * sum(MOMENT_BYTES[m] for m in moments)
    return OPTIMIZER_STATES[optimizer] * numel * state_bytes
