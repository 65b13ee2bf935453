"""The caching-allocator replay (planner/allocator.py) against the rules of PyTorch's
``c10/cuda/CUDACachingAllocator.cpp`` (cited per test), and against what the allocator reserved
on an H100 (validation/gpu_h100.json, replayed from traces taken on this CPU:
validation/allocator.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.allocator import AllocatorOutOfMemory, CachingAllocator, allocation_size, replay, round_size

MiB = 1 << 20
VALIDATION = Path(__file__).resolve().parent.parent / "validation"


def test_requests_round_to_512_bytes():
    """round_size: kMinBlockSize = 512, every size rounded up to a multiple of it."""
    assert [round_size(n) for n in (1, 511, 512, 513, 1536)] == [512, 512, 512, 1024, 1536]


def test_segment_sizes():
    """get_allocation_size: 2 MiB for <= 1 MiB (kSmallBuffer), 20 MiB below 10 MiB (kLargeBuffer),
    else rounded up to 2 MiB (kRoundLarge)."""
    assert allocation_size(512) == 2 * MiB and allocation_size(MiB) == 2 * MiB
    assert allocation_size(MiB + 512) == 20 * MiB and allocation_size(10 * MiB - 512) == 20 * MiB
    assert allocation_size(10 * MiB) == 10 * MiB and allocation_size(11 * MiB) == 12 * MiB


def test_small_requests_share_a_2_mib_segment():
    a = CachingAllocator()
    for _ in range(4):
        a.malloc(512 * 1024)
    assert a.reserved == 2 * MiB and a.allocated == 2 * MiB
    a.malloc(512)
    assert a.reserved == 4 * MiB


def test_medium_requests_carve_a_20_mib_segment():
    """should_split (large pool): split only when more than 1 MiB (kSmallSize) would remain."""
    a = CachingAllocator()
    blocks = [a.malloc(5 * MiB) for _ in range(4)]
    assert a.reserved == 20 * MiB and a.allocated == 20 * MiB
    a.malloc(5 * MiB)
    assert a.reserved == 40 * MiB
    a.free(blocks[1])
    a.malloc(4 * MiB + 512)  # remaining 1 MiB - 512 is not > 1 MiB: the whole 5 MiB block is handed out
    assert a.allocated == 25 * MiB


def test_a_large_request_without_a_split_counts_its_whole_block():
    """11 MiB gets a 12 MiB segment; 1 MiB would remain, which is not split off, so
    memory_allocated counts 12 MiB (stats count block sizes)."""
    a = CachingAllocator()
    a.malloc(11 * MiB)
    assert a.allocated == 12 * MiB == a.reserved


def test_best_fit_takes_the_smallest_block_that_fits():
    a = CachingAllocator()
    big, small = a.malloc(50 * MiB), a.malloc(30 * MiB)
    a.free(big)
    a.free(small)
    block = a.malloc(25 * MiB)
    assert block.addr == small.addr and a.reserved == 80 * MiB


def test_blocks_are_not_shared_across_streams():
    """BlockComparatorSize orders by stream first: a block freed on one stream is never handed
    to another (the FSDP2 streams' pools add up)."""
    a = CachingAllocator()
    a.free(a.malloc(40 * MiB, stream=1))
    a.malloc(40 * MiB, stream=0)
    assert a.reserved == 80 * MiB
    a.malloc(40 * MiB, stream=1)
    assert a.reserved == 80 * MiB


def test_freed_neighbours_merge():
    a = CachingAllocator()
    x, y = a.malloc(5 * MiB), a.malloc(5 * MiB)
    a.free(x)
    a.free(y)
    a.malloc(18 * MiB)  # the merged 20 MiB block (split: 2 MiB remains)
    assert a.reserved == 20 * MiB


def test_out_of_memory_releases_cached_segments_first():
    """release_cached_blocks: on a failed cudaMalloc, unsplit cached segments go back to CUDA and
    the allocation is retried; if that fails too, out of memory."""
    a = CachingAllocator(capacity=100 * MiB)
    a.free(a.malloc(60 * MiB))
    a.malloc(70 * MiB)  # 60 + 70 > 100: the free 60 MiB segment is released
    assert a.reserved == 70 * MiB
    with pytest.raises(AllocatorOutOfMemory):
        a.malloc(40 * MiB)


def test_expandable_segments_map_20_mib_pages_at_the_end():
    """Note [Expandable Segments]: one segment per stream and pool, grown by 20 MiB pages (large
    pool), any remainder of at least 512 bytes split off."""
    a = CachingAllocator(expandable_segments=True)
    for _ in range(3):
        a.malloc(15 * MiB)
    assert a.reserved == 60 * MiB  # 15, 30, 45 MiB in use: 1, 2, 3 pages
    b = CachingAllocator()
    for _ in range(3):
        b.malloc(15 * MiB)
    assert b.reserved == 48 * MiB  # three segments of 16 MiB


def test_replay_of_events():
    events = [("a", 0, 5 * MiB, 0), ("a", 1, 5 * MiB, 0), ("f", 0), ("a", 2, 30 * MiB, 1), ("m", "x"), ("f", 2)]
    result = replay(events)  # markers are skipped
    assert result.peak_allocated == 35 * MiB and result.peak_reserved == 50 * MiB and result.streams == 2


def _h100_cases():
    data = json.loads((VALIDATION / "allocator.json").read_text())
    return [case for case in data["cases"] if case["measured"]]


def test_replayed_reserved_memory_matches_the_h100_runs_within_3_percent():
    """Issue 21 acceptance: each of the 14 committed H100 runs (validation/gpu_h100.json) traced
    on this CPU with fake tensors, the trace replayed through the allocator model: the replayed
    max_memory_reserved within 3% of the measured one (and the allocated peak within 1%). The
    committed traces are replayed again here, so a change to the allocator model is checked."""
    import sys

    sys.path.insert(0, str(VALIDATION))
    from allocator import load_trace
    from profiler.alloc_trace import device_events

    from planner.configs import TrainConfig

    cases = _h100_cases()
    assert len(cases) == 14
    for case in cases:
        events = device_events(load_trace(case["label"]), TrainConfig(**case["train"]).offload)
        result = replay(events)
        measured = case["measured"]
        assert result.peak_reserved == case["replay"]["max_memory_reserved"], case["label"]
        assert abs(result.peak_reserved / measured["max_memory_reserved"] - 1) < 0.03, case["label"]
        assert abs(result.peak_allocated / measured["max_memory_allocated"] - 1) < 0.01, case["label"]


def test_torchtitan_published_reserved_memory():
    """torchtitan benchmarks/llama3_h100_202412_torchtitan.md publishes each run's max reserved
    memory (validation/published.py TORCHTITAN_MEMORY). One-dimensional FSDP and context-parallel
    runs within 5%; the tensor-parallel 70B and the pipelined 405B are under-predicted -- by at
    most these bounds, so the gap cannot silently widen (issue 21: not explained yet)."""
    import sys

    sys.path.insert(0, str(VALIDATION))
    from published import TORCHTITAN_MEMORY, predict_reserved

    for run in TORCHTITAN_MEMORY:
        error = predict_reserved(run) / (run.published_gib * 2**30) - 1
        if run.label.startswith(("Table 4", "Table 5")):
            assert -0.36 < error < 0, (run.label, error)
        else:
            assert abs(error) < 0.05, (run.label, error)


def test_pipelines_keep_unsharded_gradients_and_torchtitan_keeps_units_gathered():
    """torch.distributed.pipelining over FSDP2: every unit's unsharded gradient stays through the
    1F1B steady state (in fp32 with amp-bf16's reduce dtype); torchtitan keeps units gathered
    under a pipeline (reshard_after_forward = not pp_enabled), trainplan's ZeRO-3 does not."""
    from planner.calibration import Overheads
    from planner.catalog import load_gpu, load_model
    from planner.configs import TrainConfig
    from planner.memory import estimate_memory

    def stage0(**kw):
        train = TrainConfig(gpus=8, pp=4, zero_stage=3, seq_len=4096, micro_batch=1, global_batch=16, **kw)
        est = estimate_memory(load_model("llama-3-8b"), load_gpu("h100"), train, Overheads.none(),
                              search_micro_batch=False)
        return est.stages[0]

    mixed, amp = stage0(precision="bf16-mixed"), stage0(precision="amp-bf16")
    assert amp.temporaries_detail["unsharded_gradients"] == 2 * mixed.temporaries_detail["unsharded_gradients"]
    assert mixed.temporaries_detail["unsharded_gradients"] == 2 * mixed.num_params
    titan = stage0(precision="bf16-mixed", impl="torchtitan")
    assert titan.temporaries_detail["gathered_params"] >= 2 * titan.num_params > mixed.temporaries_detail[
        "gathered_params"]


def test_profile_replays_a_simulated_world_through_the_allocator():
    """`profile --simulate-world --replay-allocator`: rank 0's trace replayed (reserved at least
    the traced allocated peak plus cuBLAS's 32 MiB workspace), the planned reserved memory and
    device peak beside it; a GPU machine or an inference profile is refused in one line."""
    from click.testing import CliRunner

    from trainplan.cli import main

    args = ["profile", "--model", "tiny-llama", "--gpus", "2", "--simulate-world", "2", "--strategy", "zero3",
            "--json", "--replay-allocator"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {row["quantity"]: row for row in report["rows"]}
    reserved = rows["max_memory_reserved (replayed, rank 0)"]
    device = next(row for name, row in rows.items() if name.startswith("device memory on"))
    allocated = rows["peak (allocated)"]["measured"]
    assert reserved["measured"] >= allocated + 32 * MiB and reserved["measured"] % (2 * MiB) == 0
    # the device adds the same context and communicators to both sides
    assert device["measured"] - reserved["measured"] == device["predicted"] - reserved["predicted"] > 0
    assert any(note.startswith("allocator replay:") for note in report["notes"])
    refused = CliRunner().invoke(main, ["profile", "--model", "tiny-llama", "--mode", "inference", "--replay-allocator"])
    assert refused.exit_code == 2 and "--replay-allocator" in refused.output
