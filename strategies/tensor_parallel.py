"""Tensor and sequence parallelism (Shoeybi et al. 2019, Megatron-LM; Korthikanti et al. 2022
for sequence parallelism) with DTensor's ``parallelize_module`` and a declarative plan.

Attention q, k, v and the MLP's first projections are column-parallel (each rank holds a slice
of the heads / FFN), the output projections row-parallel (partial sums all-reduced). With
sequence parallelism the norms and dropouts run on sequence shards, the all-reduce becomes a
reduce-scatter, and each block's input is all-gathered once (DTensor saves that gathered input
for backward, which the planner's ``pytorch`` engine semantics count). The embedding is
vocab-parallel; the head column-parallel with its logits left sharded over the vocabulary for
``loss_parallel``. Attention reshapes with the local head count (``Attention.forward``).
"""

from __future__ import annotations

import torch
from torch import nn

from strategies.model import Transformer


def block_plan(model: Transformer, sequence_parallel: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    gelu = model.spec.mlp == "gelu"
    first = ("mlp.fc1",) if gelu else ("mlp.gate", "mlp.up")
    last = "mlp.fc2" if gelu else "mlp.down"
    out = dict(output_layouts=Shard(1)) if sequence_parallel else {}
    plan = {
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.o": RowwiseParallel(**out),
        last: RowwiseParallel(**out),
        **{name: ColwiseParallel() for name in first},
    }
    if sequence_parallel:
        plan |= {
            "attn_norm": SequenceParallel(),
            "mlp_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                       desired_input_layouts=(Replicate(), None, None)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        }
    return plan


def _enable_async_tp(mesh) -> None:
    """Asynchronous TP as torchtitan enables it (torchtitan/distributed/tensor_parallel.py,
    ``maybe_enable_async_tp``): inductor's micro-pipeline TP pass rewrites each all-gather ->
    matmul and matmul -> reduce-scatter of the compiled blocks into the fused, pipelined ops of
    ``torch.distributed._symmetric_memory``, which need the group's symmetric memory (CUDA; on a
    CPU the layout is refused before a run starts, planner/capabilities.py)."""
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(mesh.get_group().group_name)


def apply_tensor_parallel(model: Transformer, mesh, cfg) -> Transformer:
    """``mesh``: the 1-D tensor-parallel mesh; ``cfg``: the TrainConfig."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if mesh.size() == 1:
        return model
    if cfg.async_tp:
        _enable_async_tp(mesh)
    # an untied model, no learned positions with sequence parallelism (planner/capabilities.py)
    sp = cfg.sequence_parallel
    top: dict[str, object] = {}
    if model.embed is not None:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate())
    if model.has_head:
        if sp:
            top["final_norm"] = SequenceParallel()
        top["head"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                      use_local_output=False)
    if top:
        parallelize_module(model, mesh, top)
    for block in model.layers.values():
        block = _unwrapped(block)
        parallelize_module(block, mesh, block_plan(model, sp))
        if not sp:
            replicate_module(block.attn_norm, mesh)
            replicate_module(block.mlp_norm, mesh)
    if not sp and model.has_head:
        replicate_module(model.final_norm, mesh)
    if model.pos_embed is not None:
        replicate_module(model.pos_embed, mesh)
    return model


def finish_tensor_parallel(model: Transformer, mesh) -> None:
    """After materialisation (which replaces the parameter objects): shard the embedding's
    gradient like its weight."""
    if mesh.size() > 1 and model.embed is not None:
        model.embed.weight.register_post_accumulate_grad_hook(_shard_like_param)


def _shard_like_param(param: torch.Tensor) -> None:
    """DTensor (torch 2.13) computes a vocab-parallel embedding's gradient as a replicated,
    full-vocabulary tensor on every rank; keep only this rank's vocabulary rows (a local slice,
    no communication), as the parameter is sharded -- the planner counts the shard."""
    grad = param.grad
    if grad is not None and hasattr(grad, "placements") and grad.placements != param.placements:
        from torch.distributed.tensor import DTensor

        local = grad.redistribute(param.device_mesh, param.placements).to_local().clone()  # drop the full buffer
        param.grad = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())


def replicate_module(module: nn.Module, mesh) -> None:
    """Parameters replicated on every tensor-parallel rank, as DTensors (so one fused optimizer
    step can take every parameter); inputs wrapped as replicated DTensors, outputs unwrapped."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def input_fn(mod, inputs, device_mesh):
        return tuple(DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)
                     if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

    def output_fn(mod, outputs, device_mesh):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)


def _unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)
