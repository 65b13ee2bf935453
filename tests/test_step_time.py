"""Step time and throughput against published runs, with the default (uncalibrated) efficiency.

Narayanan et al. 2021 report achieved teraFLOP/s per GPU computed with their Eq. 3 (which
includes recomputation), on A100-80GB (Selene: 8 A100 per node, NVLink 3, 8 x 200 Gb/s HDR),
GPT models with V = 51,200, s = 2,048, fp16, full activation recomputation, the interleaved
schedule where their scripts use it (examples/academic_paper_scripts/sc21/run_table_1.sh).
We predict the step time and convert it the same way.
"""

from __future__ import annotations

import pytest

from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.memory import estimate_memory
from planner.params import total_params
from planner.step_time import estimate_step
from validation.published import (
    BLOOM_TFLOPS,
    NARAYANAN,
    NARAYANAN_ZERO3,
    predict_bloom,
    predict_megatron,
    predict_narayanan_zero3,
)


@pytest.mark.parametrize("run", NARAYANAN, ids=lambda run: run.label)
def test_narayanan_2021_throughput_within_15_percent(run):
    """Narayanan et al. 2021, Table 1 and Table 2 (PTD-P): achieved TFLOP/s per A100
    (validation/published.py has each row and its source)."""
    ours = predict_megatron(run)
    assert ours == pytest.approx(run.published_tflops, rel=0.15), f"ours {ours:.1f} vs {run.published_tflops}"


def test_zero3_rows_of_narayanan_table_2_are_not_reproduced():
    """Narayanan et al. 2021 Table 2: GPT-3 175B with DeepSpeed's ZeRO-3 (no model parallelism,
    batch 1536, so micro-batch 4 / 2 / 1) reached 144 / 88 / 44 TFLOP/s per GPU on 384 / 768 /
    1536 A100s: its throughput fell with the micro-batch, its all-gathers exposed. A model of
    NCCL's rings (one per NIC, 192 GB/s of bus bandwidth per DGX A100 node, NVIDIA/nccl#812)
    with unit-by-unit prefetching -- what FSDP2 and today's DeepSpeed do, and what the
    published multi-node FSDP runs in tests/test_comm.py confirm -- hides those all-gathers
    behind a 175B layer's compute at every size. We do not reproduce the 2021 rows and say so in
    the README; this test pins what we predict instead: 1.2-1.5x the published 144 TFLOP/s at
    384 GPUs (188: the per-operation model of issue 23 runs the 175B's GEMMs at 71% of the A100's
    peak, where Megatron-LM's runs in the same paper come within 16% and DeepSpeed's 2021 ZeRO-3 did
    not reach), and communication hidden (throughput within 15% from 384 to 1536 GPUs)."""
    ours = {gpus: predict_narayanan_zero3(gpus, micro_batch) for gpus, micro_batch, _ in NARAYANAN_ZERO3}
    assert 1.2 * NARAYANAN_ZERO3[0][2] < ours[384] < 1.5 * NARAYANAN_ZERO3[0][2]
    assert ours[1536] == pytest.approx(ours[384], rel=0.15)


def test_bloom_176b_within_15_percent():
    """BigScience BLOOM-176B (bigscience-workshop/bigscience, train/tr11-176B-ml): 384 A100-80GB,
    TP=4, PP=12, DP=8, micro-batch 2, global batch 2048, seq 2048, bf16, activation
    checkpointing, DeepSpeed's BF16 optimizer (ZeRO-1): ~150 TFLOP/s per GPU, computed by their
    log as 8 x N x tokens / time (hardware FLOPs with recomputation)."""
    assert predict_bloom() == pytest.approx(BLOOM_TFLOPS, rel=0.15)


def test_seed_speed_ordering_7b_on_8_gpus():
    """Seed note 004 (after DeepSpeed's and Hugging Face's guidance): speed ZeRO-1 > ZeRO-2 >
    ZeRO-2+offload > ZeRO-3 > ZeRO-3+offload, memory the reverse. Their example: a 7B model on
    8 GPUs (A100-40GB), per-GPU micro-batch 1 at seq 2048; a pretraining-sized global batch of
    1,024 sequences (2M tokens; DeepSpeed's semantics, which the ordering describes). ZeRO-3
    pays its two all-gathers and reduce-scatter every micro-batch; offload pays the CPU Adam
    once per step."""
    model, gpu = load_model("llama-2-7b"), load_gpu("a100-40gb")
    cases = [(1, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "params")]
    speeds, peaks = [], []
    for zero, offload in cases:
        train = TrainConfig(gpus=8, zero_stage=zero, offload=offload, micro_batch=1, global_batch=1024, seq_len=2048,
                            engine="deepspeed")
        speeds.append(estimate_step(model, gpu, train).tokens_per_s)
        pytorch = train.model_copy(update={"engine": "pytorch"})
        peaks.append(estimate_memory(model, gpu, pytorch, search_micro_batch=False).memory.peak)
    assert speeds == sorted(speeds, reverse=True), speeds
    assert peaks == sorted(peaks, reverse=True), peaks


