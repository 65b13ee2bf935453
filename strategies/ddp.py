"""Data parallelism with PyTorch's DistributedDataParallel (Li et al. 2020): every rank holds
the whole model, gradients are all-reduced in buckets (``bucket_cap_mb``) overlapping the
backward. ``gradient_as_bucket_view=True`` makes ``param.grad`` views into the buckets, so the
gradients cost their bytes once, and the buckets outlive ``zero_grad`` (the planner counts
DDP gradients as resident in every phase). DDP beside tensor or pipeline parallelism is refused
before a run starts (planner/capabilities.py)."""

from __future__ import annotations

from torch import nn


def apply_ddp(model: nn.Module, mesh, cfg, device_ids=None) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if mesh.size() == 1:
        return model  # one data-parallel rank: nothing to all-reduce
    return DistributedDataParallel(model, process_group=mesh.get_group(), device_ids=device_ids,
                                   bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True)
