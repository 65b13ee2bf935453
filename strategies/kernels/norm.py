"""RMSNorm as one autograd node that saves only its input and the fp32 reciprocal RMS.

``torch.nn.functional.rms_norm`` on CPU (torch 2.13) is composite and saves the input twice,
the rstd and the normalised input -- an extra hidden-sized tensor per norm. Fused kernels
(Apex, Transformer Engine, Liger) save (x, rstd); so does this, which is what the planner's
activation model assumes (``planner/activations.py``: norm input + 4 bytes per token).
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = (xf * rstd).to(x.dtype) * weight
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf, g = x.float(), grad_out.float()
        normed = xf * rstd
        grad_weight = (g * normed).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gw = g * weight.float()
        grad_x = rstd * (gw - normed * (gw * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
