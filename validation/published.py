"""Published numbers the planner is checked against, each with its source, and the planner's
prediction for each: one list that the tests (tolerances) and the README's tables (generated
by docs/readme.py) both read, so a table cannot drift from what the code predicts.

Bandwidths are decimal GB/s; throughput is TFLOP/s per GPU or MFU as the source states it.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner import comm
from planner.calibration import calibration_for_gpu, default_calibration
from planner.catalog import load_gpu, load_model
from planner.configs import ModelSpec, TrainConfig
from planner.params import total_params
from planner.step_time import estimate_step

# ---------------------------------------------------------------- Megatron-LM and BLOOM


@dataclass(frozen=True)
class MegatronRun:
    """Narayanan et al. 2021 (Megatron-LM, PTD-P), Tables 1 and 2: GPT models with V = 51,200,
    s = 2,048, fp16, full recomputation, on A100-80GB (Selene: 8 per node, 8 x 200 Gb/s HDR);
    micro-batch and interleaving from examples/academic_paper_scripts/sc21/run_table_1.sh.
    Achieved TFLOP/s per GPU by their Eq. 3 (which counts recomputation)."""

    label: str
    hidden: int
    heads: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    micro_batch: int
    chunks: int
    published_tflops: float


NARAYANAN = [
    MegatronRun("Narayanan et al. 2021 Table 1, 145.6B (t8 p8, 1536 A100)", 12288, 96, 80, 8, 8, 1536, 2304, 2, 2, 148),
    MegatronRun("Table 1, 310.1B (t8 p16, 1920 A100)", 16384, 128, 96, 8, 16, 1920, 2160, 1, 2, 155),
    MegatronRun("Table 1, 529.6B (t8 p35, 2520 A100)", 20480, 128, 105, 8, 35, 2520, 2520, 1, 3, 163),
    MegatronRun("Table 1, 1008B (t8 p64, 3072 A100)", 25600, 160, 128, 8, 64, 3072, 3072, 1, 1, 163),
    MegatronRun("Table 2, GPT-3 175B PTD-P on 384 A100", 12288, 96, 96, 8, 12, 384, 1536, 1, 1, 153),
    MegatronRun("Table 2, GPT-3 175B PTD-P on 768 A100", 12288, 96, 96, 8, 12, 768, 1536, 1, 1, 149),
    MegatronRun("Table 2, GPT-3 175B PTD-P on 1536 A100", 12288, 96, 96, 8, 12, 1536, 1536, 1, 1, 141),
]

NARAYANAN_ZERO3 = [(384, 4, 144), (768, 2, 88), (1536, 1, 44)]
"""Table 2's ZeRO-3 rows for GPT-3 175B (DeepSpeed, batch 1536): GPUs, micro-batch, TFLOP/s."""


def gpt(hidden: int, heads: int, layers: int) -> ModelSpec:
    return ModelSpec(name="gpt", num_layers=layers, hidden_size=hidden, num_heads=heads, ffn_hidden_size=4 * hidden,
                     vocab_size=51200, mlp="gelu", norm="layernorm", position_embedding="learned",
                     max_position_embeddings=2048, linear_bias=True)


def eq3_flops_per_token(layers: int, hidden: int, seq_len: int, vocab: int) -> float:
    """Narayanan et al. 2021, Eq. 3 over the B s tokens of a step: 96 l h^2 (1 + s/6h + V/16lh)
    (forward, backward and full recomputation)."""
    h = hidden
    return 96 * layers * h * h * (1 + seq_len / (6 * h) + vocab / (16 * layers * h))


def eq3_tflops_per_gpu(model: ModelSpec, train: TrainConfig, seconds: float) -> float:
    """Eq. 3's FLOPs of a step (GPT with V = 51,200) over its time, per GPU."""
    flops = train.global_batch * train.seq_len * eq3_flops_per_token(model.num_layers, model.hidden_size,
                                                                     train.seq_len, 51200)
    return flops / seconds / train.gpus / 1e12


