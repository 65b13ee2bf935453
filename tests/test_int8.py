"""INT8 kernels: error bounds against the fp32 reference (seed notes: BMInf's row/column absmax
INT8; Dettmers et al. 2022, LLM.int8(): outlier features above 6.0 kept in 16-bit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.catalog import load_model
from strategies.kernels.int8 import (
    Int8WeightOnlyLinear,
    LLMInt8Linear,
    W8A8Linear,
    int8_matmul,
    quantize_model,
    quantize_rows,
)
from strategies.model import build_model, materialize


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return nn.Linear(256, 128)


def _weight_bound(x, q):
    """Each weight is off by at most half its row's step: |y - y_fp| <= sum_k |x_k| * s_w / 2."""
    return x.abs().sum(-1, keepdim=True) * q.weight_scale[None, :] / 2


def test_quantize_rows_is_absmax_to_127():
    t = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -3.0]])
    q, scale = quantize_rows(t)
    assert q.dtype == torch.int8
    assert scale.tolist() == pytest.approx([2 / 127, 3 / 127])
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 127, -127]


def test_weight_only_error_bound_and_bytes(layer):
    x = torch.randn(32, 256)
    q = Int8WeightOnlyLinear(layer)
    with torch.no_grad():
        err = (q(x) - layer(x)).abs()
    assert torch.all(err <= _weight_bound(x, q) + 1e-5)
    assert (err.norm() / layer(x).norm()) < 0.01  # ~0.4% on Gaussian data
    assert q.weight_q.element_size() == 1 and q.weight_q.numel() == 256 * 128  # half of fp16


def test_int8_matmul_is_exact():
    a = torch.randint(-127, 128, (64, 256), dtype=torch.int8)
    b = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), a.to(torch.int64).mm(b.to(torch.int64).t()).to(torch.int32))
    small = int8_matmul(a[:4], b)  # M <= 16: the int32 fallback, also exact
    assert torch.equal(small, a[:4].int() @ b.int().t())


def test_w8a8_error_bound(layer):
    """W8A8 adds the activation's own rounding: + sum_k |w_k| * s_x / 2 (per token scale)."""
    x = torch.randn(32, 256)
    q = W8A8Linear(layer)
    with torch.no_grad():
        err = (q(x) - layer(x)).abs()
        _, x_scale = quantize_rows(x)
        w = q.dequantized_weight(torch.float32)
        bound = _weight_bound(x, q) + (x_scale[:, None] / 2) * w.abs().sum(-1)[None, :] + 1e-4
    assert torch.all(err <= bound)
    assert (err.norm() / layer(x).norm()) < 0.02


def test_llm_int8_keeps_outliers_in_16_bit(layer):
    """With a few feature dimensions 40-60x larger (the outliers LLM.int8() describes), per-token
    W8A8 loses the rest of the row to the outlier's scale; the mixed decomposition keeps them
    exact and stays near weight-only accuracy."""
    torch.manual_seed(1)
    x = torch.randn(64, 256)
    x[:, 7] *= 60
    x[:, 100] *= 40
    with torch.no_grad():
        ref = layer(x)
        w8a8 = ((W8A8Linear(layer)(x) - ref).norm() / ref.norm()).item()
        mixed_layer = LLMInt8Linear(layer)
        mixed = ((mixed_layer(x) - ref).norm() / ref.norm()).item()
        weight_only = ((Int8WeightOnlyLinear(layer)(x) - ref).norm() / ref.norm()).item()
    assert mixed_layer.last_outliers >= 2
    assert mixed < w8a8 / 5
    assert mixed < 2 * weight_only + 1e-3
    assert mixed < 0.01


def test_quantize_model_swaps_linears_but_the_head():
    spec = load_model("tiny-llama")
    torch.manual_seed(0)
    model = materialize(build_model(spec), "cpu")
    tokens = torch.randint(0, spec.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(tokens, tokens).item()
        quantize_model(model, "llm.int8")
        quantized = model(tokens, tokens).item()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "LLMInt8Linear" in kinds and isinstance(model.head, nn.Linear)
    assert quantized == pytest.approx(ref, rel=0.01)
    with pytest.raises(ValueError, match="unknown INT8 mode"):
        quantize_model(model, "int4")


@pytest.mark.gpu
def test_int_mm_on_cuda_matches_cpu():
    a = torch.randint(-127, 128, (64, 256), dtype=torch.int8)
    b = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
    assert torch.equal(int8_matmul(a.cuda(), b.cuda()).cpu(), int8_matmul(a, b))
