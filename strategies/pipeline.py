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

from planner.errors import ConfigError
from planner.params import split_layers
from strategies.model import Transformer


def stage_modules(model: Transformer, pp_rank: int, cfg) -> list[tuple[int, Transformer]]:
    """(chunk index, module) for every chunk this pipeline rank runs, cut from a meta model."""
    pp, chunks = cfg.pp, cfg.chunks
    total = pp * chunks
    if model.spec.tied_embeddings and total > 1:
        raise ConfigError("tied embeddings across pipeline stages are not supported by the reference model; "
                          "use an untied model such as tiny-llama")
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


def apply_pipeline(stages: list[tuple[int, Transformer]], mesh, cfg, device) -> Pipeline:
    """Builds the schedule for this rank's (already parallelized, materialised) stage modules."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    total = cfg.pp * cfg.chunks
    group = mesh.get_group()
    pipeline_stages = [PipelineStage(module, index, total, device, group=group) for index, module in stages]
    m = cfg.num_microbatches
    if cfg.schedule == "1f1b" and m < cfg.pp:
        raise ConfigError(f"1F1B needs at least pp = {cfg.pp} micro-batches per step, got {m}; raise the global "
                          f"batch or use --schedule gpipe")
    if cfg.schedule == "interleaved":
        schedule = ScheduleInterleaved1F1B(pipeline_stages, n_microbatches=m, loss_fn=pipeline_loss)
    elif cfg.schedule == "gpipe":
        schedule = ScheduleGPipe(pipeline_stages[0], n_microbatches=m, loss_fn=pipeline_loss)
    else:
        schedule = Schedule1F1B(pipeline_stages[0], n_microbatches=m, loss_fn=pipeline_loss)
    indices = [index for index, _ in stages]
    return Pipeline(schedule, has_first=0 in indices, has_last=total - 1 in indices)
