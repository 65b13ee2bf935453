"""Optimizers: fused / foreach / single-tensor AdamW and SGD, and a master-weight optimizer
that keeps fp32 copies of 16-bit parameters (optionally on the host: ZeRO-Offload).

``MasterWeightOptimizer`` is an ``Optimizer`` whose per-parameter state holds the fp32 master
(``state[p]["master"]``) and whose inner optimizer holds Adam's m and v for the masters, so a
memory tracker that reads optimizer state sees master + m + v: the planner's ``optimizer``
component (ZeRO paper: 4 + 4 + 4 bytes per parameter). Gradients are cast to fp32 during the
step (the planner's ``fp32_grad_copy`` temporary). It works on plain tensors and on DTensor
shards (FSDP2, tensor parallelism): it updates each rank's local shard.

With fp16 parameters it also does dynamic loss scaling: ``scale_loss`` multiplies the loss,
``step`` unscales, skips the step on inf/NaN (agreed across ranks) and adapts the scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, momentum=0.9)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_class_and_kwargs(name: str = "adamw", impl: str = "fused",
                               lr: float = DEFAULTS["lr"]) -> tuple[type, dict]:
    """AdamW or SGD with the implementation the planner names: fused (one kernel per step),
    foreach (multi-tensor, one state-sized scratch list), for-loop (per tensor)."""
    impl_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    if name == "adamw8bit":  # its own per-tensor loop (strategies/kernels/adam8bit.py)
        from strategies.kernels.adam8bit import AdamW8bit

        return AdamW8bit, dict(lr=lr, betas=DEFAULTS["betas"], eps=DEFAULTS["eps"],
                               weight_decay=DEFAULTS["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD, dict(lr=lr, momentum=DEFAULTS["momentum"], **impl_kw)
    return torch.optim.AdamW, dict(lr=lr, betas=DEFAULTS["betas"], eps=DEFAULTS["eps"],
                                   weight_decay=DEFAULTS["weight_decay"], **impl_kw)


def make_optimizer(params, name: str = "adamw", impl: str = "fused", lr: float = DEFAULTS["lr"]) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_class_and_kwargs(name, impl, lr)
    return cls(list(params), **kwargs)


class MasterWeightOptimizer(torch.optim.Optimizer):
    def __init__(self, params, lr: float = DEFAULTS["lr"], name: str = "adamw", impl: str = "fused",
                 state_device: str | torch.device | None = None, loss_scaling: bool = False,
                 initial_scale: float = 2.0**16, growth_interval: int = 2000):
        super().__init__(params, dict(lr=lr))
        self.name, self.impl, self.state_device = name, impl, state_device
        self.loss_scaling = loss_scaling
        self.scale = initial_scale if loss_scaling else 1.0
        self.growth_interval = growth_interval
        self._good_steps = 0
        self.skipped_steps = 0
        self._inner: torch.optim.Optimizer | None = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.loss_scaling else loss

    def _masters(self) -> list[torch.Tensor]:
        masters = []
        for group in self.param_groups:
            for p in group["params"]:
                local = _local(p)
                if local.numel() == 0:
                    continue
                state = self.state[p]
                if "master" not in state:
                    device = self.state_device or local.device
                    state["master"] = local.detach().to(device=device, dtype=torch.float32, copy=True)
                masters.append((p, state["master"]))
        return masters

    @torch.no_grad()
    def step(self, closure=None):
        pairs = self._masters()
        if self._inner is None:
            self._inner = make_optimizer([m for _, m in pairs], self.name, self.impl, self.param_groups[0]["lr"])
        found_inf = torch.zeros((), dtype=torch.float32, device=pairs[0][1].device if pairs else "cpu")
        for p, master in pairs:
            grad = p.grad
            if grad is None:
                master.grad = None
                continue
            master.grad = _local(grad).to(device=master.device, dtype=torch.float32)
            if self.loss_scaling:
                master.grad.mul_(1.0 / self.scale)
                found_inf = torch.maximum(found_inf, (~torch.isfinite(master.grad)).any().float())
        if self.loss_scaling:
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            if _overflowed(found_inf):
                self.scale /= 2.0
                self._good_steps = 0
                self.skipped_steps += 1
                for _, master in pairs:
                    master.grad = None
                return None
            self._good_steps += 1
            if self._good_steps % self.growth_interval == 0:
                self.scale *= 2.0
        self._inner.step()
        for p, master in pairs:
            master.grad = None
            _local(p).copy_(master)
        return None

    def inner_state_tensors(self) -> list[torch.Tensor]:
        if self._inner is None:
            return []
        return [t for state in self._inner.state.values() for t in state.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0]


def _overflowed(found_inf: torch.Tensor) -> bool:
    """The loss scaler's decision is data. A simulated rank (FakeTensorMode) has shapes but no
    values: assume finite gradients, the common case, so the step runs and its memory is
    measured (the isfinite checks above still allocate what they allocate on a real rank)."""
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(found_inf) and found_inf.item() > 0


class InBackwardOptimizer(torch.optim.Optimizer):
    """The optimizer step fused into the backward pass (PyTorch's recipe, "How to save memory
    by fusing the optimizer step into the backward pass"): every parameter has its own optimizer,
    stepped by a post-accumulate-grad hook the moment its gradient is complete, which then frees
    the gradient. No gradients outlive their own step; ``step`` and ``zero_grad`` do nothing. It
    cannot accumulate gradients over micro-batches, and it is a single-process optimizer here (a
    data-parallel gradient must be reduced before its step)."""

    def __init__(self, params, build):
        params = [p for p in params if p.requires_grad]
        super().__init__(params, {})
        self.inner = {p: build([p]) for p in params}
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, param: torch.Tensor) -> None:
        self.inner[param].step()
        param.grad = None

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.inner.values())


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer keeps between steps, through wrappers
    (ZeroRedundancyOptimizer's local optimizer, MasterWeightOptimizer's inner one, the
    per-parameter optimizers of an optimizer in backward)."""
    if isinstance(optimizer, InBackwardOptimizer):
        return [t for inner in optimizer.inner_optimizers() for t in state_tensors(inner)]
    inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        return state_tensors(inner)
    # 0-d tensors are step counters
    tensors = [t for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0]
    if isinstance(optimizer, MasterWeightOptimizer):
        tensors += optimizer.inner_state_tensors()
    return tensors
