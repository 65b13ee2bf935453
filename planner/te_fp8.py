"""Transformer Engine's FP8 recipes as Megatron-Core runs them (issue 23, item 2): ``--engine
megatron --precision fp8-delayed | fp8-current | fp8-blockwise | mxfp8``.

Read from source (TransformerEngine d0067d0, 2.20.0.dev0; Megatron-LM d98e8a6, both 2026-08-22;
nothing here could be measured: Transformer Engine needs CUDA):

- **Recipes** (transformer_engine/common/recipe/__init__.py): ``DelayedScaling`` (l.172-282:
  per-tensor scale from an amax history; Megatron passes history length 1, "most recent",
  megatron/core/transformer/transformer_config.py:621-624), ``Float8CurrentScaling`` (l.285-333:
  per-tensor scale from the tensor's own amax, which reads it twice), ``Float8BlockScaling``
  (l.391-485: 1x128 activations and gradients, 128x128 weights, fp32 scales: DeepSeek-V3's) and
  ``MXFP8BlockScaling`` (l.336-388: 1x32 blocks with one E8M0 byte each; Blackwell only).
  Megatron's ``--fp8-recipe delayed | tensorwise | blockwise | mxfp8``
  (megatron/core/fp8_utils.py:768-797) names them.
- **States.** The parameters stay bf16 with fp32 main gradients and an fp32 master in the
  distributed optimizer (Megatron's bf16 default, ``bf16-mixed-fp32-grads``). On top, each
  TE linear caches an FP8 copy of its weight for the whole step -- Megatron passes
  ``is_first_microbatch`` (megatron/core/extensions/transformer_engine.py:1336-1345), so the
  copy is refreshed on the first micro-batch only (transformer_engine/pytorch/module/base.py:
  792-887): a rowwise and a columnwise (transposed) copy, 2 B per weight element on Hopper
  (C++ csrc/quantizer.cpp:361-375, 678-689); blockwise 2 B plus 128x128 fp32 scales; MXFP8
  2 B plus one scale byte per 32 elements in each orientation. (On Blackwell one per-tensor
  buffer serves both GEMMs, 1 B: planned at Hopper's 2 B, an over-estimate.)
- **What backward keeps.** ``LayerNormLinear`` (q, k, v and fc1) writes the normalised output
  directly in FP8 and keeps it columnwise only, 1 B per element, beside the bf16 norm input
  and fp32 rsigma (layernorm_linear.py:239-268, 477-487, 526-536). ``Linear`` (fc2, and the
  attention output projection) quantises its input and keeps the columnwise copy, 1 B
  (linear.py:421-437, 600-616) -- except the output projection under the non-delayed recipes,
  which Megatron builds with ``save_original_input`` (megatron/core/transformer/attention.py:
  428-444): it keeps the bf16 attention output the attention kernel keeps anyway. Blockwise
  and MXFP8 copies carry 1/32 B of scales per element. With sequence parallelism the
  per-tensor recipes keep the rank's rowwise shard and all-gather it again in backward
  (linear.py:390-392, 979-999), as Megatron's bf16 linears keep theirs.
- **Time.** The projections' GEMMs run on the fp8 tensor cores at the measured fp8 matmul
  ceiling (``gemm_efficiency['fp8']``); the casts are memory-bound: the projection inputs
  that no norm writes (o and fc2: read 2 B, write both orientations, 2 B; current scaling
  reads the tensor once more for its amax), every GEMM's output gradient in backward (both
  orientations, base.py:1688-1789), and the cached weights once per step. Block-scaled GEMMs
  are emulated by TE on Hopper (docs/.../fp8_blockwise_scaling.rst:69-70); DeepSeek's own
  DeepGEMM reaches the tensorwise ceiling there (validation/gemm_published.json): planned at it.

- **FP8 primary weights** (``--fp8-param-gather``: megatron/training/arguments.py:2016-2018): the
  projections' parameters are FP8 in a uint8 buffer, all-gathered by the distributed optimizer at
  1 B per element (megatron/core/distributed/param_and_grad_buffer.py:921-924, 1279-1291), with a
  persistent transpose on Hopper (transformer_engine/pytorch/tensor/utils.py:1404-1436): 2 B per
  element like bf16, and no separate cache; the fp32 master stays (distrib_optimizer.py:428-445).
  Not with MXFP8, which Megatron gathers in bf16 and re-quantises (param_and_grad_buffer.py:
  1160-1179): refused.
- **Precision-aware optimizer** (``--exp-avg-dtype``, ``--exp-avg-sq-dtype``: fp32, bf16, fp16,
  fp8; planner/precision.py ``MOMENT_BYTES``).

Not modelled: the precision-aware optimizer's ``--main-params-dtype`` / ``--main-grads-dtype`` and
its int16 master remainders, FP8 attention (``--fp8-dot-product-attention``), NVFP4.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.configs import GPUSpec, ModelSpec, TrainConfig
from planner.errors import ConfigError
from planner.params import layer_tensors
from planner.precision import TE_RECIPES

BLOCK_SCALE_BYTES = 1 / 32  # MXFP8: one E8M0 byte per 32 elements; blockwise 1x128: one fp32 per 128
WEIGHT_CACHE_BYTES = {"delayed": 2.0, "current": 2.0, "blockwise": 2.0 + 2 * 4 / (128 * 128),
                      "mxfp8": 2.0 + 2 * BLOCK_SCALE_BYTES}


def te_recipe(precision: str) -> str:
    """``delayed``, ``current``, ``blockwise``, ``mxfp8``, or empty for a recipe without TE FP8."""
    return TE_RECIPES.get(precision, "")


def per_tensor(recipe: str) -> bool:
    return recipe in ("delayed", "current")


def saved_input_bytes(recipe: str) -> float:
    """Bytes per element of a TE linear's FP8 input kept for backward (its scales included)."""
    return 1.0 if per_tensor(recipe) else 1.0 + BLOCK_SCALE_BYTES


