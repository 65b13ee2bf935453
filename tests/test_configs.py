"""Configuration objects: validation and the messages that say what to change."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from planner.catalog import load_model
from planner.configs import TrainConfig, check_layout
from planner.errors import ConfigError, LayoutError


def test_dp_derived_from_gpus():
    t = TrainConfig(gpus=16, tp=2, pp=2)
    assert t.dp == 4 and t.global_batch == 4 and t.grad_accum == 1


def test_dp_tp_pp_must_multiply_to_gpus():
    with pytest.raises(LayoutError, match=r"dp x tp x pp = 3 x 1 x 1 = 3 != 8 GPUs; with tp=1 and pp=1 use dp = 8"):
        TrainConfig(gpus=8, dp=3)


def test_tp_not_dividing_gpus():
    with pytest.raises(LayoutError, match="does not divide 8 GPUs"):
        TrainConfig(gpus=8, tp=3)


def test_tp_must_divide_heads():
    model = load_model("llama-2-7b")  # 32 heads
    with pytest.raises(LayoutError, match="tp=3 does not divide the 32 attention heads"):
        check_layout(model, TrainConfig(gpus=3, tp=3))


def test_tp_must_divide_kv_heads():
    model = load_model("llama-2-70b")  # 64 heads, 8 kv heads
    with pytest.raises(LayoutError, match="key/value heads"):
        check_layout(model, TrainConfig(gpus=16, tp=16))


def test_pp_more_than_layers():
    model = load_model("tiny-llama")  # 4 layers
    with pytest.raises(LayoutError, match="more pipeline stages than the 4 layers"):
        check_layout(model, TrainConfig(gpus=8, pp=8))


def test_global_batch_divisibility():
    with pytest.raises(ConfigError, match="global batch 10 is not divisible by micro-batch x dp = 2 x 4 = 8"):
        TrainConfig(gpus=4, micro_batch=2, global_batch=10)
    assert TrainConfig(gpus=4, micro_batch=2, global_batch=32).grad_accum == 4


def test_negative_or_zero_values_rejected():
    with pytest.raises(ValidationError):
        TrainConfig(gpus=0)
    with pytest.raises(ValidationError):
        TrainConfig(gpus=2, micro_batch=-1)


def test_offload_and_schedule_rules():
    with pytest.raises(LayoutError, match="offloading parameters needs ZeRO-3"):
        TrainConfig(gpus=8, zero_stage=2, offload="params")
    with pytest.raises(LayoutError, match="needs a ZeRO stage"):
        TrainConfig(gpus=8, offload="optimizer")
    with pytest.raises(LayoutError, match="interleaved schedule needs pipeline"):
        TrainConfig(gpus=8, schedule="interleaved", chunks=2)
    with pytest.raises(LayoutError, match="--chunks 2 needs --schedule interleaved"):
        TrainConfig(gpus=8, pp=2, chunks=2)
    with pytest.raises(LayoutError, match="sequence parallelism splits activations"):
        TrainConfig(gpus=8, sequence_parallel=True)
    with pytest.raises(LayoutError, match="Megatron-LM shards only optimizer state"):
        TrainConfig(gpus=8, zero_stage=3, engine="megatron")


def test_learned_positions_limit_sequence():
    with pytest.raises(LayoutError, match="exceeds the 1024 learned positions"):
        check_layout(load_model("gpt2"), TrainConfig(gpus=1, seq_len=2048))


def test_configs_are_frozen():
    t = TrainConfig(gpus=8)
    with pytest.raises(ValidationError):
        t.tp = 2  # type: ignore[misc]
