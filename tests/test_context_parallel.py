"""Context parallelism in the planner (`--cp`): each sequence split over cp ranks with ring
attention; FSDP/ZeRO shard over dp x cp."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.errors import LayoutError
from planner.estimate import estimate
from planner.flops import unit_flops
from planner.memory import estimate_memory
from trainplan.cli import plan_command

MODEL = load_model("8b")
GPU = load_gpu("h100-sxm-80gb")


def _train(**kw) -> TrainConfig:
    base = dict(gpus=8, seq_len=131072, zero_stage=3, activation_checkpointing="full", micro_batch=1)
    return TrainConfig(**{**base, **kw})


def test_a_rank_holds_its_share_of_each_sequence():
    """A cp rank's activations are those of a sequence cp times shorter; parameters, gradients and
    optimizer state are sharded over dp x cp exactly as over that many data-parallel ranks."""
    cp4 = estimate_memory(MODEL, GPU, _train(cp=4))
    short = estimate_memory(MODEL, GPU, _train(seq_len=131072 // 4, global_batch=8))
    dp8 = estimate_memory(MODEL, GPU, _train(global_batch=8))
    for phase in ("forward", "backward"):
        assert cp4.stages[0].phases[phase].activations == short.stages[0].phases[phase].activations
    for key in ("params", "grads", "optimizer"):
        assert getattr(cp4.memory, key) == getattr(dp8.memory, key)
    assert cp4.memory.activations * 4 == pytest.approx(dp8.memory.activations, rel=1e-9)


def test_compute_is_split_evenly_over_the_ring():
    """The cp ranks together do one rank's work: matmuls over S/cp tokens each, and an even share
    of the causal attention square (round-robin load balancing)."""
    for cp in (2, 4, 8):
        split = unit_flops(MODEL, _train(cp=cp), "decoder")
        whole = unit_flops(MODEL, _train(), "decoder")
        assert split.forward * cp == pytest.approx(whole.forward)
        assert split.backward * cp == pytest.approx(whole.backward)


def test_ring_traffic_and_overlap():
    """Each rank sends its k, v (2 x S/cp x kv_heads x head_dim x 2 B) cp - 1 times per forward
    pass -- twice with full recompute -- and k, v plus their gradients in backward."""
    train = _train(cp=4)
    est = estimate(MODEL, GPU, train)
    kv = 2 * (131072 // 4) * MODEL.num_kv_heads * MODEL.head_dim * 2
    forwards = 2  # full recompute runs the forward ring again
    per_microbatch = MODEL.num_layers * 3 * kv * (forwards + 2)
    assert est.throughput.cp_ring_bytes == per_microbatch * train.num_microbatches
    # at 131k tokens one attention block takes far longer than moving a block's k, v over NVLink
    assert est.throughput.cp_communication_s > 0 and est.throughput.breakdown.cp_communication_s == 0
    # on a slow link (PCIe cards, 4 per node) at short blocks the ring shows
    slow = estimate(MODEL, load_gpu("l40s"), _train(cp=4, seq_len=8192, zero_stage=3))
    assert slow.throughput.breakdown.cp_communication_s > 0


def test_search_proposes_cp_when_the_sequence_does_not_fit_otherwise():
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpus", "8", "--seq-len", "131072", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["recommended"]["train"]["cp"] > 1
    assert not any(c["train"]["cp"] == 1 and c["fits"] for c in plan["candidates"])
    # short sequences are not split
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpus", "8", "--json", "--top", "0"])
    assert all(c["train"]["cp"] == 1 for c in json.loads(result.stdout)["candidates"])


def test_cli_breakdown_names_the_ring():
    """On the 96 GB H100 torchtitan published this layout on (84.0 GiB reserved: benchmarks/
    llama3_h100_202412_torchtitan.md, Table 2, FSDP 2 x CP 4 at 131,072 tokens, Float8): it fits;
    an 80 GB H100 holds less than that."""
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpus", "8", "--seq-len", "131072", "--cp", "4",
                                               "--strategy", "zero3", "--tp", "1", "--pp", "1", "--ac", "full",
                                               "--gpu", "h100-sxm-96gb"])
    assert result.exit_code == 0, result.output
    assert "context parallel: each rank holds 32,768 of 131,072 tokens" in result.stdout
    assert "ring attention sends" in result.stdout


@pytest.mark.parametrize(("kw", "message"), [
    (dict(cp=4, attention="eager"), "--attention flash"),
    (dict(cp=4, seq_len=1004), "multiple of 8"),
    (dict(cp=3), "does not divide 8 GPUs"),
    (dict(cp=2, engine="deepspeed"), "Ulysses"),
    (dict(cp=2, activation_checkpointing="op"), "--ac none, full or layer:N"),
])
def test_impossible_context_parallel_layouts(kw, message):
    with pytest.raises(LayoutError, match=message):
        _train(**kw)


def test_run_refuses_cp_with_tp_in_one_line():
    from trainplan.cli import main

    result = CliRunner().invoke(main, ["run", "--model", "tiny-llama", "--cp", "2", "--tp", "2", "--gpus", "4"])
    assert result.exit_code == 2 and "planned by `plan`" in result.stderr



def _json(args):
    from trainplan.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ring_attention_on_cpu_matches_one_process_and_the_plan():
    """PyTorch's ring attention (its _templated_ring_attention, with the CPU flash kernel) on 2
    gloo ranks, ZeRO-3 over dp x cp: the losses of one process within 1e-5 (fp32). The rank's
    memory against the plan is measured by the same runs in validation/cpu.json ("Context
    parallel cp2, ZeRO-3" and "... DDP": params, grads, optimizer exact, activations within 3%),
    which tests/test_validation.py re-predicts."""
    common = ["--model", "tiny-llama", "--seq-len", "256", "--precision", "fp32", "--steps", "3", "--json"]
    split = _json(["run", *common, "--nproc", "2", "--cp", "2", "--strategy", "zero3"])
    whole = _json(["run", *common, "--nproc", "1", "--global-batch", "1"])
    for a, b in zip(split["steps"], whole["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_long_context_throughput_against_torchtitan():
    """torchtitan's published context-parallel runs (validation/published.py, TORCHTITAN_CP;
    Float8 tensorwise linears, as published): tokens/s per GPU falls from 32k to 262k tokens as
    attention's quadratic share grows. The planner's fall is shallower beyond 64k: relative to the
    32k row it predicts 0.97x, 1.33x and 1.40x the published 64k, 128k and 256k throughput (their
    ring attention runs below the planner's FlashAttention curve; before the per-operation model,
    issue 23: 1.06x, 1.55x, 1.72x). Pinned here so that the gap is known and cannot silently
    widen."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "validation"))
    from published import TORCHTITAN_CP, predict_torchtitan_cp

    predicted = {cp: predict_torchtitan_cp(cp, seq) for _, cp, seq, _ in TORCHTITAN_CP}
    published = {cp: tps for _, cp, _, tps in TORCHTITAN_CP}
    for cp in (2, 4, 8):
        over = (predicted[cp] / predicted[1]) / (published[cp] / published[1])
        assert 0.9 <= over <= 1.5, (cp, over)
    # the 32k row itself: 3,983 planned against 3,890 published (+2%)
    assert predicted[1] == pytest.approx(published[1], rel=0.15)