def predict_megatron(run: MegatronRun) -> float:
    model = gpt(run.hidden, run.heads, run.layers)
    train = TrainConfig(gpus=run.gpus, tp=run.tp, pp=run.pp, precision="fp16-mixed", micro_batch=run.micro_batch,
                        global_batch=run.batch, seq_len=2048, activation_checkpointing="full", attention="eager",
                        engine="megatron", schedule="interleaved" if run.chunks > 1 else "1f1b", chunks=run.chunks)
    return eq3_tflops_per_gpu(model, train, estimate_step(model, load_gpu("a100-80gb"), train).step_time_s)


def predict_narayanan_zero3(gpus: int, micro_batch: int) -> float:
    model = gpt(12288, 96, 96)
    train = TrainConfig(gpus=gpus, zero_stage=3, precision="fp16-mixed", micro_batch=micro_batch, global_batch=1536,
                        seq_len=2048, activation_checkpointing="full", attention="eager", engine="deepspeed")
    return eq3_tflops_per_gpu(model, train, estimate_step(model, load_gpu("a100-80gb"), train).step_time_s)


BLOOM_LABEL = "BLOOM-176B (384 A100, TP4 PP12 DP8)"
BLOOM_TFLOPS = 150.0
"""bigscience-workshop/bigscience, train/tr11-176B-ml: ~150 TFLOP/s per GPU, computed by their
log as 8 x N x tokens / time (hardware FLOPs with recomputation)."""


def predict_bloom() -> float:
    model = load_model("bloom-176b")
    train = TrainConfig(gpus=384, tp=4, pp=12, zero_stage=1, precision="bf16-mixed", micro_batch=2,
                        global_batch=2048, seq_len=2048, activation_checkpointing="full", attention="eager",
                        engine="deepspeed")
    step = estimate_step(model, load_gpu("a100-80gb"), train).step_time_s
    return 8 * total_params(model) * 2048 * 2048 / step / 384 / 1e12


# ---------------------------------------------------------------- NCCL (nccl-tests bus bandwidth)


@dataclass(frozen=True)
class NcclTest:
    """A nccl-tests bus bandwidth at a large message (busbw: algbw x 2(n-1)/n for all-reduce,
    x (n-1)/n for all-gather and reduce-scatter; NVIDIA/nccl-tests doc/PERFORMANCE.md)."""

    label: str
    gpu: str
    ranks: int
    collective: str
    published_gb_s: float
    source: str
    stride: int = 1  # ranks between group members (8: one rank per 8-GPU node)


NCCL_TESTS = [
    NcclTest("8x A100 NVLink, all-reduce", "a100-80gb", 8, "all_reduce", 234.89,
             "ml-engineering network/README.md (16 GiB)"),
    NcclTest("2 DGX A100 (8x 200 Gb/s HDR each), all-reduce", "a100-80gb", 16, "all_reduce", 192.0,
             "NVIDIA in NVIDIA/nccl#812"),
    NcclTest("8 DGX A100, all-reduce", "a100-80gb", 64, "all_reduce", 192.0, "NVIDIA/nccl#812 (the same per node)"),
    NcclTest("16 nodes, one rank per node (one HDR NIC), all-gather", "a100-80gb", 16, "all_gather", 22.0,
             "20-24 GB/s per HDR NIC: nccl-tests#160, #252", stride=8),
    NcclTest("8x H200 NVLink 4, all-reduce (ring)", "h200", 8, "all_reduce", 367.2,
             "ml-engineering network/README.md (16 GiB)"),
    NcclTest("8x H200 NVLink 4, all-gather", "h200", 8, "all_gather", 361.4, "ml-engineering network/README.md"),
    NcclTest("8x H200 NVLink 4, reduce-scatter", "h200", 8, "reduce_scatter", 362.9,
             "ml-engineering network/README.md"),
    NcclTest("4 nodes of 8x H200 (EFA), all-reduce (ring)", "h200", 32, "all_reduce", 364.87,
             "ml-engineering network/README.md (4 GiB)"),
]


