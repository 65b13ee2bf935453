"""On a CUDA GPU (skipped with a reason elsewhere): the strategy layer on NCCL, pinned-memory
offload, and the profiler's prediction against ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import pytest

from planner.calibration import default_calibration
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from profiler.run import profile_layout
from strategies.launch import launch
from strategies.train import RunConfig, RunResult

pytestmark = [pytest.mark.gpu]


def _gpu():
    from planner.catalog import gpu_preset_for_device
    from strategies.nvml import device_info

    return load_gpu(gpu_preset_for_device(device_info(0)["name"]) or "h100-sxm-80gb")


def test_bf16_mixed_run_on_cuda():
    train = TrainConfig(gpus=1, seq_len=512, micro_batch=2, precision="bf16-mixed")
    config = RunConfig(model=load_model("tiny-llama"), train=train, steps=3)
    result = RunResult.model_validate_json(launch(config.model_dump_json(), 1, timeout_s=300))
    assert result.backend == "nccl" and all(s.loss == s.loss for s in result.steps)
    assert result.ranks[0].max_memory_allocated > 0


def test_zero3_parameter_offload_with_pinned_memory():
    train = TrainConfig(gpus=1, zero_stage=3, offload="params", seq_len=512, micro_batch=2, precision="bf16-mixed")
    config = RunConfig(model=load_model("tiny-llama"), train=train, steps=3)
    result = RunResult.model_validate_json(launch(config.model_dump_json(), 1, timeout_s=300))
    rank = result.ranks[0]
    assert rank.host_params > 0 and rank.host_optimizer > 0 and rank.optimizer == 0


def test_profile_1b_peak_allocated_within_5_percent():
    train = TrainConfig(gpus=1, seq_len=2048, micro_batch=2, precision="bf16-mixed")
    report = profile_layout(load_model("llama-3.2-1b"), _gpu(), train, default_calibration(), on_cpu=False)
    rows = {row.quantity: row for row in report.rows}
    assert abs(rows["max_memory_allocated"].error_pct) <= 5.0
