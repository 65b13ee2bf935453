"""Group-wise INT4 weights (weight-only, asymmetric), as GPTQ / AWQ checkpoints and torchao's
``int4_weight_only`` store them.

Frantar et al. 2022 (GPTQ) and Lin et al. 2023 (AWQ) quantise each output row of a weight in groups
of ``GROUP`` consecutive input features with a scale and a zero point per group; torchao's
``Int4WeightOnlyConfig`` defaults to groups of 128 with bf16 scales and zeros. Here each group's
minimum is its zero point and ``(max - min) / 15`` its scale; a weight is stored as the 4-bit index
``round((w - zero) / scale)`` in [0, 15], two indices per byte (the even column in the high
nibble). Round-to-nearest only: GPTQ's error-compensating updates are not done.

Storage of an ``[out, in]`` weight (``int4_bytes``; ``planner/inference.py`` counts the same):
``out * ceil(in / 2)`` bytes of codes and ``4 * out * ceil(in / GROUP)`` bytes of bf16 scales and
zeros -- 4.25 bits per weight at in = k * 128.

Error bound (tested): a weight is off by at most half its group's scale plus the bf16 rounding of
the scale and zero point it is rebuilt from (the codes are chosen against the rounded values, so
only half a step remains where the group's range fits 15 rounded steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import torch

GROUP = 128
LEVELS = 15
SCALE_DTYPE = torch.bfloat16
ROWS_PER_CHUNK_ELEMENTS = 1 << 16  # weights dequantised per step: bounded scratch


def int4_bytes(shape: tuple[int, int]) -> int:
    out, inp = shape
    return out * ceil(inp / 2) + 4 * out * ceil(inp / GROUP)


@dataclass
class Int4Weight:
    codes: torch.Tensor  # uint8 [out, ceil(in / 2)]
    scales: torch.Tensor  # bf16 [out, groups]
    zeros: torch.Tensor  # bf16 [out, groups]
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def _grouped(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as fp32 [out, groups, GROUP], the last group padded with its row's first value
    of that group (padding must not widen the group's range)."""
    out, inp = weight.shape
    groups = ceil(inp / GROUP)
    w = weight.detach().float()
    if groups * GROUP != inp:
        pad = w[:, (groups - 1) * GROUP:(groups - 1) * GROUP + 1].expand(out, groups * GROUP - inp)
        w = torch.cat((w, pad), dim=1)
    return w.view(out, groups, GROUP)


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    out, inp = weight.shape
    grouped = _grouped(weight)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    zeros = lo.to(SCALE_DTYPE)
    scales = ((hi - lo) / LEVELS).clamp_min(1e-12).to(SCALE_DTYPE)
    index = torch.round((grouped - zeros.float()[..., None]) / scales.float()[..., None]).clamp_(0, LEVELS)
    index = index.to(torch.uint8).view(out, -1)[:, :inp]
    if inp % 2:
        index = torch.cat((index, torch.zeros(out, 1, dtype=torch.uint8, device=index.device)), dim=1)
    codes = (index[:, 0::2] << 4) | index[:, 1::2]
    return Int4Weight(codes.contiguous(), scales.contiguous(), zeros.contiguous(), (out, inp))


def dequantize_int4(q: Int4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight in ``dtype``, written a few rows at a time into one output tensor, so the
    scratch is a few hundred kilobytes whatever the weight's size."""
    out_features, inp = q.shape
    groups = q.scales.shape[1]
    out = torch.empty(out_features, inp, dtype=dtype, device=q.codes.device)
    from torch._subclasses.fake_tensor import is_fake

    rows = max(1, ROWS_PER_CHUNK_ELEMENTS // max(inp, 1))
    for start in range(0, 0 if is_fake(q.codes) else out_features, rows):
        stop = min(start + rows, out_features)
        codes = q.codes[start:stop]
        index = torch.stack((codes >> 4, codes & 15), dim=2).view(stop - start, -1)
        if index.shape[1] != groups * GROUP:
            index = torch.cat((index, index.new_zeros(stop - start, groups * GROUP - index.shape[1])), dim=1)
        values = index.view(stop - start, groups, GROUP).to(dtype) * q.scales[start:stop, :, None].to(dtype)
        values += q.zeros[start:stop, :, None].to(dtype)
        out[start:stop] = values.view(stop - start, -1)[:, :inp]
    return out