def predict_busbw(test: NcclTest, nbytes: int = 4 * 2**30) -> float:
    k = default_calibration().throughput
    constants = comm.CommConstants(k.collective_bandwidth_efficiency, k.inter_node_bandwidth_efficiency,
                                   k.intra_node_latency_s, k.inter_node_latency_s, k.collective_base_latency_s,
                                   k.tree_bandwidth_efficiency)
    group = comm.group(load_gpu(test.gpu), test.ranks, test.stride, 8, constants)
    return comm.bus_bandwidth_gb_s(test.collective, nbytes, test.ranks, group)


# ---------------------------------------------------------------- multi-node FSDP runs


@dataclass(frozen=True)
class FsdpRun:
    """A published multi-node FSDP run: tokens per second per GPU is compared (MFU conventions
    differ: these sources count attention over the full s x s square, trainplan over its
    causal half)."""

    label: str
    model: str
    gpu: str
    train: dict
    published_tokens_per_s_per_gpu: float
    published_mfu: float
    source: str


FSDP_RUNS = [
    FsdpRun("torchtitan, Llama 2 13B, 64 A100-80GB, seq 4096, batch 2, no AC", "llama-2-13b", "a100-80gb",
            dict(gpus=64, zero_stage=3, micro_batch=2, seq_len=4096, precision="amp-bf16"), 2162, 0.611,
            "pytorch/torchtitan docs/performance.md at 3faaa1a0d (FSDP2)"),
    FsdpRun("torchtitan, Llama 2 70B, 64 A100-80GB, seq 4096, batch 2, full AC", "llama-2-70b", "a100-80gb",
            dict(gpus=64, zero_stage=3, micro_batch=2, seq_len=4096, precision="amp-bf16",
                 activation_checkpointing="full"), 353, 0.505, "pytorch/torchtitan docs/performance.md at 3faaa1a0d"),
    FsdpRun("llm-foundry, 13B, 64 A100-40GB, seq 2048, micro-batch 16, AC", "llama-2-13b", "a100-40gb",
            dict(gpus=64, zero_stage=3, micro_batch=16, seq_len=2048, activation_checkpointing="full"), 1976, 0.5204,
            "mosaicml/llm-foundry scripts/train/benchmarking/README.md (FULL_SHARD)"),
    FsdpRun("llm-foundry, 13B, 64 H100, seq 2048, micro-batch 2, no AC", "llama-2-13b", "h100-sxm-80gb",
            dict(gpus=64, zero_stage=3, micro_batch=2, seq_len=2048), 4800, 0.3986,
            "mosaicml/llm-foundry scripts/train/benchmarking/README.md (FULL_SHARD)"),
    FsdpRun("llm-foundry, 70B, 64 H100, seq 2048, micro-batch 8 x 4, AC", "llama-2-70b", "h100-sxm-80gb",
            dict(gpus=64, zero_stage=3, micro_batch=8, global_batch=2048, seq_len=2048,
                 activation_checkpointing="full"), 1039, 0.4257,
            "mosaicml/llm-foundry scripts/train/benchmarking/README.md (FULL_SHARD)"),
]


def predict_fsdp(run: FsdpRun):
    """The planner's Throughput for a published run (8 GPUs per node, the shipped calibration)."""
    gpu = load_gpu(run.gpu)
    return estimate_step(load_model(run.model), gpu, TrainConfig(**run.train), calibration_for_gpu(gpu), 8)


# ---------------------------------------------------------------- context parallel (torchtitan)

TORCHTITAN_CP_SOURCE = ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 2: Llama 3.1 8B on 8 H100 "
                        "(96 GB HBM2e, 500 W), FSDP + CP + torch.compile + Float8, local batch 1, full AC")
TORCHTITAN_CP = [  # (fsdp, cp, sequence length, published tokens/s per GPU)
    (8, 1, 32768, 3890),
    (4, 2, 65536, 2540),
    (2, 4, 131072, 1071),
    (1, 8, 262144, 548),
]


