"""``parallelize``: one fixed, readable order (torchtitan's): pipeline split -> tensor (and
sequence) parallel -> activation checkpointing -> compile -> FSDP2 (ZeRO-2/3, offload) ->
materialise on the device -> DDP (DDP, ZeRO-1) -> optimizer (ZeRO-1 shards it) -> schedule.
What it does not build is refused before a run starts (planner/capabilities.py run_refusal)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from planner.configs import TrainConfig
from planner.precision import FLOAT8_RECIPES
from strategies.checkpointing import (
    apply_activation_checkpointing,
    set_attention_kernel,
)
from strategies.ddp import apply_ddp
from strategies.expert_parallel import apply_expert_parallel, expert_mesh
from strategies.fsdp import apply_fsdp
from strategies.kernels.optim import InBackwardOptimizer, MasterWeightOptimizer, make_optimizer
from strategies.lora import apply_lora, quantize_base
from strategies.context_parallel import apply_context_parallel
from strategies.mesh import ParallelDims, shard_mesh
from strategies.model import Transformer, materialize
from strategies.offload import apply_offload
from strategies.pipeline import Pipeline, apply_pipeline, stage_modules
from strategies.precision import PrecisionPlan, apply_float8, precision_plan
from strategies.tensor_parallel import apply_tensor_parallel, finish_tensor_parallel
from strategies.zero1 import apply_zero1


@dataclass
class Parallelized:
    modules: list[nn.Module]  # what this rank runs: the model (maybe DDP-wrapped) or its stage chunks
    optimizer: torch.optim.Optimizer
    pipeline: Pipeline | None
    precision: PrecisionPlan
    mesh: object
    device: torch.device
    cfg: TrainConfig
    notes: list[str] = field(default_factory=list)
    simulated_ddp: bool = False
    teacher: nn.Module | None = None  # distillation's frozen teacher (not wrapped, not optimised)

    @property
    def loss_parallel(self) -> bool:
        return self.cfg.tp > 1

    @property
    def ddp(self) -> bool:
        return self.simulated_ddp or any(type(m).__name__ == "DistributedDataParallel" for m in self.modules)

    def parameters(self):
        for module in self.modules + ([self.teacher] if self.teacher is not None else []):
            yield from module.parameters()


def build_mesh(cfg: TrainConfig, world: int, device: torch.device):
    return ParallelDims(dp=cfg.dp, tp=cfg.tp, pp=cfg.pp, world=world, cp=cfg.cp).build_mesh(device.type)


def parallelize(model: Transformer, cfg: TrainConfig, world: int, rank: int, device: torch.device,
                seed: int = 0, mesh=None, fake=None, simulated: bool = False) -> Parallelized:
    """``model`` is built on the meta device; returns this rank's materialised share.

    Simulating a rank of a larger world (a fake process group): pass the ``mesh`` built
    beforehand and the FakeTensorMode as ``fake``; the layout is transformed on the meta
    device and only materialised (as fake tensors) under it. DDP's reducer needs real
    storage, so a simulated DDP rank keeps plain modules (``Parallelized.keep_grads`` models
    its buckets)."""
    mesh = mesh if mesh is not None else build_mesh(cfg, world, device)
    fake = fake if fake is not None else nullcontext()
    sharded = cfg.zero_stage >= 2
    precision = precision_plan(cfg.precision, sharded)
    shards = shard_mesh(mesh, cfg.cp)
    offload = apply_offload(model, shards, cfg, device.type)

    sparse = expert_mesh(mesh, cfg, device.type) if cfg.ep > 1 else None
    pp_rank = mesh["pp"].get_local_rank()
    stages = stage_modules(model, pp_rank, cfg) if cfg.pp > 1 else [(0, model)]
    modules = []
    finetune = cfg.finetune != "full"
    for _, module in stages:
        set_attention_kernel(module, cfg.attention)
        if cfg.precision in FLOAT8_RECIPES:
            apply_float8(module, cfg)
        if finetune:
            apply_lora(module, cfg)
        apply_tensor_parallel(module, mesh["tp"], cfg)
        if sparse is not None:
            apply_expert_parallel(module, sparse)
        apply_context_parallel(module, mesh["cp"] if cfg.cp > 1 else None, cfg)
        apply_activation_checkpointing(module, mesh, cfg)
        if cfg.compile:
            for name, block in list(module.layers.items()):
                module.layers[name] = torch.compile(block)
        if sharded:
            apply_fsdp(module, shards, cfg, precision.mp_policy(), offload.fsdp_policy, sparse)
        with fake:
            materialize(module, "cpu" if cfg.offload == "params" else device, seed, buffer_device=device)
            if finetune:
                quantize_base(module, cfg)
        finish_tensor_parallel(module, mesh["tp"])
        modules.append(module)
    if not sharded and not simulated:
        device_ids = [device.index] if device.type == "cuda" else None
        modules = [apply_ddp(module, shards, cfg, device_ids) for module in modules]
        for i, (index, _) in enumerate(stages):
            stages[i] = (index, modules[i])

    with fake:
        return _finish(modules, stages, cfg, precision, offload, mesh, device, simulated)


def _finish(modules, stages, cfg, precision, offload, mesh, device, simulated) -> Parallelized:
    # what trains (a LoRA fine-tune: the adapters); the frozen base gets no optimizer state
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    if cfg.optimizer_in_backward:  # one process, no offload (planner/capabilities.py)
        fp32_adapters = cfg.finetune != "full" and cfg.lora_dtype == "fp32"

        def build(one):
            if precision.master_weights and not fp32_adapters:
                return MasterWeightOptimizer(one, name=cfg.optimizer, impl=cfg.optimizer_impl,
                                             loss_scaling=precision.loss_scaling)
            return make_optimizer(one, cfg.optimizer, cfg.optimizer_impl)

        optimizer = InBackwardOptimizer(params, build)
        par = Parallelized(modules, optimizer, None, precision, mesh, device, cfg)
        return par
    if cfg.zero_stage == 1:
        masters = precision.master_weights and not (cfg.finetune != "full" and cfg.lora_dtype == "fp32")
        optimizer = apply_zero1(params, shard_mesh(mesh, cfg.cp), cfg, masters, precision.loss_scaling,
                                offload.optimizer_state_device)  # offload=params needs ZeRO-3, never here
    elif cfg.finetune != "full" and cfg.lora_dtype == "fp32":
        optimizer = make_optimizer(params, cfg.optimizer, cfg.optimizer_impl)  # fp32 adapters need no master
    elif precision.master_weights or cfg.offload == "optimizer":
        optimizer = MasterWeightOptimizer(params, name=cfg.optimizer, impl=cfg.optimizer_impl,
                                          state_device=offload.optimizer_state_device,
                                          loss_scaling=precision.loss_scaling)
    else:
        optimizer = make_optimizer(params, cfg.optimizer, cfg.optimizer_impl)
    pipeline = apply_pipeline(stages, mesh["pp"], cfg, device, precision, simulated) if cfg.pp > 1 else None
    par = Parallelized(modules, optimizer, pipeline, precision, mesh, device, cfg)
    par.simulated_ddp = simulated and cfg.zero_stage <= 1 and cfg.shard_world > 1
    return par
