"""One layout, fully predicted: memory per rank and stage, and throughput."""

from __future__ import annotations

from planner.calibration import Calibration, default_calibration
from planner.configs import GPUSpec, ModelSpec, TrainConfig
from planner.memory import MemoryEstimate, estimate_memory
from planner.step_time import Throughput, estimate_step


class Estimate(MemoryEstimate):
    """``MemoryEstimate`` plus the predicted ``throughput`` (step time, tokens/s, MFU)."""

    throughput: Throughput
    calibration: str


def estimate(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, calibration: Calibration | None = None,
             gpus_per_node: int | None = None, search_micro_batch: bool = True) -> Estimate:
    cal = calibration or default_calibration()
    memory = estimate_memory(model, gpu, train, cal.overheads, search_micro_batch, gpus_per_node)
    throughput = estimate_step(model, gpu, train, cal, gpus_per_node, check=False)
    return Estimate(**dict(memory), throughput=throughput, calibration=cal.label)