def predict_torchtitan_cp(cp: int, seq_len: int) -> float:
    """tokens/s per GPU the planner predicts for a row of TORCHTITAN_CP: torchtitan's model code,
    fp32 parameters with bf16 compute, compiled blocks, Float8 tensorwise linears (what the
    published runs used)."""
    gpu = load_gpu("h100-sxm-96gb-500w")
    train = TrainConfig(gpus=8, cp=cp, seq_len=seq_len, zero_stage=3, activation_checkpointing="full", micro_batch=1,
                        precision="fp8-tensorwise", compile=True, impl="torchtitan")
    return estimate_step(load_model("llama-3-8b"), gpu, train, calibration_for_gpu(gpu)).tokens_per_s_per_gpu


# ---------------------------------------------------------------- Float8 (torchtitan, torchao)

@dataclass(frozen=True)
class Float8Run:
    """A published bf16 run and its Float8 twin (same layout): tokens/s per GPU of each."""

    label: str
    gpus: int
    micro_batch: int
    checkpointing: str
    precision: str
    published_bf16: float
    published_fp8: float
    source: str


FLOAT8_RUNS = [
    Float8Run("torchtitan Table 1, 8 GPUs", 8, 2, "op", "fp8-tensorwise", 6667, 8532,
              "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1: Llama 3.1 8B, FSDP + torch.compile "
              "(+ Float8, tensorwise with fp8 all-gather per docs/float8.md at 9dec370), local batch 2, seq 8192, "
              "selective (op) AC, H100 96 GB HBM2e at 500 W"),
    Float8Run("torchtitan Table 3, 128 GPUs", 128, 2, "op", "fp8-tensorwise", 6514, 8380,
              "the same file, Table 3: 128 GPUs, local batch 2"),
    Float8Run("torchao README, tensorwise", 8, 1, "op", "fp8-tensorwise", 6150, 7689.5,
              "pytorch/ao torchao/float8/README.md (training benchmarks, NVIDIA H100): Llama3-8b, 8 GPUs, batch 1, "
              "seq 8192, torch.compile, FSDP2, per-op SAC; tensorwise with float8 all-gather"),
    Float8Run("torchao README, rowwise", 8, 1, "op", "fp8-rowwise", 6150, 6768,
              "the same table: rowwise with bfloat16 all-gather"),
]


def predict_float8(run: Float8Run, precision: str):
    """The planner's Throughput of a FLOAT8_RUNS layout in ``precision`` (amp-bf16 or the run's
    Float8 recipe): torchtitan's Llama 3 8B code, FSDP2, compiled, seq 8192, on the H100 96 GB."""
    gpu = load_gpu("h100-sxm-96gb-500w")
    train = TrainConfig(gpus=run.gpus, zero_stage=3, micro_batch=run.micro_batch, seq_len=8192, precision=precision,
                        activation_checkpointing=run.checkpointing, compile=True, impl="torchtitan")
    return estimate_step(load_model("llama-3-8b"), gpu, train, calibration_for_gpu(gpu), 8)


# ---------------------------------------------------------------- asynchronous TP (torchtitan)

ASYNC_TP_SOURCE = ("torchtitan benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md (H100 96 GB HBM2e, 500 W, "
                   "torch.compile, seq 8192)")
ASYNC_TP = [  # (model, GPUs, local batch, AC, precision, vanilla TP tokens/s per GPU, async TP tokens/s per GPU)
    ("llama-3-70b", 256, 16, "full", "amp-bf16", 597.3, 652.4),
    ("llama-3-70b", 256, 16, "full", "fp8-tensorwise", 809.8, 942.4),
    ("llama-3-70b", 256, 16, "full", "fp8-rowwise", 599.6, 624.8),
    ("llama-3-8b", 64, 12, "op", "amp-bf16", 4378, 4809.4),
    ("llama-3-8b", 64, 12, "op", "fp8-tensorwise", 5078.1, 5570.1),
    ("llama-3-8b", 64, 12, "op", "fp8-rowwise", 3708.5, 3914.9),
]


