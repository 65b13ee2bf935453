"""ZeRO-2 and ZeRO-3 (Rajbhandari et al. 2019) with FSDP2's ``fully_shard``.

Each block is one FSDP unit, so is the embedding side (token and position embeddings, the
embedding norm) and the final norm + head; the root takes what is left (nothing with weights).
``reshard_after_forward=True`` frees each unit's gathered parameters after its forward and
gathers them again for backward: ZeRO-3. ``False`` keeps them from the forward to
the unit's backward, so between steps only shards remain: ZeRO-2 as FSDP2 runs it (the
planner's ``pytorch`` engine: a parameter shard plus gathered parameters during the step).
Gradients are reduce-scattered per unit into fp32 or parameter-dtype shards.
"""

from __future__ import annotations

from strategies.model import Transformer


def apply_fsdp(model: Transformer, mesh, cfg, mp_policy=None, offload_policy=None, sparse=None) -> Transformer:
    """``mesh``: the data-parallel mesh (1-D, or the dp dimension of a dp x tp mesh); ``sparse``:
    expert parallelism's ``(pp, efsdp, ep)`` mesh (strategies/expert_parallel.py)."""
    from torch.distributed.fsdp import fully_shard

    from strategies.expert_parallel import placement_fn

    kwargs = dict(mesh=mesh, reshard_after_forward=cfg.zero_stage >= 3)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    if model.embed is not None:
        # One unit for the embedding side (token and position embeddings, the embedding norm),
        # as the planner's inventory has it. A tied head multiplies by the embedding's weight
        # after the embedding's forward, outside its unit: that unit stays gathered from its
        # forward to its backward.
        embedding = [m for m in (model.embed, model.pos_embed, model.embed_norm) if m is not None]
        tied = model.spec.tied_embeddings and model.has_head
        fully_shard(embedding if len(embedding) > 1 else embedding[0],
                    **(kwargs | {"reshard_after_forward": False} if tied else kwargs))
    place = placement_fn(model, mesh, sparse, cfg)  # an MoE's routed experts shard on their own terms
    for block in model.layers.values():
        fully_shard(block, **(kwargs | {"shard_placement_fn": place} if place else kwargs))
    if model.has_head:
        fully_shard([model.final_norm, model.head] if model.head is not None else model.final_norm, **kwargs)
    fully_shard(model, **kwargs)
    return model
