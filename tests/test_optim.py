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
