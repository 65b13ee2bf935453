"""The master-weight optimizer's dynamic loss scaling (fp16-mixed): an overflow skips the
step and halves the scale; finite gradients step; a simulated rank (FakeTensorMode, no
values) assumes finite gradients instead of failing on a data-dependent decision."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from strategies.kernels.optim import MasterWeightOptimizer


def _fp16_param(value: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full((4, 4), value, dtype=torch.float16))


def test_overflow_skips_the_step_and_halves_the_scale():
    p = _fp16_param(1.0)
    opt = MasterWeightOptimizer([p], impl="for-loop", loss_scaling=True, initial_scale=1024.0)
    p.grad = torch.full_like(p, float("inf"))
    opt.step()
    assert opt.skipped_steps == 1 and opt.scale == 512.0
    assert torch.equal(p.detach(), torch.ones(4, 4, dtype=torch.float16))
    p.grad = torch.full_like(p, 512.0)  # 1.0 after unscaling
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(p.detach(), torch.ones(4, 4, dtype=torch.float16))


def test_fake_tensors_assume_finite_gradients():
    with FakeTensorMode(allow_non_fake_inputs=True):
        p = _fp16_param(1.0)
        opt = MasterWeightOptimizer([p], impl="for-loop", loss_scaling=True)
        p.grad = torch.ones_like(p)
        opt.step()  # used to raise DataDependentOutputException (aten._local_scalar_dense)
    assert opt.skipped_steps == 0 and opt.scale == 2.0**16


def test_adamw8bit_tracks_adamw_and_stores_one_byte_per_state():
    """8-bit AdamW (Dettmers et al. 2022): m and v in one byte each plus an fp32 absmax per 256,
    as the planner counts; on the same problem its parameters follow fp32 AdamW's closely."""
    from planner.precision import optimizer_state_bytes
    from strategies.kernels.adam8bit import AdamW8bit
    from strategies.kernels.optim import state_tensors

    torch.manual_seed(0)
    target = torch.randn(300, 70)
    x = torch.randn(64, 300)
    params = {name: torch.nn.Parameter(torch.zeros(70, 300)) for name in ("fp32", "8bit")}
    opts = {"fp32": torch.optim.AdamW([params["fp32"]], lr=1e-2, weight_decay=0.0),
            "8bit": AdamW8bit([params["8bit"]], lr=1e-2, weight_decay=0.0)}
    losses = {name: [] for name in params}
    for _ in range(50):
        for name, p in params.items():
            loss = (x @ p.T - x @ target).pow(2).mean()
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            losses[name].append(loss.item())
    assert losses["8bit"][-1] < 0.5 * losses["8bit"][0]
    assert abs(losses["8bit"][-1] - losses["fp32"][-1]) < 0.05 * losses["fp32"][0]
    gap = (params["8bit"] - params["fp32"]).norm() / params["fp32"].norm()
    assert gap < 0.1, gap  # measured 7.9%: m and v each within 3.2% (half a level), per step
    stored = sum(t.numel() * t.element_size() for t in state_tensors(opts["8bit"]))
    assert stored == optimizer_state_bytes("adamw8bit", 70 * 300, 4) == 2 * (21000 + 4 * 83)


def test_adamw8bit_code_keeps_small_and_large_entries():
    """The dynamic code's levels are log-spaced: entries from 1e-7 to 1 of a block's absmax come
    back within half a level gap (relative)."""
    from strategies.kernels.adam8bit import SIGNED_MAP, _dequantize, _quantize, relative_level_gap

    values = torch.cat((torch.logspace(-7, 0, 256), -torch.logspace(-6, 0, 256)))
    codes, scales = torch.empty(512, dtype=torch.uint8), torch.empty(2)
    _quantize(values, SIGNED_MAP, codes, scales)
    back = _dequantize(codes, scales, SIGNED_MAP)
    assert torch.all((back - values).abs() <= values.abs() * relative_level_gap() / 2 * 1.001)