def predict_async_tp(model: str, gpus: int, micro_batch: int, checkpointing: str, precision: str, async_tp: bool):
    """The planner's Throughput of an ASYNC_TP row: FSDP over gpus / 8, TP 8 with sequence
    parallelism inside each node."""
    gpu = load_gpu("h100-sxm-96gb-500w")
    train = TrainConfig(gpus=gpus, tp=8, sequence_parallel=True, zero_stage=3, micro_batch=micro_batch, seq_len=8192,
                        precision=precision, activation_checkpointing=checkpointing, compile=True, impl="torchtitan",
                        async_tp=async_tp)
    return estimate_step(load_model(model), gpu, train, calibration_for_gpu(gpu), 8)


# ---------------------------------------------------------------- device memory (torchtitan)

TORCHTITAN_MEMORY_SOURCE = (
    "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1-5 (H100 96 GB HBM2e, torchtitan 9dec370): "
    "'Memory(GiB)' is torchtitan's max reserved memory (torch.cuda.memory_stats' reserved_bytes.all.peak, its "
    "DeviceMemoryMonitor), the largest over the GPUs; its launcher ran with PYTORCH_CUDA_ALLOC_CONF="
    "expandable_segments:True (run_llama_train.sh at 9dec370)")


@dataclass(frozen=True)
class MemoryRun:
    label: str
    model: str
    fields: tuple[tuple[str, object], ...]
    published_gib: float


def _memory_run(label: str, model: str, published: float, **fields) -> MemoryRun:
    return MemoryRun(label, model, tuple(sorted(fields.items())), published)


_TT8B = dict(zero_stage=3, seq_len=8192, impl="torchtitan")
TORCHTITAN_MEMORY = [
    _memory_run("Table 1: 8B, FSDP 8, batch 2, op-level AC", "llama-3-8b", 82.4, gpus=8, micro_batch=2,
                precision="amp-bf16", activation_checkpointing="op", **_TT8B),
    _memory_run("Table 1: + torch.compile", "llama-3-8b", 77.0, gpus=8, micro_batch=2, precision="amp-bf16",
                activation_checkpointing="op", compile=True, **_TT8B),
    _memory_run("Table 1: + torch.compile + Float8", "llama-3-8b", 76.8, gpus=8, micro_batch=2,
                precision="fp8-tensorwise", activation_checkpointing="op", compile=True, **_TT8B),
    _memory_run("Table 3: 8B, FSDP 128, batch 2, op-level AC", "llama-3-8b", 67.0, gpus=128, micro_batch=2,
                precision="amp-bf16", activation_checkpointing="op", **_TT8B),
    _memory_run("Table 3: + torch.compile", "llama-3-8b", 62.0, gpus=128, micro_batch=2, precision="amp-bf16",
                activation_checkpointing="op", compile=True, **_TT8B),
    _memory_run("Table 2: 8B, FSDP 8, 32k tokens, full AC, compile + Float8", "llama-3-8b", 83.9, gpus=8,
                micro_batch=1, precision="fp8-tensorwise", activation_checkpointing="full", compile=True,
                **(_TT8B | dict(seq_len=32768))),
    _memory_run("Table 2: FSDP 1 x CP 8, 262k tokens", "llama-3-8b", 84.5, gpus=8, cp=8, micro_batch=1,
                precision="fp8-tensorwise", activation_checkpointing="full", compile=True,
                **(_TT8B | dict(seq_len=262144))),
    _memory_run("Table 4: 70B, FSDP 32 x TP 8, batch 16, full AC, compile + Float8", "llama-3-70b", 71.9, gpus=256,
                tp=8, sequence_parallel=True, micro_batch=16, precision="fp8-tensorwise",
                activation_checkpointing="full", compile=True, **_TT8B),
    _memory_run("Table 5: 405B, FSDP 8 x TP 8 x PP 8, 1F1B, batch 32", "llama-3.1-405b", 82.5, gpus=512, tp=8, pp=8,
                sequence_parallel=True, micro_batch=1, global_batch=256, precision="fp8-tensorwise",
                activation_checkpointing="full", compile=True, async_tp=True, **_TT8B),
    _memory_run("Table 5: interleaved 1F1B", "llama-3.1-405b", 72.7, gpus=512, tp=8, pp=8, sequence_parallel=True,
                micro_batch=1, global_batch=256, precision="fp8-tensorwise", activation_checkpointing="full",
                compile=True, async_tp=True, schedule="interleaved", chunks=2, **_TT8B),
]


