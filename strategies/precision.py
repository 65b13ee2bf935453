"""Precision recipes, by the planner's names, on PyTorch's own machinery.

| recipe | parameters | gradients | master / optimizer state | forward |
|---|---|---|---|---|
| fp32 | fp32 | fp32 | AdamW states fp32 | fp32 |
| bf16-mixed | bf16 | bf16 | fp32 master + states (MasterWeightOptimizer) | bf16 |
| fp16-mixed | fp16 | fp16 | fp32 master + states, dynamic loss scaling | fp16 |
| amp-bf16 | fp32 | fp32 | fp32 states | torch.autocast(bf16); under FSDP2, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) |
| bf16 | bf16 | bf16 | bf16 states | bf16 |
| fp8-tensorwise, fp8-rowwise | fp32 | fp32 | fp32 states | amp-bf16 under FSDP2; the blocks' projections are torchao ``Float8Linear`` (``apply_float8``) |

Megatron's ``bf16-mixed-fp32-grads`` (fp32 main-gradient buffers) is planned, not run: it is
refused before a run starts (planner/capabilities.py), as Float8 without FSDP2 is by the planner.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from planner.errors import ConfigError
from planner.precision import FLOAT8_RECIPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPlan:
    recipe: str
    param_dtype: torch.dtype
    master_weights: bool
    loss_scaling: bool
    autocast_dtype: torch.dtype | None  # for unsharded amp-bf16
    fsdp_param_dtype: torch.dtype | None  # FSDP2 MixedPrecisionPolicy
    fsdp_reduce_dtype: torch.dtype | None

    def autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def mp_policy(self):
        if self.fsdp_param_dtype is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.fsdp_param_dtype, reduce_dtype=self.fsdp_reduce_dtype)


def precision_plan(recipe: str, sharded: bool) -> PrecisionPlan:
    """``sharded``: FSDP2 (ZeRO-2/3) owns the parameters. Float8 is planned under FSDP2 only
    (``TrainConfig`` refuses it elsewhere)."""
    if recipe == "fp32":
        return PrecisionPlan(recipe, torch.float32, False, False, None, None, None)
    if recipe in ("bf16-mixed", "fp16-mixed"):
        dtype = torch.bfloat16 if recipe == "bf16-mixed" else torch.float16
        return PrecisionPlan(recipe, dtype, True, recipe == "fp16-mixed", None, None, None)
    if recipe == "amp-bf16" or recipe in FLOAT8_RECIPES:  # Float8: amp-bf16 with torchao's linears
        if sharded:
            return PrecisionPlan(recipe, torch.float32, False, False, None, torch.bfloat16, torch.float32)
        return PrecisionPlan(recipe, torch.float32, False, False, torch.bfloat16, None, None)
    if recipe == "bf16":
        return PrecisionPlan(recipe, torch.bfloat16, False, False, None, None, None)
    raise ValueError(f"no strategy-layer recipe {recipe!r}: planner.capabilities.run_refusal refuses it before "
                     "a run starts")


def apply_float8(model, cfg) -> None:
    """Swap the blocks' projections for torchao's ``Float8Linear`` (``convert_to_float8_training``
    with the recipe of ``--precision``; tensorwise all-gathers in fp8 under FSDP with
    ``--fp8-all-gather``, as torchtitan's Float8 command does). The output head stays bf16
    (torchtitan filters ``output``), and so does any projection with a dimension that is not a
    multiple of 16 (``torch._scaled_mm``). ``torch._scaled_mm`` has a CPU kernel in PyTorch 2.13,
    so this runs on CPU too, at no speed-up."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ConfigError(f"{cfg.precision} needs torchao (pip install torchao): {error}") from None
    from planner.float8 import converts, fp8_all_gather, float8_recipe
    from planner.params import ParamTensor

    config = Float8LinearConfig.from_recipe_name(float8_recipe(cfg.precision))
    if fp8_all_gather(cfg):
        from dataclasses import replace

        config = replace(config, enable_fsdp_float8_all_gather=True)

    def planned(module, fqn: str) -> bool:  # the planner's rule, on the block-relative name (attn.q)
        return converts(ParamTensor(f"{fqn}.weight", (module.out_features, module.in_features)))

    for block in model.layers.values():
        convert_to_float8_training(block, config=config, module_filter_fn=planned)