def test_seed_memory_ordering_is_a_tie_at_8_gpus_for_deepspeed():
    """The memory half of the seeds' ordering under DeepSpeed's semantics: at N = 8 exactly,
    ZeRO-2+offload keeps 2 Psi of 16-bit parameters and ZeRO-3 keeps 16 Psi / 8 = 2 Psi of
    states -- a tie (seed note 004: 14 GB each for 7e9 parameters). DeepSpeed's own estimator
    then adds 4 x largest layer to ZeRO-3 (gathered parameters), and so do we: at the peak
    ZeRO-3 needs slightly more than ZeRO-2+offload; the reverse order holds from N > 8. With
    PyTorch's engines (FSDP2 gathers all parameters for ZeRO-2) it holds at 8 (test above)."""
    model, gpu = load_model("llama-2-7b"), load_gpu("a100-40gb")

    def step_phase(zero, offload, gpus):
        train = TrainConfig(gpus=gpus, zero_stage=zero, offload=offload, micro_batch=1, global_batch=1024,
                            seq_len=2048, engine="deepspeed")
        return estimate_memory(model, gpu, train, search_micro_batch=False)

    z2o, z3 = step_phase(2, "optimizer", 8), step_phase(3, "none", 8)
    states = lambda est: est.stages[0].phases["optimizer"]  # noqa: E731
    assert states(z2o).params + states(z2o).grads + states(z2o).optimizer == 2 * total_params(model)
    z3_states = states(z3).params + states(z3).grads + states(z3).optimizer
    assert z3_states == pytest.approx(2 * total_params(model), rel=1e-4)
    assert step_phase(2, "optimizer", 16).memory.peak > step_phase(3, "none", 16).memory.peak


def test_bubble_and_interleaving():
    """Narayanan et al. 2021 sec. 2.2: the bubble is (p - 1)/m of the ideal time for 1F1B and
    (p - 1)/(v m) with v interleaved chunks."""
    model = load_model("llama-2-13b")
    gpu = load_gpu("h100-sxm-80gb")
    base = dict(gpus=8, pp=8, global_batch=32, seq_len=2048, zero_stage=1)
    plain = estimate_step(model, gpu, TrainConfig(**base))
    inter = estimate_step(model, gpu, TrainConfig(**base, schedule="interleaved", chunks=5))
    per_mb = (plain.step_time_s - plain.breakdown.bubble_s - plain.breakdown.dp_communication_exposed_s
              - plain.breakdown.optimizer_s) / 32
    assert plain.breakdown.bubble_s == pytest.approx(7 * per_mb, rel=1e-6)
    assert inter.breakdown.bubble_s < plain.breakdown.bubble_s / 4


def test_mfu_definition():
    model, gpu = load_model("llama-2-7b"), load_gpu("h100-sxm-80gb")
    train = TrainConfig(gpus=8, zero_stage=3, global_batch=64, seq_len=4096)
    th = estimate_step(model, gpu, train)
    from planner.flops import model_flops_per_step

    assert th.mfu == pytest.approx(model_flops_per_step(model, train) / (th.step_time_s * 8 * 989.4e12))
    assert th.tokens_per_s == pytest.approx(64 * 4096 / th.step_time_s)
    assert th.tokens_per_s_per_gpu == pytest.approx(th.tokens_per_s / 8)
    b = th.breakdown
    parts = (b.compute_s + b.recompute_s + b.tp_communication_s + b.pp_communication_s + b.dp_communication_exposed_s
             + b.bubble_s + b.offload_s + b.optimizer_s)
    assert parts == pytest.approx(th.step_time_s)
    # MFU counts the causal half of the attention square, which causal flash runs too: model
    # FLOPs never exceed the executed ones, so MFU stays below the compute efficiency.
    assert 0 < th.mfu <= th.compute_efficiency and th.hfu >= th.mfu


def test_cross_node_dp_is_slower():
    model, gpu = load_model("llama-2-7b"), load_gpu("h100-sxm-80gb")
    one_node = estimate_step(model, gpu, TrainConfig(gpus=8, zero_stage=3, global_batch=8), gpus_per_node=8)
    spread = estimate_step(model, gpu, TrainConfig(gpus=8, zero_stage=3, global_batch=8), gpus_per_node=1)
    assert spread.breakdown.dp_communication_exposed_s > 3 * one_node.breakdown.dp_communication_exposed_s
