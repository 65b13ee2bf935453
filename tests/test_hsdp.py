"""Hybrid sharding (HSDP, issue 23 item 4): FSDP2's fully_shard over a 2-D (dp_replicate,
dp_shard) mesh as torchtitan builds it -- states sharded over the shard group, gradients
all-reduced over the replicas."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner import comm
from planner.calibration import default_calibration
from planner.capabilities import run_refusal
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.errors import LayoutError
from planner.memory import estimate_memory
from planner.step_time import estimate_step
from trainplan.cli import main

H100 = load_gpu("h100-sxm-80gb")
LLAMA_8B = load_model("llama-3-8b")


def _fsdp(gpus: int, **kw) -> TrainConfig:
    return TrainConfig(gpus=gpus, zero_stage=3, precision="amp-bf16", seq_len=8192, micro_batch=1,
                       activation_checkpointing="full", **kw)


def test_states_are_sharded_over_the_shard_group_only():
    """64 GPUs sharding in groups of 8 hold what 8 GPUs of FSDP hold: parameters, gradients and
    optimizer state per rank are the 8-way shards."""
    hsdp = estimate_memory(LLAMA_8B, H100, _fsdp(64, dp_shard=8), search_micro_batch=False).memory
    fsdp8 = estimate_memory(LLAMA_8B, H100, _fsdp(8), search_micro_batch=False).memory
    fsdp64 = estimate_memory(LLAMA_8B, H100, _fsdp(64), search_micro_batch=False).memory
    for part in ("params", "optimizer"):
        assert getattr(hsdp, part) == getattr(fsdp8, part) > getattr(fsdp64, part)
    assert hsdp.grads == fsdp8.grads


def test_either_degree_gives_the_other():
    a, b = _fsdp(64, dp_shard=8), _fsdp(64, dp_replicate=8)
    assert (a.dp_shard, a.dp_replicate, a.shard_world) == (8, 8, 8) == (b.dp_replicate, b.dp_shard, b.shard_world)
    with pytest.raises(LayoutError, match="does not divide dp"):
        _fsdp(64, dp_shard=6)
    with pytest.raises(LayoutError, match="does not divide dp"):
        _fsdp(64, dp_replicate=5)
    with pytest.raises(LayoutError, match="--engine pytorch"):
        TrainConfig(gpus=16, engine="megatron", zero_stage=1, dp_shard=8)
    assert "2-D mesh" in run_refusal(load_model("tiny-llama"), _fsdp(4, dp_shard=2), cuda=False)


def test_placement_puts_the_shard_group_in_a_node_and_the_replicas_across():
    """torchtitan's mesh order (pp, dp_replicate, dp_shard, cp, tp): a shard group of 8 with
    tp 1 fills one node; its replicas are 8 ranks apart, one per node."""
    k = default_calibration().throughput
    constants = comm.CommConstants(k.collective_bandwidth_efficiency, k.inter_node_bandwidth_efficiency,
                                   k.intra_node_latency_s, k.inter_node_latency_s, k.collective_base_latency_s,
                                   k.tree_bandwidth_efficiency)
    links = comm.placement(H100, _fsdp(64, dp_shard=8), 8, constants)
    assert not links.dp.spans_nodes and links.replicate.spans_nodes and links.replicate.nodes == 8


def test_the_replica_all_reduce_is_counted():
    """Each reduce-scattered shard is all-reduced across its replicas on the same stream
    (FSDP2's foreach_reduce): HSDP's 64 ranks communicate more per step than one 8-GPU shard
    group alone, by exactly what all-reducing the 1/8 shards over one NIC per node costs; one
    shard group spanning all of dp is plain FSDP."""
    hsdp = estimate_step(LLAMA_8B, H100, _fsdp(64, dp_shard=8))
    one_node = estimate_step(LLAMA_8B, H100, _fsdp(8))
    assert hsdp.dp_communication_s > one_node.dp_communication_s
    assert estimate_step(LLAMA_8B, H100, _fsdp(64, dp_shard=64)).step_time_s == pytest.approx(
        estimate_step(LLAMA_8B, H100, _fsdp(64)).step_time_s)


def test_cli_flags():
    runner = CliRunner()
    base = ["plan", "--model", "llama-3-8b", "--gpus", "64", "--strategy", "zero3", "--tp", "1", "--pp", "1",
            "--seq-len", "8192", "--ac", "full", "--json"]
    shard = json.loads(runner.invoke(main, [*base, "--dp-shard", "8"]).stdout)
    replicate = json.loads(runner.invoke(main, [*base, "--dp-replicate", "8"]).stdout)
    assert shard["train"]["dp_shard"] == replicate["train"]["dp_shard"] == 8
    assert shard["memory"] == replicate["memory"]
    bad = runner.invoke(main, [*base, "--dp-shard", "6"])
    assert bad.exit_code == 2 and "does not divide dp" in bad.output and "Traceback" not in bad.output
