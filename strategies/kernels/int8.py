"""INT8 linear layers, as the seed notes describe them (BMInf; Dettmers et al. 2022, LLM.int8()).

- **weight-only** (``Int8WeightOnlyLinear``): each output row of W scaled by its absmax to
  [-127, 127] and stored as int8 (half of fp16's bytes); the matmul runs in the activation's
  dtype on the int8 values and the row scales are applied to the output columns.
- **W8A8** (``W8A8Linear``): activations quantized per token (row absmax), weights per output
  channel; int8 x int8 -> int32 with ``torch._int_mm`` where the device has it, rescaled by
  the row and column factors: y = (x_q W_q^T) * s_x s_w^T.
- **LLM.int8() mixed decomposition** (``LLMInt8Linear``): feature dimensions of the input whose
  magnitude exceeds a threshold (6.0) anywhere in the batch are outliers; those columns are
  multiplied in 16-bit with the dequantized weight columns, the rest through W8A8.

Error bounds (tested): weight-only |y - y_fp| <= sum_k |x_k| s_w/2 per output (each weight is
off by at most half a quantization step); W8A8 adds the activation term sum_k |w_k| s_x/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127
MIN_ROWS = 32  # torch._int_mm needs more than 16 rows (planner/inference.py: W8A8_MIN_ROWS)
OUTLIER_THRESHOLD = 6.0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of each row (last dimension) to int8; returns (q, scale)
    with t ~ q * scale[..., None]."""
    absmax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = absmax / QMAX
    q = torch.round(t.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.squeeze(-1)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N], exact. ``torch._int_mm`` on CUDA (needs
    M > 16 and K, N multiples of 8) and on CPU; otherwise an int32 matmul."""
    m, k = a.shape
    n = b_t.shape[0]
    if k % 8 == 0 and n % 8 == 0 and hasattr(torch, "_int_mm"):
        # fewer than 17 rows (decoding a small batch): pad to MIN_ROWS rather than fall back to an
        # int32 copy of the whole weight
        rows = a if m > 16 else torch.cat((a, a.new_zeros(MIN_ROWS - m, k)))
        try:
            return torch._int_mm(rows.contiguous(), b_t.t())[:m]
        except RuntimeError:
            pass  # this device has no int8 GEMM for these shapes
    return a.to(torch.int32) @ b_t.to(torch.int32).t()


class _QuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.data)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_q.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(_QuantizedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_q.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return self._finish(y)


class W8A8Linear(_QuantizedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        x_q, x_scale = quantize_rows(flat)
        y = int8_matmul(x_q, self.weight_q).float() * x_scale[:, None] * self.weight_scale[None, :]
        return self._finish(y.to(x.dtype).reshape(*shape[:-1], self.out_features))


class LLMInt8Linear(_QuantizedLinear):
    def __init__(self, linear: nn.Linear, threshold: float = OUTLIER_THRESHOLD):
        super().__init__(linear)
        self.threshold = threshold
        self.last_outliers = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        outliers = (flat.abs() > self.threshold).any(dim=0)
        self.last_outliers = int(outliers.sum())
        regular = flat.masked_fill(outliers, 0)
        x_q, x_scale = quantize_rows(regular)
        y = int8_matmul(x_q, self.weight_q).float() * x_scale[:, None] * self.weight_scale[None, :]
        if self.last_outliers:
            columns = outliers.nonzero().squeeze(-1)
            w_cols = self.weight_q[:, columns].to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            y = y + (flat[:, columns] @ w_cols.t()).float()
        return self._finish(y.to(x.dtype).reshape(*shape[:-1], self.out_features))


MODES = {"weight-only": Int8WeightOnlyLinear, "w8a8": W8A8Linear, "llm.int8": LLMInt8Linear}


def quantize_model(model: nn.Module, mode: str, skip: tuple[str, ...] = ("head",)) -> nn.Module:
    """Swap every ``nn.Linear`` (but those named in ``skip``, by default the output head, which
    LLM.int8() keeps in 16-bit) for its INT8 version. In place; returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown INT8 mode {mode!r}; use one of {', '.join(MODES)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(full == s or full.endswith("." + s) for s in skip):
                setattr(module, child_name, MODES[mode](child))
    return model
