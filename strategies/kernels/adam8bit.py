"""8-bit AdamW with block-wise quantised states (``--optimizer adamw8bit``).

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": Adam's m and v are stored
in one byte per element, each block of 256 elements scaled by its own absmax (fp32), through a
*dynamic* code whose levels are spaced by orders of magnitude, so that both the large and the
tiny entries of a state keep a few significant bits. torchao's ``AdamW8bit`` and bitsandbytes'
``Adam8bit`` do this; this one is ours (torchao compiles its step with inductor per tensor shape,
too slow for CPU tests), with a simpler code of the same idea: 127 levels per sign, log-spaced
from 1e-7 to 1 (each a factor 1.135 apart: about 6% relative error), and 0.

Storage per state tensor of n elements: n bytes of codes and 4 * ceil(n / 256) bytes of scales
(``planner.precision.optimizer_state_bytes`` counts the same). A step dequantises m and v of
one parameter to fp32 a chunk at a time (``CHUNK`` elements), updates as AdamW does, and
quantises them back: its scratch is bounded by the chunk, not the parameter.
"""

from __future__ import annotations

import math

import torch

BLOCK = 256
CHUNK = 1 << 14  # elements updated at once (a multiple of BLOCK)
_LEVELS = torch.logspace(-7, 0, 127, dtype=torch.float64)
SIGNED_MAP = torch.cat((-_LEVELS.flip(0), torch.zeros(1, dtype=torch.float64), _LEVELS)).float()  # 255 levels
UNSIGNED_MAP = torch.cat((torch.zeros(1, dtype=torch.float64), torch.logspace(-7, 0, 255, dtype=torch.float64))).float()


def _quantize(values: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Write ``values`` (fp32, a whole number of blocks but for the tensor's last) as codes and
    per-block absmax scales, in place."""
    n = values.numel()
    blocks = -(-n // BLOCK)
    padded = values if n == blocks * BLOCK else torch.nn.functional.pad(values, (0, blocks * BLOCK - n))
    absmax = padded.view(blocks, BLOCK).abs().amax(dim=1).clamp_min(1e-30)
    scales.copy_(absmax)
    normed = (padded.view(blocks, BLOCK) / absmax[:, None]).flatten()[:n]
    # nearest level: bucketize against the midpoints
    index = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2)
    codes.copy_(index.to(torch.uint8))


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    n = codes.numel()
    values = levels[codes.int()]
    return (values.view(-1)[:n] * scales.repeat_interleave(BLOCK)[:n])


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                n = p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                if not state:
                    blocks = -(-n // BLOCK)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    zero_signed = int(torch.argmin(SIGNED_MAP.abs()))
                    state["exp_avg"] = torch.full((n,), zero_signed, dtype=torch.uint8, device=p.device)
                    state["exp_avg_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                    state["exp_avg_sq_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["step"] += 1
                step = state["step"].item()
                bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
                lr, eps = group["lr"], group["eps"]
                local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard: its local part
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                n = local.numel()
                flat, grad = local.view(-1), grad.view(-1)
                signed, unsigned = SIGNED_MAP.to(p.device), UNSIGNED_MAP.to(p.device)
                for start in range(0, n, CHUNK):
                    stop = min(start + CHUNK, n)
                    b0, b1 = start // BLOCK, -(-stop // BLOCK)
                    m_codes, m_scales = state["exp_avg"][start:stop], state["exp_avg_scale"][b0:b1]
                    v_codes, v_scales = state["exp_avg_sq"][start:stop], state["exp_avg_sq_scale"][b0:b1]
                    g = grad[start:stop].float()
                    m = _dequantize(m_codes, m_scales, signed).mul_(beta1).add_(g, alpha=1 - beta1)
                    v = _dequantize(v_codes, v_scales, unsigned).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    chunk = flat[start:stop]
                    update = (m / bias1) / ((v / bias2).sqrt_().add_(eps))
                    if group["weight_decay"]:
                        chunk.mul_(1 - lr * group["weight_decay"])
                    chunk.add_(update.to(chunk.dtype), alpha=-lr)
                    _quantize(m, signed, m_codes, m_scales)
                    _quantize(v, unsigned, v_codes, v_scales)
        return loss


def relative_level_gap() -> float:
    """Adjacent levels' ratio minus one: the code's worst relative rounding is half of it."""
    return math.pow(10, 7 / 126) - 1