def predict_reserved(run: MemoryRun) -> int:
    """The planner's reserved memory (the worst rank's peak less the CUDA context and its
    communicators, which torchtitan's reading leaves out), with expandable segments as the runs
    had them, on the 96 GB H100 they ran on."""
    from planner.memory import estimate_memory

    gpu = load_gpu("h100-sxm-96gb-500w")
    overheads = calibration_for_gpu(gpu).overheads
    train = TrainConfig(**dict(run.fields), alloc_conf="expandable_segments")
    worst = max(estimate_memory(load_model(run.model), gpu, train, overheads, search_micro_batch=False).stages,
                key=lambda stage: stage.peak)
    return worst.peak - overheads.cuda_context_bytes - worst.communicators * overheads.communicator_bytes


# ---------------------------------------------------------------- mixtures of experts (issue 24)

MEGATRON_MOE_SOURCE = ("Megatron-MoE-ModelZoo, best_practice/Qwen3/readme.md (github.com/yanring/Megatron-MoE-ModelZoo, "
                       "'Performance Results'): Qwen3-235B-A22B, 256 H100 (NVLink 4, InfiniBand 8 x 50 GB/s), BF16, seq "
                       "4096, global batch 2048, micro-batch 1, dropless")
MEGATRON_MOE = [  # (label, tp, pp, virtual stages, ep, dispatcher, recompute, published step seconds)
    ("TP2 PP8 VPP4 EP32, DeepEP", 2, 8, 4, 32, "DeepEP", "norm, act", 19.7),
    ("TP4 PP8 VPP4 EP8, DeepEP", 4, 8, 4, 8, "DeepEP", "none", 29.0),
]
"""The bf16 MoE runs with a layout the planner expresses. Not expressed: the same table's PP32 x VPP3
row (96 model chunks over 94 layers: Megatron's uneven first and last stages), its FSDP row
(Megatron-FSDP), the NeMo / Megatron-Bridge MoE rows (FP8 recipes, refused on an MoE) and gpt-oss
(attention sinks). Megatron-Core's MoE (DeepEP's overlapped dispatch, its grouped GEMM, its
distributed optimizer) is not the stack the planner models (the reference block under FSDP2 with
torchtitan's blocking all-to-all, ZeRO-2 standing in for the distributed optimizer): the rows are a
check of scale, not a fit, and nothing was tuned on them."""


def predict_megatron_moe(tp: int, pp: int, chunks: int, ep: int):
    """The planner's step for a row of MEGATRON_MOE: Qwen3-235B-A22B on 256 H100 at that layout,
    interleaved 1F1B, ZeRO-2 (FSDP2), no activation checkpointing (Megatron's norm and act
    recompute keeps the projections' outputs: the nearest planned policy is none)."""
    gpu = load_gpu("h100-sxm-80gb")
    train = TrainConfig(gpus=256, tp=tp, pp=pp, ep=ep, sequence_parallel=True, schedule="interleaved", chunks=chunks,
                        zero_stage=2, seq_len=4096, micro_batch=1, global_batch=2048, precision="bf16-mixed")
    return estimate_step(load_model("qwen3-235b-a22b"), gpu, train, calibration_for_gpu(gpu))
