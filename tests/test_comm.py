"""Collectives as NCCL runs them (planner/comm.py), checked against nccl-tests figures, and
the multi-node FSDP step against published runs (issue 9, item 8).

nccl-tests report bus bandwidth: algbw x 2(n-1)/n for all-reduce, x (n-1)/n for all-gather
and reduce-scatter (NVIDIA/nccl-tests doc/PERFORMANCE.md); bandwidths here are decimal GB/s.
"""

from __future__ import annotations

import pytest

from planner import comm
from planner.calibration import calibration_for_gpu, default_calibration
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.step_time import estimate_step
from validation.published import FSDP_RUNS, NCCL_TESTS, predict_busbw, predict_fsdp


def _group(gpu_id: str, size: int, stride: int = 1, per_node: int = 8) -> comm.Group:
    k = default_calibration().throughput
    constants = comm.CommConstants(k.collective_bandwidth_efficiency, k.inter_node_bandwidth_efficiency,
                                   k.intra_node_latency_s, k.inter_node_latency_s, k.collective_base_latency_s,
                                   k.tree_bandwidth_efficiency)
    return comm.group(load_gpu(gpu_id), size, stride, per_node, constants)


@pytest.mark.parametrize("test", NCCL_TESTS, ids=lambda test: test.label)
def test_bus_bandwidth_matches_nccl_tests(test):
    """Large messages (4 GiB) at the bus bandwidth nccl-tests measure, within 5%, or inside the
    published range for one NIC (validation/published.py has each figure and its source)."""
    ours = predict_busbw(test)
    assert ours == pytest.approx(test.published_gb_s, rel=0.05 if test.stride == 1 else 0.1), test.source


def test_tree_takes_small_all_reduces_across_many_nodes():
    """NCCL picks the algorithm with the least predicted time (src/enqueue.cc, topoGetAlgoInfo):
    across 64 nodes a 1 MiB all-reduce's ring latency (2(n-1) steps) dwarfs the tree's
    (2 log2 N network steps); for 4 GiB the ring's higher bandwidth wins."""
    group = _group("a100-80gb", 512)
    small, large = 2**20, 4 * 2**30
    ring_latency = comm._ring_latency(group, 2 * 511, 2 * 63)
    assert comm.all_reduce_s(small, 512, group) < ring_latency / 5
    ring_large = ring_latency + 2 * 511 / 512 * large / (group.bus_bandwidth_gb_s * 1e9)
    assert comm.all_reduce_s(large, 512, group) == pytest.approx(ring_large)


def test_multi_node_fsdp_hides_its_traffic():
    """Issue 9's example: llama-2-13b on 64 A100-80GB (8 nodes), ZeRO-3, micro-batch 1, seq 4096,
    bf16-mixed, no recompute was predicted at 3.73 s per step, 1.91 s of it exposed data-parallel
    communication (a ring at one NIC's 25 GB/s), MFU 31%. Published multi-node FSDP runs of this
    size hide the traffic: torchtitan (docs/performance.md at 3faaa1a0d, 64 A100-80GB, FSDP2,
    Llama 2 13B, seq 4096, local batch 2, no activation checkpointing) reports 61.1% MFU; IBM's
    FSDP blog (pytorch.org, 2024-03-13) 51-57% for 7B-70B on 128 A100."""
    model, gpu = load_model("llama-2-13b"), load_gpu("a100-80gb")
    cal = calibration_for_gpu(gpu)
    issue = estimate_step(model, gpu, TrainConfig(gpus=64, zero_stage=3, micro_batch=1, seq_len=4096), cal, 8)
    assert issue.breakdown.dp_communication_exposed_s < 0.1 * issue.step_time_s
    assert issue.mfu > 0.5
    torchtitan = next(run for run in FSDP_RUNS if run.label.startswith("torchtitan, Llama 2 13B"))
    ours = predict_fsdp(torchtitan).tokens_per_s_per_gpu
    assert ours == pytest.approx(torchtitan.published_tokens_per_s_per_gpu, rel=0.05)


@pytest.mark.parametrize("run", FSDP_RUNS, ids=lambda run: run.label)
def test_published_fsdp_runs_hide_their_communication(run):
    """Multi-node FSDP runs (validation/published.py): what is exposed of the data-parallel
    traffic stays under a tenth of the step, and tokens/s per GPU is within 35% of the
    published figure. The gap is the compute efficiency's, not the network's: the shipped H100
    calibration was measured on a 1B model (39.2% of peak), the big runs reach more; with full
    recomputation we run low by the recomputed share."""
    ours = predict_fsdp(run)
    assert ours.breakdown.dp_communication_exposed_s < 0.1 * ours.step_time_s
    assert ours.tokens_per_s_per_gpu == pytest.approx(run.published_tokens_per_s_per_gpu, rel=0.35)


def test_exposed_when_a_unit_computes_less_than_its_neighbour_gathers():
    """Unit by unit: an all-gather hides behind the previous unit's forward only as far as that
    forward lasts. At a short sequence over a slow network the gathers outlast the compute."""
    model, gpu = load_model("llama-2-7b"), load_gpu("a100-80gb")
    slow = gpu.model_copy(update={"inter_node_bandwidth_gb_s": 1.0})
    long = estimate_step(model, slow, TrainConfig(gpus=64, zero_stage=3, seq_len=8192), gpus_per_node=8)
    short = estimate_step(model, slow, TrainConfig(gpus=64, zero_stage=3, seq_len=256), gpus_per_node=8)
    assert short.breakdown.dp_communication_exposed_s > 0.5 * short.dp_communication_s
    assert long.breakdown.dp_communication_exposed_s < short.breakdown.dp_communication_exposed_s
