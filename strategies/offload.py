"""Offloading to host memory (ZeRO-Offload, Ren et al. 2021; ZeRO-Infinity for parameters).

``optimizer``: gradients go to the host after backward, the fp32 master weights and Adam
state live there, the update runs on the CPU and the new 16-bit parameters come back -- a
``MasterWeightOptimizer`` with ``state_device="cpu"`` (ZeRO-1/2/3). ``params`` (ZeRO-3):
FSDP2's ``CPUOffloadPolicy`` keeps parameter and gradient shards on the host and gathers
through the GPU; the optimizer then steps on the CPU. Pinned host memory needs an
accelerator, so on CPU the policy runs with ``pin_memory=False`` (torch 2.13 raises "Cannot
access accelerator device" otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OffloadPlan:
    fsdp_policy: object | None
    optimizer_state_device: str | None


def apply_offload(model, mesh, cfg, device_type: str) -> OffloadPlan:
    if cfg.offload == "none":
        return OffloadPlan(None, None)
    if cfg.offload == "params":
        from torch.distributed.fsdp import CPUOffloadPolicy

        return OffloadPlan(CPUOffloadPolicy(pin_memory=device_type == "cuda"), "cpu")
    return OffloadPlan(None, "cpu")
