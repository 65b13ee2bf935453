"""ZeRO-1 (Rajbhandari et al. 2019, P_os): optimizer state sharded over the data-parallel group
with ``ZeroRedundancyOptimizer`` on top of DDP. It gives each rank whole tensors (largest
first, to the least-loaded rank), so shares are uneven; after its local step each rank
broadcasts the parameters it owns."""

from __future__ import annotations

from strategies.kernels.optim import (
    DEFAULTS,
    MasterWeightOptimizer,
    optimizer_class_and_kwargs,
)


def apply_zero1(params, mesh, cfg, master_weights: bool, loss_scaling: bool, state_device=None):
    """Returns the sharded optimizer (the model is already wrapped in DDP)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = list(params)
    if master_weights or state_device is not None:
        return ZeroRedundancyOptimizer(params, optimizer_class=MasterWeightOptimizer, process_group=mesh.get_group(),
                                       lr=DEFAULTS["lr"], name=cfg.optimizer, impl=cfg.optimizer_impl,
                                       state_device=state_device, loss_scaling=loss_scaling)
    cls, kwargs = optimizer_class_and_kwargs(cfg.optimizer, cfg.optimizer_impl)
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=mesh.get_group(), **kwargs)
