"""Expert parallelism as torchtitan 0.3.0 builds it (torchtitan/distributed/parallel_dims.py,
models/common/moe_sharding.py, models/common/token_dispatcher.py), with --tp 1:

- the data-parallel shard group (dp x cp) splits into ``efsdp`` x ``ep``, ep fastest
  (torchtitan's sparse mesh ``("pp", "dp_replicate", "efsdp", "ep")``): efsdp = dp x cp / ep;
- each MoE layer's routed experts are DTensors ``Shard(0)`` over ``ep``: a rank holds
  ``num_experts / ep`` whole experts, and FSDP2 shards those over ``efsdp`` -- on dim 1 when
  efsdp x ep exceeds the experts (torchtitan/distributed/fsdp.py); the router, shared experts
  and every other tensor shard over the dense group as without experts;
- a layer's routed rows (grouped by expert) go to the rank owning their experts in one
  ``all_to_all_single`` (after one exchanging the counts), are permuted to expert order, run
  through the local experts' grouped GEMMs, permuted back and returned in a second
  all-to-all (``AllToAllTokenDispatcher``'s dispatch and combine).

gloo runs ``all_to_all_single`` on CPU, so CI runs this.
"""

from __future__ import annotations

import torch



def expert_mesh(mesh, cfg, device_type: str):
    """The sparse mesh ``(pp, efsdp, ep)`` over the same ranks as ``mesh`` (tp = 1: a rank's
    index in the shard group is its rank within the pipeline stage)."""
    from torch.distributed.device_mesh import DeviceMesh

    shard = cfg.dp * cfg.cp
    ranks = torch.arange(cfg.gpus).reshape(cfg.pp, shard // cfg.ep, cfg.ep)
    return DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "efsdp", "ep"))


def moe_blocks(model) -> list:
    """The model's MoE blocks (strategies/model.py ``MoE``, known by its expert-parallel group:
    this module is imported by that one, so it does not import it back)."""
    return [m for m in model.modules() if hasattr(m, "ep_group") and hasattr(m, "experts")]


def apply_expert_parallel(model, sparse) -> None:
    """Split every MoE layer's routed experts over ``sparse["ep"]`` (on the meta device,
    before FSDP2 and before materialising: each rank then fills its slice of the same initial
    value, ``strategies.model.materialize``)."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = sparse["ep"]
    for moe in moe_blocks(model):
        for stacked in moe.experts.values():
            for name, param in list(stacked.named_parameters(recurse=False)):
                stacked.register_parameter(name, nn.Parameter(distribute_tensor(param, ep, [Shard(0)]),
                                                              requires_grad=param.requires_grad))  # LoRA: frozen
        moe.ep_group = ep.get_group()


def placement_fn(model, dense_mesh, sparse, cfg):
    """FSDP2's ``shard_placement_fn`` for the blocks: routed experts' parameters on the
    experts' own shard group (``efsdp``) with expert parallelism, and on dim 1 when that group
    times ep exceeds the experts (else dim 0); every other parameter ``Shard(0)`` over the
    dense group (torchtitan/distributed/fsdp.py ``apply_fsdp_to_decoder``: one ``fully_shard``
    per block with a per-parameter mesh). None for a dense model."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import ShardPlacementResult
    from torch.distributed.fsdp._fully_shard._fsdp_init import _get_mesh_info
    from torch.distributed.tensor import Shard

    blocks = moe_blocks(model)
    if not blocks:
        return None
    experts = {id(p) for moe in blocks for p in moe.experts.parameters()}
    num_experts = blocks[0].num_experts
    if sparse is None:  # no expert parallelism: the dense group, dim 1 when it exceeds the experts
        dim = 1 if dense_mesh.size() > num_experts else 0
        return lambda p: Shard(dim if id(p) in experts else 0)
    efsdp = sparse["efsdp"]
    dim = 1 if efsdp.size() * cfg.ep > num_experts else 0
    expert_info, dense_info = _get_mesh_info(efsdp, None), _get_mesh_info(dense_mesh, None)

    def place(p):
        if id(p) in experts:
            return ShardPlacementResult(placement=Shard(dim), mesh_info=expert_info)
        return ShardPlacementResult(placement=Shard(0), mesh_info=dense_info)

    return place


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def dispatch_and_combine(rows: torch.Tensor, counts: torch.Tensor, experts, group) -> torch.Tensor:
    """``rows`` grouped by global expert (``counts`` of each) -> each row's expert output, the
    experts run where they live. ``experts(rows, local_counts)`` runs this rank's experts."""
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    ep = dist.get_world_size(group)
    local_experts = len(counts) // ep
    with torch.no_grad():
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)  # counts for my experts, per source
        received = received.view(ep, local_experts)
        if _fake(rows):
            # a simulated rank's routing has no values: balanced, as the plan assumes (every rank
            # sends and receives its rows' 1/ep share), in the same tensors' shapes
            send_splits = [len(rows) // ep] * ep
            send_splits[-1] = len(rows) - sum(send_splits[:-1])
            recv_splits = send_splits
            expert_of_row = torch.arange(len(rows), device=rows.device) % local_experts
        else:
            send_splits = counts.view(ep, local_experts).sum(1).tolist()
            recv_splits = received.sum(1).tolist()
            # the received rows are source-major; expert-major is what the grouped GEMMs need
            expert_of_row = torch.repeat_interleave(torch.arange(local_experts, device=rows.device).repeat(ep),
                                                    received.flatten())
        permutation = expert_of_row.argsort(stable=True)
        inverse = permutation.argsort()
    arrived = all_to_all_single_autograd(rows, recv_splits, send_splits, group)
    out = experts(arrived[permutation], received.sum(0))
    # back to source order by gathering with the inverse permutation: an index keeps only its
    # indices (index_copy would keep the rows too, its derivative naming its source)
    return all_to_all_single_autograd(out[inverse], send_splits, recv_splits, group)