def test_committed_context_parallel_runs_repredict():
    """validation/cpu.json's context-parallel runs (2 gloo ranks; 8 fake-tensor ranks of
    Llama-3.2-1B at 16k and Llama-3-8B at 65k tokens) re-predicted by today's planner: parameters,
    gradients and optimizer state exact, activations within 3%, peak within 2%."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "validation"))
    from accuracy_table import committed_cpu_rows

    cases = committed_cpu_rows(lambda train: train.get("cp", 1) > 1)
    assert len(cases) >= 4
    for label, rows in cases:
        for key in ("params", "grads", "optimizer"):
            assert rows[key].predicted == rows[key].measured, (label, key)
        assert abs(rows["activations"].error_pct) < 3, label
        assert abs(rows["peak"].error_pct) < 2, label


def test_cp_needs_rope_and_no_dropout():
    """The reference model shards RoPE's rows per rank and PyTorch's ring runs without dropout:
    GPT-2's learned positions (and dropout) are refused with cp, not silently trained wrong."""
    from planner.configs import check_layout

    with pytest.raises(LayoutError, match="positions"):
        check_layout(load_model("tiny-gpt2"), TrainConfig(gpus=2, cp=2, seq_len=256))
    with pytest.raises(LayoutError, match="dropout"):
        check_layout(MODEL.model_copy(update={"dropout": 0.1}), TrainConfig(gpus=2, cp=2, seq_len=256))
