"""ZeRO-2 and ZeRO-3 (Rajbhandari et al. 2019) with FSDP2's ``fully_shard``.

Each block is one FSDP unit, so is the embedding and the final norm + head; the root takes
what is left. ``reshard_after_forward=True`` frees each unit's gathered parameters after its
forward and gathers them again for backward: ZeRO-3. ``False`` keeps them from the forward to
the unit's backward, so between steps only shards remain: ZeRO-2 as FSDP2 runs it (the
planner's ``pytorch`` engine: a parameter shard plus gathered parameters during the step).
Gradients are reduce-scattered per unit into fp32 or parameter-dtype shards.
"""

from __future__ import annotations

from strategies.model import Transformer


def apply_fsdp(model: Transformer, mesh, cfg, mp_policy=None, offload_policy=None) -> Transformer:
    """``mesh``: the data-parallel mesh (1-D, or the dp dimension of a dp x tp mesh)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = dict(mesh=mesh, reshard_after_forward=cfg.zero_stage >= 3)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    if model.embed is not None:
        fully_shard(model.embed, **kwargs)
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    if model.has_head:
        fully_shard([model.final_norm, model.head] if model.head is not None else model.final_norm, **kwargs)
    fully_shard(model, **kwargs)
    return model