def check_gpu(precision: str, gpu: GPUSpec) -> None:
    """FP8 needs fp8 tensor cores; MXFP8 Blackwell's block-scaled ones."""
    if not gpu.peak_tflops.fp8:
        raise ConfigError(f"{precision} needs fp8 tensor cores (Hopper, Ada or Blackwell); {gpu.name} has none")
    if te_recipe(precision) == "mxfp8" and not gpu.chip.startswith("GB"):
        raise ConfigError(f"mxfp8 needs Blackwell's block-scaled tensor cores (B200, GB200); {gpu.name} is "
                          f"{gpu.chip or 'not Blackwell'}: use fp8-current, fp8-delayed or fp8-blockwise")


def _projections(model: ModelSpec, kind: str) -> list:
    return [t for t in layer_tensors(model, kind) if t.block_projection]


def weight_numel(model: ModelSpec, train: TrainConfig, kind: str) -> float:
    """One layer's TE linear weights on a tensor-parallel rank."""
    return sum(t.numel for t in _projections(model, kind)) / train.tp


def weight_cache_bytes(model: ModelSpec, train: TrainConfig, kind: str) -> float:
    """One layer's cached FP8 weights on a tensor-parallel rank."""
    return weight_numel(model, train, kind) * WEIGHT_CACHE_BYTES[te_recipe(train.precision)]


@dataclass(frozen=True)
class LayerCasts:
    """Per layer and micro-batch on one rank: the projections' forward GEMM FLOPs and the bytes
    the FP8 casts move."""

    gemm_forward_flops: float
    cast_forward_bytes: float
    cast_backward_bytes: float


def layer_casts(model: ModelSpec, train: TrainConfig, kind: str) -> LayerCasts:
    recipe = te_recipe(train.precision)
    tokens = train.micro_batch * train.local_seq_len
    t = train.tp
    weights = weight_numel(model, train, kind)
    flops = 2 * tokens * weights
    amax = 2 if recipe == "current" else 0  # current scaling reads the input once more
    # inputs no norm writes in fp8: the attention output (o) and the MLP's down projection
    q = model.num_heads * model.head_dim / t
    f = model.ffn_hidden_size / t
    unfused_inputs = tokens * (q + f)
    forward = unfused_inputs * (2 + 2 + amax)
    # every GEMM's output gradient, both orientations: columns of q/k/v, o, gate/up, down
    outputs = tokens * sum(p.shape[0] for p in _projections(model, kind)) / t
    backward = outputs * (2 + 2 + amax)
    # the cached weights, re-cast on the step's first micro-batch
    weight_casts = weights * (2 + 2 + amax) / max(train.num_microbatches, 1)
    return LayerCasts(flops, forward + weight_casts, backward)


__all__ = ["TE_RECIPES", "LayerCasts", "check_gpu", "layer_casts", "saved_input_bytes", "te_recipe",
           "weight_cache_bytes"]
