"""Pipeline parallelism with ``torch.distributed.pipelining``: GPipe (Huang et al. 2019),
1F1B (Narayanan et al. 2021, PipeDream-Flush) and interleaved 1F1B (Narayanan et al. 2021).

The model is cut into ``pp x chunks`` contiguous chunks of layers exactly as the planner cuts
it (``planner.params.split_layers``): the embedding on the first, final norm and head on the
last; rank r runs chunks r, r + pp, ... . Each chunk is a ``Transformer`` with the layers it
does not hold removed, so parameter names stay those of the full model. The last stage emits
logits and the schedule's ``loss_fn`` computes the loss, scaled by 1/m (``scale_grads``).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from planner.params import split_layers
from strategies.model import Transformer


def stage_modules(model: Transformer, pp_rank: int, cfg) -> list[tuple[int, Transformer]]:
    """(chunk index, module) for every chunk this pipeline rank runs, cut from a meta model."""
    pp, chunks = cfg.pp, cfg.chunks
    total = pp * chunks
    bounds = split_layers(len(model.layers), total)
    held = []
    for c in range(chunks):
        index = pp_rank + c * pp
        lo, hi = bounds[index]
        stage = copy.deepcopy(model)
        for name in [n for n in stage.layers if not lo <= int(n) < hi]:
            del stage.layers[name]
        if index != 0:
            stage.embed, stage.pos_embed, stage.embed_norm = None, None, None
        if index != total - 1:
            stage.final_norm, stage.head, stage.has_head = None, None, False
        held.append((index, stage))
    return held


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))


@dataclass
class Pipeline:
    schedule: object
    has_first: bool
    has_last: bool

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        # return_outputs=False: the schedule would otherwise keep every micro-batch's stage
        # output (the logits, on the last stage) until the next step, to return them merged.
        extra = {"return_outputs": False} if "return_outputs" in inspect.signature(self.schedule.step).parameters else {}
        self.schedule.step(*args, target=targets if self.has_last else None,
                           losses=losses if self.has_last else None, **extra)
        return losses


def _static_shapes(index: int, total: int, spec, cfg, precision) -> dict:
    """Example input and output of pipeline stage ``index`` (meta tensors): token ids into the
    first, the residual stream between stages, logits out of the last. Given these, the stages
    skip the shape exchange of their first step (PipelineStage's static mode)."""
    shape = (cfg.micro_batch, cfg.seq_len)
    hidden = precision.fsdp_param_dtype or precision.param_dtype  # the residual stream's dtype
    logits = precision.fsdp_param_dtype or precision.autocast_dtype or precision.param_dtype
    stream = torch.empty(*shape, spec.hidden_size, dtype=hidden, device="meta", requires_grad=True)
    inputs = torch.empty(shape, dtype=torch.long, device="meta") if index == 0 else stream
    outputs = (torch.empty(*shape, spec.vocab_size, dtype=logits, device="meta", requires_grad=True)
               if index == total - 1 else stream)
    return {"input_args": inputs, "output_args": outputs}


def _static_start(schedule) -> None:
    """A fake process group carries no values, so the schedule's start-up vote on static shapes
    (``_warmup_p2p``: every stage votes, the product travels to the last stage and back) is
    answered here with the result every stage would give: all shapes are static."""
    from torch.distributed.pipelining._utils import InferenceMode

    def static(stages, *_):
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedule._warmup_p2p = static


def apply_pipeline(stages: list[tuple[int, Transformer]], mesh, cfg, device, precision=None,
                   simulated: bool = False) -> Pipeline:
    """Builds the schedule for this rank's (already parallelized, materialised) stage modules.
    ``simulated``: one rank of a larger world on a fake process group, which cannot carry the
    shapes the stages exchange on their first step: they are given (static mode) instead."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    total = cfg.pp * cfg.chunks
    group = mesh.get_group()
    pipeline_stages = []
    for index, module in stages:
        shapes = _static_shapes(index, total, module.spec, cfg, precision) if simulated else {}
        pipeline_stages.append(PipelineStage(module, index, total, device, group=group, **shapes))
    m = cfg.num_microbatches
    if cfg.schedule == "interleaved":
        schedule = ScheduleInterleaved1F1B(pipeline_stages, n_microbatches=m, loss_fn=pipeline_loss)
    elif cfg.schedule == "gpipe":
        schedule = ScheduleGPipe(pipeline_stages[0], n_microbatches=m, loss_fn=pipeline_loss)
    else:
        schedule = Schedule1F1B(pipeline_stages[0], n_microbatches=m, loss_fn=pipeline_loss)
    if simulated:
        _static_start(schedule)
    indices = [index for index, _ in stages]
    return Pipeline(schedule, has_first=0 in indices, has_last=total - 1 in indices)
