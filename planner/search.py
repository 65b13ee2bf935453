"""Enumerating layouts: every dp x tp x pp factorization and strategy the user left open.

Flags are constraints. A ``SearchSpace`` holds, per knob, either the user's value or every
value worth trying; ``enumerate_configs`` yields the valid ``TrainConfig`` combinations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pydantic import BaseModel, ConfigDict

from planner.configs import STRATEGIES, ModelSpec, TrainConfig, check_layout
from planner.errors import ConfigError, LayoutError, TrainplanError
from planner.memory import MemoryEstimate, ModelSummary, Overheads, estimate_memory

STRATEGY_CHOICES: tuple[tuple[int, str], ...] = (
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "params"),
)
"""The strategies the seed notes rank: DDP, ZeRO-1, ZeRO-2, ZeRO-2+offload, ZeRO-3, ZeRO-3+offload."""


def strategy_label(train: TrainConfig) -> str:
    name = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[train.zero_stage]
    if train.offload == "optimizer":
        # ZeRO-Offload moves optimizer state and gradients; with ZeRO-3 the seeds' "+offload"
        # means parameters too, so the optimizer-only variant is named explicitly there.
        name += "+opt-offload" if train.zero_stage == 3 else "+offload"
    elif train.offload == "params":
        name += "+offload"
    return name


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchSpace:
    """Each list is the values to try; a single-element list is a fixed choice."""

    gpus: int
    gpus_per_node: int = 8
    tp: list[int] | None = None
    pp: list[int] | None = None
    strategies: list[tuple[int, str]] | None = None  # (zero stage, offload)
    fixed: dict = field(default_factory=dict)  # every other TrainConfig field

    def tp_values(self, model: ModelSpec) -> list[int]:
        if self.tp is not None:
            return self.tp
        # Tensor parallelism stays inside a node (its all-reduces are per layer).
        return [
            t for t in divisors(self.gpus)
            if t <= self.gpus_per_node
            and model.num_heads % t == 0 and model.num_kv_heads % t == 0 and model.ffn_hidden_size % t == 0
        ]

    def pp_values(self, model: ModelSpec, tp: int) -> list[int]:
        if self.pp is not None:
            return self.pp
        if self.gpus % tp:
            return [1]  # an impossible fixed tp: let TrainConfig say what to change
        return [p for p in divisors(self.gpus // tp) if p <= model.total_layers]


def enumerate_configs(model: ModelSpec, space: SearchSpace) -> list[TrainConfig]:
    configs: list[TrainConfig] = []
    first_error: TrainplanError | None = None
    engine = space.fixed.get("engine", "pytorch")
    for tp in space.tp_values(model):
        for pp in space.pp_values(model, tp):
            dp = space.gpus // (tp * pp) or 1
            strategies = space.strategies
            if strategies is None:
                strategies = [
                    (z, o) for z, o in STRATEGY_CHOICES
                    # ZeRO without offload over one data-parallel rank is plain DDP.
                    if (dp > 1 or z == 0 or o != "none") and (engine != "megatron" or (z <= 1 and o == "none"))
                ]
            for zero, offload in strategies:
                try:
                    train = TrainConfig(gpus=space.gpus, tp=tp, pp=pp, zero_stage=zero, offload=offload,
                                        **space.fixed)
                    check_layout(model, train)
                except (LayoutError, ConfigError) as exc:
                    first_error = first_error or exc
                    continue
                configs.append(train)
    if not configs:
        if first_error is not None:
            raise first_error
        raise LayoutError(f"no tensor/pipeline layout of {model.name} fits {space.gpus} GPUs with these constraints")
    return configs


class PlanResult(BaseModel):
    """Search mode's result: every candidate the constraints leave, best first."""

    model_config = ConfigDict(frozen=True)

    model: ModelSummary
    gpu: str
    gpu_memory_bytes: int
    gpus: int
    candidates: list[MemoryEstimate]


def search(model: ModelSpec, gpu, space: SearchSpace, overheads: Overheads | None = None) -> PlanResult:
    configs = sorted(
        enumerate_configs(model, space),
        # the simplest layouts first (pure data parallelism), then by strategy, as the seeds list them
        key=lambda t: (t.tp * t.pp, t.pp, t.tp, t.zero_stage, ("none", "optimizer", "params").index(t.offload)),
    )
    estimates = [estimate_memory(model, gpu, train, overheads) for train in configs]
    return PlanResult(
        model=ModelSummary(name=model.name, num_params=model.num_params),
        gpu=gpu.name,
        gpu_memory_bytes=gpu.memory_bytes,
        gpus=space.gpus,
        candidates=estimates,
    )


__all__ = ["STRATEGIES", "PlanResult", "SearchSpace", "enumerate_configs", "search", "strategy_label"]
