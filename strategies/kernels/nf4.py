"""4-bit NormalFloat (NF4) weights with double-quantised block scales (QLoRA).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3: weights are cut
into blocks of 64; each block is scaled by its absmax into [-1, 1] and every value replaced by the
nearest of 16 levels placed at quantiles of a standard normal (NF4, the values below, as
bitsandbytes' ``create_normal_map`` lists them). "Double quantisation" stores the fp32 absmaxes
themselves in 8 bits: their mean is subtracted and blocks of 256 share one fp32 scale.

Storage of a weight with ``n`` elements (``nf4_bytes``; ``planner/finetune.py`` counts the same):
``32 * ceil(n / 64)`` bytes of codes (two per byte), ``ceil(n / 64)`` int8 absmax codes,
``4 * ceil(ceil(n / 64) / 256)`` bytes of fp32 second-level scales and a 4-byte fp32 mean --
4.127 bits per weight. bitsandbytes stores the absmaxes with an 8-bit dynamic (float-like) code;
this kernel uses symmetric int8 around the mean: the same bytes, a simpler code.

Error bound (tested): a weight in a block of absmax a, stored as a', is off by at most
``a * NF4_HALF_GAP + |a - a'|``: half the widest gap between adjacent levels (0.152, between -1
and -0.696) of the block's scale, plus the absmax's own quantisation error (at most half a step of
its int8 code, ``c / 254``, for its group's scale c).

Dequantisation writes the 16-bit weight in place through a [256, 2] table of byte -> level pairs,
a chunk of codes at a time, so it allocates the output and a few kilobytes, no int64 indices the
size of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import torch

BLOCK = 64
DQ_BLOCK = 256
CHUNK_BYTES = 2048  # codes dequantised per step (4096 weights): bounded scratch

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2


def nf4_bytes(numel: int) -> int:
    blocks = ceil(numel / BLOCK)
    return 32 * blocks + blocks + 4 * ceil(blocks / DQ_BLOCK) + 4


@dataclass
class NF4Weight:
    """The stored pieces of one quantised weight."""

    codes: torch.Tensor  # uint8 [blocks * 32]: level indices, high nibble first
    absmax_codes: torch.Tensor  # int8 [blocks]
    absmax_scales: torch.Tensor  # fp32 [ceil(blocks / 256)]
    absmax_mean: torch.Tensor  # fp32 [1]
    shape: tuple[int, ...]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.absmax_codes, self.absmax_scales, self.absmax_mean

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _levels(device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    w = weight.detach().float().flatten()
    n = w.numel()
    blocks = ceil(n / BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=w.device)
    padded[:n] = w
    padded = padded.view(blocks, BLOCK)
    absmax = padded.abs().amax(dim=1).clamp_min(1e-12)
    normed = padded / absmax[:, None]
    levels = _levels(w.device)
    # nearest level: bucketize against the midpoints between adjacent levels
    index = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    codes = (index[0::2] << 4) | index[1::2]
    # double quantisation of the absmaxes: mean-centred, int8 per group of 256 with an fp32 scale
    mean = absmax.mean()
    centred = absmax - mean
    groups = ceil(blocks / DQ_BLOCK)
    grouped = torch.zeros(groups * DQ_BLOCK, dtype=torch.float32, device=w.device)
    grouped[:blocks] = centred
    scales = grouped.view(groups, DQ_BLOCK).abs().amax(dim=1).clamp_min(1e-12)
    absmax_codes = torch.round(grouped.view(groups, DQ_BLOCK) / scales[:, None] * 127).to(torch.int8).flatten()
    return NF4Weight(codes.contiguous(), absmax_codes[:blocks].clone(), scales, mean.reshape(1).clone(),
                     tuple(weight.shape))


def block_absmax(q: NF4Weight) -> torch.Tensor:
    """The absmax of each block as stored (fp32)."""
    scales = q.absmax_scales.repeat_interleave(DQ_BLOCK)[: q.absmax_codes.numel()]
    return q.absmax_codes.float() / 127 * scales + q.absmax_mean


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    blocks = q.absmax_codes.numel()
    pairs = torch.stack((_levels(q.codes.device)[torch.arange(256, device=q.codes.device) >> 4],
                         _levels(q.codes.device)[torch.arange(256, device=q.codes.device) & 15]), dim=1).to(dtype)
    out = torch.empty(blocks * BLOCK, dtype=dtype, device=q.codes.device)
    pairs_out = out.view(-1, 2)
    # a simulated rank (fake tensors) has no values to look up: the output's allocation is all
    # its memory (the chunks' scratch is a few kilobytes), and 10^4 chunk steps per weight would
    # take minutes there
    from torch._subclasses.fake_tensor import is_fake

    for start in range(0, 0 if is_fake(q.codes) else q.codes.numel(), CHUNK_BYTES):
        stop = min(start + CHUNK_BYTES, q.codes.numel())
        torch.index_select(pairs, 0, q.codes[start:stop].int(), out=pairs_out[start:stop])
    out.view(blocks, BLOCK).mul_(block_absmax(q).to(dtype)[:, None])
    numel = 1
    for size in q.shape:
        numel *= size
    return out[:numel].view(q.shape)
