"""LoRA and QLoRA on the reference model (``run --finetune lora|qlora``).

Hu et al. 2021 (LoRA, sec. 4.1): a frozen projection W gains trainable A [r, in] (random
Gaussian) and B [out, r] (zeros), and computes ``W x + (alpha / r) B A x``; peft's LoraLayer and
torchtune's LoRALinear are built the same way (``lora_a``, ``lora_b`` submodules, scaling alpha /
r; alpha = 2r here, torchtune's Llama recipes' ratio). The frozen base is stored as the planner
says (``planner/finetune.py``): unquantised in the parameters' dtype, INT8 with one absmax scale
per output row (``strategies/kernels/int8.py``), or NF4 with double-quantised block scales
(``strategies/kernels/nf4.py``). Quantised pieces are frozen ``nn.Parameter``s, so trackers count
them as parameters, DDP broadcasts them and no optimizer sees them.

A quantised projection runs through ``_DequantLinear``: the forward dequantises the weight to the
compute dtype, multiplies, and drops it; the backward dequantises again for the input's gradient.
It saves no tensor: its weight is the module's own, and a frozen weight needs no input for its
(absent) gradient -- what autograd's mm does for a frozen 16-bit weight too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.configs import TrainConfig
from planner.errors import ConfigError
from planner.finetune import PROJECTIONS, is_adapted
from strategies.kernels.int4 import Int4Weight, dequantize_int4, quantize_int4
from strategies.kernels.int8 import quantize_rows
from strategies.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

ALPHA_OVER_RANK = 2.0


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: FrozenProjection) -> torch.Tensor:
        ctx.module = module
        weight = module.dequantized(x.dtype)
        return F.linear(x, weight, module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantized(grad.dtype)
        return grad @ weight, None


class FrozenProjection(nn.Module):
    """A frozen projection: ``weight``, or after ``quantize`` its quantised pieces. Built on the
    meta device in place of an ``nn.Linear``; ``quantize`` turns the materialised 16-bit weight
    into its storage."""

    def __init__(self, base: nn.Linear, allow_bias: bool = False):
        super().__init__()
        if base.bias is not None and not allow_bias:
            raise ConfigError("frozen (LoRA or quantised) projections with a bias are not implemented in the "
                              "reference model")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias  # inference only (training refuses it above): added by the matmul
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.storage = "plain"

    def quantize(self, storage: str) -> None:
        weight = self.weight.detach()
        del self.weight
        self.storage = storage
        if storage == "int8":
            codes, scale = quantize_rows(weight)
            self.weight_int8 = nn.Parameter(codes, requires_grad=False)
            self.weight_scale = nn.Parameter(scale.float(), requires_grad=False)
        elif storage == "int4":
            q4 = quantize_int4(weight)
            self.weight_int4 = nn.Parameter(q4.codes, requires_grad=False)
            self.weight_int4_scales = nn.Parameter(q4.scales, requires_grad=False)
            self.weight_int4_zeros = nn.Parameter(q4.zeros, requires_grad=False)
        elif storage == "nf4":
            q = quantize_nf4(weight)
            self.weight_nf4 = nn.Parameter(q.codes, requires_grad=False)
            self.weight_absmax = nn.Parameter(q.absmax_codes, requires_grad=False)
            self.weight_absmax_scale = nn.Parameter(q.absmax_scales, requires_grad=False)
            self.weight_absmax_mean = nn.Parameter(q.absmax_mean, requires_grad=False)
        else:
            raise ConfigError(f"unknown base storage {storage!r}")

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.storage == "int8":
            # int8 x (row scale in the compute dtype): one 16-bit tensor, no fp32 intermediate
            return self.weight_int8 * self.weight_scale.to(dtype)[:, None]
        if self.storage == "int4":
            return dequantize_int4(Int4Weight(self.weight_int4, self.weight_int4_scales, self.weight_int4_zeros,
                                              (self.out_features, self.in_features)), dtype)
        q = NF4Weight(self.weight_nf4, self.weight_absmax, self.weight_absmax_scale, self.weight_absmax_mean,
                      (self.out_features, self.in_features))
        return dequantize_nf4(q, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.storage == "plain" else _DequantLinear.apply(x, self)


class LoRALinear(FrozenProjection):
    """A frozen projection plus adapters ``lora_a``, ``lora_b`` (in ``adapter_dtype``, else the
    base's)."""

    def __init__(self, base: nn.Linear, rank: int, adapter_dtype: torch.dtype | None = None):
        super().__init__(base)
        kw = dict(device=base.weight.device, dtype=adapter_dtype or base.weight.dtype)
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.scaling = ALPHA_OVER_RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        adapter_dtype = self.lora_a.weight.dtype
        if adapter_dtype == x.dtype:
            return base + self.scaling * self.lora_b(self.lora_a(x))
        # fp32 adapters over a 16-bit base, as peft runs them: the adapter's own fp32 copy of
        # the input, the sum in fp32, cast back (peft/tuners/lora/layer.py, Linear.forward)
        return (base + self.scaling * self.lora_b(self.lora_a(x.to(adapter_dtype)))).to(x.dtype)


def apply_lora(model: nn.Module, cfg: TrainConfig) -> None:
    """Freeze every parameter, then give the targeted projections adapters (on the meta device,
    before sharding and materialisation). With ``train_embeddings`` the embedding and head train."""
    for param in model.parameters():
        param.requires_grad_(False)
    for block in list(getattr(model, "layers", {}).values()):
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in PROJECTIONS and is_adapted(name, cfg):
                    adapter_dtype = torch.float32 if cfg.lora_dtype == "fp32" else None
                    setattr(parent, name, LoRALinear(child, cfg.lora_rank, adapter_dtype))
    if cfg.train_embeddings:
        for name in ("embed", "pos_embed", "head"):
            module = getattr(model, name, None)
            if module is not None:
                module.weight.requires_grad_(True)


def quantize_base(model: nn.Module, cfg: TrainConfig) -> None:
    """After materialisation: store the frozen projections as ``cfg.base`` (int8, nf4). Projections
    without adapters are quantised too (``planner/finetune.py`` counts every projection)."""
    if cfg.base == "bf16":
        return
    for block in list(getattr(model, "layers", {}).values()):
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, FrozenProjection):
                    child.quantize(cfg.base)
                elif isinstance(child, nn.Linear) and name in PROJECTIONS:
                    frozen = FrozenProjection(child)
                    frozen.quantize(cfg.base)
                    setattr(parent, name, frozen)
