"""Step time, tokens per second, MFU and HFU.

One optimizer step on the slowest pipeline stage:

    step = pipeline + max over stages (exposed data-parallel communication + offload + optimizer)
    pipeline = (m + (p - 1)/v) x T_mb          (GPipe / 1F1B: v = 1; interleaved: v chunks)
    T_mb = compute + recompute + tensor-parallel comm + pipeline p2p   (one micro-batch)

so the bubble is (p - 1)/(v m) of the pipeline (Narayanan et al. 2021, sec. 2.2). Compute is
executed FLOPs over (dense peak x compute efficiency). Tensor-parallel all-reduces (or
reduce-scatter + all-gather with sequence parallelism) sit on the critical path (Megatron-LM
runs them synchronously). Data-parallel and ZeRO collectives overlap the backward (and, for
FSDP all-gathers, the forward) of their micro-batch: what does not fit the compute window is
exposed, and the overlapped part still costs ``overlap_contention`` of its time because NCCL
kernels share the SMs and HBM. Offloading adds the PCIe copies and the CPU Adam update.

Per micro-batch or per step, by strategy:

| strategy | per micro-batch | per step |
|---|---|---|
| DDP | - | all-reduce gradients (overlapping the last backward) |
| ZeRO-1 | - | all-reduce (PyTorch) or reduce-scatter (Megatron/DeepSpeed) gradients; all-gather parameters after the step |
| ZeRO-2 | reduce-scatter gradients in backward; FSDP2 also all-gathers parameters in forward | DeepSpeed: all-gather parameters after the step |
| ZeRO-3 | all-gather in forward and backward, reduce-scatter in backward | - |
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from planner import comm, float8, op_time, te_fp8
from planner.calibration import Calibration, ThroughputConstants, default_calibration
from planner.configs import (
    GPUSpec,
    ModelSpec,
    TrainConfig,
    check_layout,
    parse_checkpointing,
)
from planner.engines import ENGINES, EngineSemantics
from planner.errors import ConfigError
from planner.flops import (
    BACKWARD_MATMUL_FACTOR,
    FLASH_BACKWARD_FACTOR,
    StageFlops,
    hardware_flops_per_step,
    layer_matmul_params,
    op_recomputed_params,
    model_flops_per_step,
    rank_attention_flops,
    stage_flops,
    unit_flops,
)
from planner.memory import _finetune_params, _Frozen, _StageParams, stage_params, _teacher
from planner.implementations import implementation
from planner.params import layer_kind, layer_tensors, representative_stages
from planner.precision import RECIPES, Recipe, optimizer_state_bytes


class StepBreakdown(BaseModel):
    """Seconds per step; they add up to ``step_time_s``."""

    model_config = ConfigDict(frozen=True)

    compute_s: float
    recompute_s: float
    tp_communication_s: float
    cp_communication_s: float = Field(default=0.0, description="the ring attention's k, v exchanges not hidden "
                                      "behind the attention they feed (context parallel)")
    pp_communication_s: float
    ep_communication_s: float = Field(default=0.0, description="expert parallelism's all-to-all dispatch and "
                                      "combine of each MoE layer, forward, backward and recompute")
    dp_communication_exposed_s: float
    bubble_s: float
    offload_s: float
    optimizer_s: float

    @property
    def exposed_communication_s(self) -> float:
        return (self.tp_communication_s + self.cp_communication_s + self.pp_communication_s
                + self.ep_communication_s + self.dp_communication_exposed_s)


class Throughput(BaseModel):
    model_config = ConfigDict(frozen=True)

    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    hfu: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    breakdown: StepBreakdown
    dp_communication_s: float  # before overlap, for reference
    cp_communication_s: float = 0.0  # the ring's transfers before overlap (context parallel)
    cp_ring_bytes: float = 0.0  # bytes each rank sends around the ring per step
    compute_efficiency: float
    calibrated: bool
    mfu_peak: str = Field(default="", description="the dtype whose dense peak MFU and HFU are measured against (the "
                          "compute dtype; bf16 for Float8, whose fp8 GEMMs can pass it)")
    mfu_bound: float = Field(default=1.0, description="the largest MFU the model allows: the faster of the compute "
                             "efficiency and the attention kernel's, times the compile speed-up when compiled (one "
                             "efficiency) and, with Float8, the fp8 / bf16 peak ratio")


# ---------------------------------------------------------------- the step, part by part
#
# estimate_step = _step_context (rates and links every stage shares)
#   + per representative stage: _stage_compute (one micro-batch's compute and recompute)
#                               and _stage_collectives (TP/SP, the CP ring, PP p2p on its critical path)
#   -> the slowest micro-batch sets the pipeline and its bubble
#   + per stage: _data_parallel_tail (exposed DP communication, offload, optimizer) -> the worst one
#   -> _throughput assembles the step, tokens/s, MFU and HFU.


def _exposed(comm_s: float, window_s: float, contention: float) -> float:
    """What of ``comm_s`` seconds of communication a ``window_s`` compute window leaves exposed:
    the part that does not fit, plus ``contention`` of the overlapped part (NCCL kernels share
    the SMs and HBM)."""
    return max(0.0, comm_s - window_s) + contention * min(comm_s, window_s)


class _StepContext(NamedTuple):
    """What every stage of one step shares: the calibration's rates, each group's link and the
    number of passes that run a layer's tensor-parallel collectives."""

    cal: Calibration
    k: ThroughputConstants
    recipe: Recipe
    engine: EngineSemantics
    dtype: str  # the compute dtype, whose dense peak MFU is measured against
    f8: str | None  # torchao's Float8 recipe, if any
    te: str  # Transformer Engine's FP8 recipe, if any
    peak: float  # dense peak of the compute dtype, FLOP/s
    efficiency: float  # the model-wide compute efficiency
    flops_rate: float  # peak x efficiency
    attention_rate: float  # the fused attention kernel's own rate
    gemm_rate: float  # one large GEMM's rate (what a collective can hide behind)
    links: comm.Placement
    policy: str  # activation checkpointing policy
    passes: float  # forward, backward and recompute passes over a layer's collectives
    hidden_bytes: float  # one micro-batch's [s, b, h] activation in the compute dtype
    p2p_bytes: float  # what a pipeline stage sends to the next per micro-batch
    per_op: bool  # the efficiency comes from the per-operation model (which models compile's fusions)


def _step_context(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, calibration: Calibration | None,
                  gpus_per_node: int | None) -> _StepContext:
    cal = calibration or default_calibration()
    k = cal.throughput
    recipe = RECIPES[train.precision]
    engine = ENGINES[train.engine]
    dtype = recipe.compute_dtype
    f8 = float8.float8_recipe(train.precision)
    te = te_fp8.te_recipe(train.precision)
    if te:
        te_fp8.check_gpu(train.precision, gpu)
    peak = gpu.peak_tflops.for_dtype(dtype) * 1e12
    attention_plateau = k.attention_efficiency_by_gpu.get(gpu.name, k.attention_efficiency)
    if model.position_embedding == "alibi":  # a bias added to every score inside the kernel
        attention_plateau *= k.alibi_attention_factor
    ops = op_time.op_times(model, gpu, train, dtype, recipe.compute_bytes, k.elementwise_hbm_efficiency,
                           k.gemm_sustained)
    # a power-capped board sustains compute_derate of the datasheet's tensor-core rate
    derate = gpu.compute_derate
    if ops is not None:  # GEMMs by shape, elementwise ops by bytes (planner/op_time.py)
        # times a machine factor where `trainplan calibrate` measured one on this GPU
        scale = k.compute_time_scale_by_gpu.get(gpu.name, {}).get(dtype, 1.0)
        efficiency = ops.efficiency(peak) / scale
        attention_rate = peak * derate * op_time.flash_efficiency(attention_plateau, train.local_seq_len,
                                                                  k.attention_half_seq, model.head_dim) / scale
    else:  # no GEMM model for this GPU: one efficiency for the whole model (calibrated or default)
        efficiency = k.efficiency(gpu.name, dtype) * derate
        attention_rate = peak * derate * attention_plateau
    flops_rate = peak * efficiency
    if not (math.isfinite(flops_rate) and flops_rate > 0 and attention_rate > 0):
        raise ConfigError(f"the predicted step time is not a finite positive number (compute rate {flops_rate} "
                          f"FLOP/s); check the GPU's peaks and bandwidths and the calibration's efficiencies")
    constants = comm.CommConstants(k.collective_bandwidth_efficiency, k.inter_node_bandwidth_efficiency,
                                   k.intra_node_latency_s, k.inter_node_latency_s, k.collective_base_latency_s,
                                   k.tree_bandwidth_efficiency)
    links = comm.placement(gpu, train, gpus_per_node or gpu.gpus_per_node, constants)
    s, b, t = train.local_seq_len, train.micro_batch, train.tp
    hidden_bytes = s * b * model.hidden_size * recipe.compute_bytes
    # full recompute repeats a layer's all-reduces; op-level recomputes what is not saved --
    # with sequence parallelism the reduce-scatters are saved, without it the all-reduces run again
    policy, every = parse_checkpointing(train.activation_checkpointing)
    passes = {"full": 3, "layer": 2 + 1 / every, "op": 2 if train.sequence_parallel else 3}.get(policy, 2)
    # pipeline p2p: Megatron's scatter/gather (and sequence parallelism) send 1/t of the tensor
    p2p_bytes = hidden_bytes / t if (train.sequence_parallel or train.engine != "pytorch") else hidden_bytes
    # the matmul kernels a collective can hide behind run at the GEMM ceiling, not the
    # model-wide efficiency (which includes the elementwise work between them)
    gemm_rate = peak * derate * k.gemm(gpu.name, dtype, default=efficiency)
    return _StepContext(cal, k, recipe, engine, dtype, f8, te, peak, efficiency, flops_rate, attention_rate, gemm_rate,
                        links, policy, passes, hidden_bytes, p2p_bytes, ops is not None)


# ---------------------------------------------------------------- compute, per micro-batch and stage


def _recomputed_share(f: StageFlops) -> float:
    """The share of the stage's forward that its recompute runs again."""
    return f.recompute / f.forward if f.forward else 0.0


def _linear_recompute_share(model: ModelSpec, train: TrainConfig, kind: str, policy: str, f) -> float:
    """The share of a layer's projections that its recompute runs again (per layer, on average)."""
    if policy == "full":
        return 1.0
    if policy == "layer":
        return _recomputed_share(f)
    if policy == "op":
        return op_recomputed_params(model, kind) / layer_matmul_params(model, kind)
    return 0.0  # none; selective recomputes the attention only


def _float8_s(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, k, kind: str, recompute_share: float,
              sustained: float, per_op: bool = False) -> tuple[float, float, float]:
    """Per layer and micro-batch, what Float8 linears change: (compute seconds, recompute
    seconds, the fp8 GEMM rate). The projections' GEMMs (forward, and the backward's two) move
    from the bf16 to the fp8 tensor cores, each at the share of its peak one large GEMM
    sustains (``gemm_efficiency``: measured matmul ceilings, not the whole model's efficiency,
    whose elementwise work Float8 does not speed up); the casts stream at the optimizer's HBM
    efficiency."""
    fp8_peak = gpu.peak_tflops.fp8
    if not fp8_peak:
        raise ConfigError(f"{train.precision} needs fp8 tensor cores (SM89 or later: L4, L40S, RTX 4090, H100, H200, "
                          f"B200, MI300X); {gpu.name} has no fp8 peak")
    bf16_rate = gpu.peak_tflops.for_dtype("bf16") * 1e12 * k.gemm(gpu.name, "bf16") * sustained
    fp8_rate = fp8_peak * 1e12 * k.gemm(gpu.name, "fp8") * sustained
    # torchao's Float8Linear (planner/float8.py) or Transformer Engine's recipes (planner/te_fp8.py)
    layer = te_fp8.layer_casts(model, train, kind) if te_fp8.te_recipe(train.precision) else float8.layer(
        model, train, kind)
    hbm = gpu.hbm_bandwidth_gb_s * 1e9 * (k.elementwise_hbm_efficiency if per_op else k.optimizer_hbm_efficiency)
    saved = layer.gemm_forward_flops * (1 / bf16_rate - 1 / fp8_rate)
    compute = (layer.cast_forward_bytes + layer.cast_backward_bytes) / hbm - (1 + BACKWARD_MATMUL_FACTOR) * saved
    recompute = recompute_share * (layer.cast_forward_bytes / hbm - saved)
    return compute, recompute, fp8_rate


class _StageCompute(NamedTuple):
    """One micro-batch's compute on one pipeline stage (seconds), and what the later parts read."""

    compute: float  # forward + backward
    recompute: float
    matmul_rate: dict[str, float]  # per layer kind: the GEMMs' rate that TP collectives hide behind
    flops: StageFlops
    params: _StageParams  # what trains and communicates (a fine-tune: the adapters)
    frozen: _Frozen | None  # a fine-tune's frozen base
    layers: int  # the stage's layers
    # the compute windows that data-parallel collectives (and parameter offload's copies) overlap
    forward_window: float
    backward_window: float  # backward + recompute


def _stage_compute(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, ctx: _StepContext, i: int) -> _StageCompute:
    """Compute and recompute of one micro-batch on stage ``i``: executed FLOPs over (dense peak x
    compute efficiency), then what fused or eager attention, a teacher, torch.compile, Float8
    and a quantised base change."""
    k, flops_rate = ctx.k, ctx.flops_rate
    f = stage_flops(model, train, i)
    sp = stage_params(model, train, i)
    layers, kinds = sp.num_layers, sp.kind_counts
    # attention sub-layers (self, and cross in T5's decoder) of the stage's blocks
    attentions = sum(n * len(layer_kind(model, kind).attentions) for kind, n in kinds)
    frozen = None
    if train.finetune != "full":  # what trains and communicates is the adapters (planner/finetune.py)
        sp, frozen = _finetune_params(model, train)
    compute = (f.forward + f.backward) / flops_rate
    recompute = f.recompute / flops_rate
    if train.attention == "flash":  # fused attention runs at its own efficiency, not the matmuls'
        attention_forward = sum(n * rank_attention_flops(model, train, kind) for kind, n in kinds)
        compute += (1 + FLASH_BACKWARD_FACTOR) * attention_forward * (1 / ctx.attention_rate - 1 / flops_rate)
        # what recompute repeats of the attention: all of it (Megatron's selective), none
        # (op-level keeps the attention kernel's output), else the recomputed share
        share = {"selective": 1.0, "op": 0.0, "none": 0.0}.get(ctx.policy, _recomputed_share(f))
        recompute += share * attention_forward * (1 / ctx.attention_rate - 1 / flops_rate)
    if train.teacher:  # distillation: the teacher's forward per micro-batch (no backward)
        compute += _teacher(model, train).forward_flops / flops_rate
    if train.attention == "eager":
        # the s x s scores are streamed through HBM by the elementwise ops around the matmuls
        scores = ((model.num_heads // train.tp) * train.local_seq_len * train.local_seq_len * train.micro_batch
                  * ctx.recipe.compute_bytes * attentions)
        streamed = k.eager_attention_passes * scores / (gpu.hbm_bandwidth_gb_s * 1e9 * k.optimizer_hbm_efficiency)
        compute += streamed
        if train.activation_checkpointing != "none":
            recompute += streamed / 2
    if train.compile and not ctx.per_op:  # inductor fuses the elementwise work; communication is unchanged
        compute, recompute = compute / k.compile_compute_speedup, recompute / k.compile_compute_speedup
    matmul_rate = dict.fromkeys((kind for kind, _ in kinds), ctx.gemm_rate)
    if ctx.f8 or ctx.te:  # the projections' GEMMs on the fp8 tensor cores, plus their casts
        sustained = gpu.compute_derate * (k.gemm_sustained if ctx.per_op else 1.0)
        for kind, n in sp.kind_counts:
            if n:
                share = _linear_recompute_share(model, train, kind, ctx.policy, f)
                dc, dr, matmul_rate[kind] = _float8_s(model, gpu, train, k, kind, share, sustained, ctx.per_op)
                compute, recompute = compute + n * dc, recompute + n * dr
    if frozen is not None and frozen.quantised_bytes:
        # a quantised base is dequantised per matmul: read the codes, write the 16-bit
        # weight, in forward, in backward and in each recompute (bandwidth-bound)
        dq = (frozen.quantised_bytes + frozen.quantised_numel * ctx.recipe.compute_bytes) / (
            gpu.hbm_bandwidth_gb_s * 1e9 * k.optimizer_hbm_efficiency)
        compute, recompute = compute + 2 * dq, recompute + _recomputed_share(f) * dq
    return _StageCompute(compute, recompute, matmul_rate, f, sp, frozen, layers, f.forward / flops_rate,
                         (f.backward + f.recompute) / flops_rate)


# ---------------------------------------------------------------- per-layer collectives and their overlap windows


def _sublayer_matmul_params(model: ModelSpec, kind: str) -> list[tuple[int, int]]:
    """Per sub-layer of a block (self-attention, cross-attention, MLP): the column-parallel
    weights its all-gather feeds and the row-parallel weight that feeds its reduce-scatter."""
    groups: dict[str, list[int]] = {}
    for tensor in layer_tensors(model, kind):
        if tensor.block_projection and tensor.tp_dim in (0, 1):
            groups.setdefault(tensor.sublayer, [0, 0])[tensor.tp_dim] += tensor.numel
    return [tuple(pair) for pair in groups.values()]


def _tp_sequence_parallel_s(model: ModelSpec, train: TrainConfig, kind: str, recipe, link: comm.Group,
                            matmul_rate: float, passes: float, contention: float) -> float:
    """Per layer and micro-batch: the tensor-parallel all-gathers and reduce-scatters of
    sequence parallelism, collective by collective, and what asynchronous TP leaves exposed.

    Each sub-layer all-gathers its input before its column-parallel projections and
    reduce-scatters the row-parallel projection's output; backward runs the duals. Async TP
    (torch/distributed/_symmetric_memory/__init__.py, ``fused_all_gather_matmul`` and
    ``fused_matmul_reduce_scatter``, which torch.compile's micro-pipeline TP pass substitutes)
    splits each into tp chunks and multiplies one chunk while the next moves: the transfer hides
    behind the matmul but for one chunk's worth (and NCCL-like contention on the overlapped part).
    Float8 tensorwise all-gathers the fp8 input (1 B per element) in the forward pass."""
    t = train.tp
    hidden = train.micro_batch * train.local_seq_len * model.hidden_size
    fp8_gather = float8.float8_recipe(train.precision) == "tensorwise"
    ag_fwd = comm.all_gather_s(hidden * (1 if fp8_gather else recipe.compute_bytes), t, link)
    ag_bwd = comm.all_gather_s(hidden * recipe.compute_bytes, t, link)
    rs = comm.reduce_scatter_s(hidden * recipe.compute_bytes, t, link)
    tokens = train.micro_batch * train.local_seq_len
    total = 0.0
    for column, row in _sublayer_matmul_params(model, kind):
        w_col, w_row = 2 * tokens * column / t / matmul_rate, 2 * tokens * row / t / matmul_rate
        if train.async_tp:
            hide = (t - 1) / t
            forward = _exposed(ag_fwd, hide * w_col, contention) + _exposed(rs, hide * w_row, contention)
            backward = _exposed(rs, hide * w_col, contention) + _exposed(ag_bwd, hide * w_row, contention)
        else:
            forward, backward = ag_fwd + rs, rs + ag_bwd
        total += (passes - 1) * forward + backward
    return total


def _ring_attention_s(model: ModelSpec, train: TrainConfig, recipe, attention_rate: float, link: comm.Group,
                      passes: float) -> tuple[float, float, float]:
    """Per layer and micro-batch: the part of context parallelism's ring exchanges that the
    attention cannot hide. PyTorch's ring attention (torch/distributed/tensor/experimental/
    _context_parallel/_attention.py, _templated_ring_attention) sends the rank's k and v to the
    next rank while SDPA runs on the block it holds, cp - 1 times; its backward passes k, v and
    their gradients around the ring again (twice the bytes) beside the attention's backward
    (FlashAttention-2: 2.5 x the forward). Each step hides behind one block of attention, the
    rank's attention over cp blocks (Liu et al. 2023, Ring Attention, sec. 3: the overlap needs
    block compute >= block transfer). Returns (bytes sent, seconds of transfer, seconds exposed)."""
    if train.cp == 1:
        return 0.0, 0.0, 0.0
    kv_bytes = (2 * train.micro_batch * train.local_seq_len * (model.num_kv_heads // train.tp) * model.head_dim
                * recipe.compute_bytes)
    block_s = rank_attention_flops(model, train) / train.cp / attention_rate  # one of the cp blocks of this rank's share
    steps = train.cp - 1
    forwards = passes - 1  # a full recompute runs the forward ring again
    sent = steps * kv_bytes * (forwards + 2)
    raw = steps * (forwards * comm.p2p_s(kv_bytes, link) + comm.p2p_s(2 * kv_bytes, link))
    exposed = steps * (forwards * max(0.0, comm.p2p_s(kv_bytes, link) - block_s)
                       + max(0.0, comm.p2p_s(2 * kv_bytes, link) - FLASH_BACKWARD_FACTOR * block_s))
    return sent, raw, exposed


class _StageCollectives(NamedTuple):
    """One micro-batch's collectives on one stage that its compute does not hide (seconds)."""

    tp_s: float  # tensor parallel (with sequence parallelism: what async TP leaves exposed)
    pp_s: float  # pipeline p2p sends
    ring_bytes: float  # context parallel: bytes each rank sends around the ring
    ring_raw: float  # the ring's transfers before overlap
    ring_exposed: float  # what the attention does not hide
    ep_s: float = 0.0  # expert parallel: the MoE layers' all-to-alls


def _stage_collectives(model: ModelSpec, train: TrainConfig, ctx: _StepContext, stage: _StageCompute
                       ) -> _StageCollectives:
    """Per micro-batch: tensor-parallel all-reduces on the critical path (Megatron-LM runs them
    synchronously) or sequence parallelism's all-gathers and reduce-scatters with their async-TP
    overlap windows; context parallelism's ring beside the attention; the pipeline's p2p sends."""
    k, links, passes, layers = ctx.k, ctx.links, ctx.passes, stage.layers
    t, p, v = train.tp, train.pp, train.chunks
    # Megatron's blocks all-reduce once after each attention sub-layer and once after the MLP
    collectives = sum(n * (len(layer_kind(model, kind).attentions) + 1) for kind, n in stage.params.kind_counts)
    if train.sequence_parallel and (train.async_tp or ctx.f8 == "tensorwise"):
        tp_s = sum(n * _tp_sequence_parallel_s(model, train, kind, ctx.recipe, links.tp, stage.matmul_rate[kind],
                                               passes, k.overlap_contention)
                   for kind, n in stage.params.kind_counts if n)
    else:
        tp_s = collectives * passes * comm.all_reduce_s(ctx.hidden_bytes, t, links.tp)
    ring_bytes, ring_raw, ring_exposed = (layers * x for x in _ring_attention_s(
        model, train, ctx.recipe, ctx.attention_rate, links.cp, passes))
    pp_s = (2 * v * comm.p2p_s(ctx.p2p_bytes, links.pp)) if p > 1 else 0.0
    return _StageCollectives(tp_s, pp_s, ring_bytes, ring_raw, ring_exposed, _expert_all_to_all_s(model, train, ctx,
                                                                                                  stage.params))


def _expert_all_to_all_s(model: ModelSpec, train: TrainConfig, ctx: _StepContext, sp: _StageParams) -> float:
    """Per micro-batch: each MoE layer sends its routed rows (tokens x top-k, hidden-sized, in the
    compute dtype) to their experts' ranks and receives them back -- dispatch and combine in
    forward, their gradients in backward, and both again when a checkpointed layer's forward
    reruns (``passes``). torchtitan's default dispatcher waits for the counts on the host before
    each exchange (token_dispatcher.py, "this would incur a device-to-host sync"): nothing
    overlaps it. A rank receives ``expert_load`` x the rows its tokens chose (1: balanced)."""
    if train.ep == 1:
        return 0.0
    moe_layers = sum(n for kind, n in sp.kind_counts if layer_kind(model, kind).experts)
    tokens = train.micro_batch * train.local_seq_len // train.tp  # tp splits the routed tokens
    rows = tokens * model.experts_per_token * model.hidden_size * ctx.recipe.compute_bytes
    # the busiest rank receives (and sends back) expert_load x its share: the exchange waits for it
    return moe_layers * 2 * ctx.passes * comm.all_to_all_s(rows * train.expert_load, train.ep, ctx.links.ep)


class _StageStep(NamedTuple):
    """One stage's micro-batch: its compute and the collectives on its critical path."""

    compute: _StageCompute
    comm: _StageCollectives

    @property
    def micro_batch_s(self) -> float:
        """T_mb = compute + recompute + tensor-parallel comm + pipeline p2p (+ the ring's exposed part)."""
        c, x = self.compute, self.comm
        return c.compute + c.recompute + x.tp_s + x.pp_s + x.ring_exposed + x.ep_s


# ---------------------------------------------------------------- the data-parallel tail


class _Overlap(NamedTuple):
    """Communication before overlap and what its compute window leaves exposed (seconds)."""

    raw: float
    exposed: float


@functools.lru_cache(maxsize=4096)
def _unit_transitions(gathered: tuple[int, ...], sizes: tuple[int, ...], kinds: tuple[str, ...]
                      ) -> tuple[tuple, tuple]:
    """A stage's units as ``_per_unit_overlap`` walks them, run-length: forward, (bytes unit u
    all-gathers, kind of unit u - 1 whose forward hides it) for u = 1..; backward, from the last
    unit down, (bytes of unit u - 1's all-gather, elements of unit u + 1's reduce-scatter -- None
    past either end --, kind of unit u) -- each with its count, in the order of its first unit."""
    last = len(sizes) - 1
    forward = Counter((gathered[u], kinds[u - 1]) for u in range(1, len(sizes)))
    backward = Counter((gathered[u - 1] if u > 0 else None, sizes[u + 1] if u < last else None, kinds[u])
                       for u in range(last, -1, -1))
    return tuple(forward.items()), tuple(backward.items())


def _per_unit_overlap(model: ModelSpec, train: TrainConfig, sp, recipe, flops_rate: float, link: comm.Group,
                      contention: float, gathered: tuple[int, ...] | None = None, gathers: int = 2,
                      scatters: bool = True, replicate: comm.Group | None = None,
                      expert: comm.Group | None = None) -> _Overlap:
    """(communication, exposed communication) of one micro-batch of sharded data parallelism,
    unit by unit as FSDP (and DeepSpeed's ZeRO-3) schedules it.

    Forward: each unit's all-gather is issued while the previous unit computes (FSDP2's
    implicit forward prefetch), so it hides behind that unit's forward; the first unit's is
    exposed. Backward (ZeRO-3): while a unit's backward runs, the next unit's all-gather
    (explicit backward prefetch) and the previous unit's reduce-scatter proceed; the first
    unit's all-gather and the last reduce-scatter are exposed. ZeRO-2 keeps the parameters
    gathered from forward to backward: no all-gather in backward. Reduce-scatters carry the
    reduce dtype (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, foreach_reduce).

    ``gathers``: all-gathers this micro-batch runs -- 2 (forward and, ZeRO-3, backward), 1
    (forward only), 0 (the units are gathered already); ``scatters``: whether it reduce-scatters
    (a pipeline stage does on its last micro-batch only); ``replicate``: HSDP's replica group,
    over which each reduced shard is all-reduced; ``expert``: with expert parallelism, the routed
    experts' shard group (efsdp)."""
    dp, zero3 = train.shard_world, train.zero_stage >= 3 and gathers == 2
    sizes, kinds = sp.unit_sizes, sp.unit_kinds
    # bytes each unit all-gathers: its parameters in the gather dtype, or (LoRA) ``gathered``
    gathered = gathered or tuple(n * recipe.gather_bytes for n in sizes)
    # seconds of each distinct unit's all-gather and reduce-scatter this micro-batch runs (0: none)
    gather_of = {n: comm.all_gather_s(n, dp, link) if gathers else 0.0 for n in set(gathered)}
    # HSDP: each reduce-scattered shard is all-reduced across its replicas right after, on the
    # same stream (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, foreach_reduce:
    # all_reduce over the replicate group)
    scatter_of = {n: comm.reduce_scatter_s(n * recipe.reduce_bytes, dp, link) + (comm.all_reduce_s(
        n * recipe.reduce_bytes / dp, train.dp_replicate, replicate) if replicate else 0.0) if scatters else 0.0
        for n in set(sizes)}
    if expert is not None and any(sp.unit_expert_sizes):
        # expert parallelism: a block's routed experts are a parameter group of their own, gathered
        # and reduced over efsdp (torchtitan's per-parameter mesh), the rest over the dense group
        edp = train.expert_shard_world
        experts = dict(zip(sizes, sp.unit_expert_sizes))
        gather_of = {n: comm.all_gather_s(n - e * recipe.gather_bytes, dp, link)
                     + comm.all_gather_s(e * recipe.gather_bytes, edp, expert) if gathers else 0.0
                     for n, e in zip(gathered, sp.unit_expert_sizes)}
        scatter_of = {n: comm.reduce_scatter_s((n - experts[n]) * recipe.reduce_bytes, dp, link)
                      + comm.reduce_scatter_s(experts[n] * recipe.reduce_bytes, edp, expert) if scatters else 0.0
                      for n in set(sizes)}
    work = {kind: unit_flops(model, train, kind) for kind in set(kinds)}
    gather = [gather_of[n] for n in gathered]
    scatter = [scatter_of[n] for n in sizes]
    forward = {kind: w.forward / flops_rate for kind, w in work.items()}
    backward = {kind: (w.backward + w.recompute) / flops_rate for kind, w in work.items()}
    # identical units repeat: each distinct (communication, compute window) pair is costed once,
    # in the order of its first unit (``_unit_transitions``)
    forward_steps, backward_steps = _unit_transitions(gathered, sizes, kinds)
    pairs: Counter = Counter()
    for (n, kind), count in forward_steps:
        pairs[(gather_of[n], forward[kind])] += count
    exposed = gather[0] + sum(n * _exposed(c, w, contention) for (c, w), n in pairs.items())
    last = len(sizes) - 1
    if zero3:
        exposed += gather[last]
    windows: Counter = Counter()
    for (before, after, kind), count in backward_steps:  # backward runs the units in reverse
        hidden = (gather_of[before] if zero3 and before is not None else 0.0) + (
            scatter_of[after] if after is not None else 0.0)
        windows[(hidden, backward[kind])] += count
    exposed += sum(n * _exposed(hidden, w, contention) for (hidden, w), n in windows.items())
    exposed += scatter[0]
    raw = sum(gather) * (2 if zero3 else 1) + sum(scatter)
    return _Overlap(raw, exposed)


def _dp_communication(model: ModelSpec, train: TrainConfig, ctx: _StepContext, stage: _StageCompute) -> _Overlap:
    """Data-parallel and ZeRO collectives of one step (the module docstring's table), and what
    the backward (and, for FSDP all-gathers, the forward) of their micro-batch leaves exposed."""
    zero, dp, m = train.zero_stage, train.shard_world, train.num_microbatches
    if dp <= 1:
        return _Overlap(0.0, 0.0)
    recipe, sp, bwd_window = ctx.recipe, stage.params, stage.backward_window
    grad_bytes = sp.local * recipe.grad_bytes
    param_bytes = sp.local * recipe.param_bytes
    reduce_bytes = sp.local * (recipe.reduce_bytes if zero >= 2 else recipe.grad_bytes)
    link = ctx.links.dp
    c = ctx.k.overlap_contention
    if zero == 0 or (zero == 1 and train.engine == "pytorch"):
        ar = comm.all_reduce_s(grad_bytes, dp, link)
        last_bucket = comm.all_reduce_s(min(train.ddp_bucket_mb * 2**20, grad_bytes), dp, link)
        dp_raw, dp_exposed = ar, _exposed(ar, bwd_window, c) + last_bucket
        if zero == 1:  # ZeroRedundancyOptimizer broadcasts each rank's updated share
            ag = comm.all_gather_s(param_bytes, dp, link)
            dp_raw, dp_exposed = dp_raw + ag, dp_exposed + ag
        return _Overlap(dp_raw, dp_exposed)
    if zero == 1:
        rs = comm.reduce_scatter_s(grad_bytes, dp, link)
        if train.fp8_param_gather:  # Megatron gathers the FP8 primary weights at 1 B per element
            param_bytes -= stage.layers * te_fp8.weight_numel(model, train, "decoder") * (recipe.param_bytes - 1)
        ag = comm.all_gather_s(param_bytes, dp, link)
        return _Overlap(rs + ag, _exposed(rs, bwd_window, c) + ag)
    if zero == 2 and not ctx.engine.zero2_gathers_params:
        # DeepSpeed: scatter per micro-batch, gather the updated parameters once
        rs = comm.reduce_scatter_s(reduce_bytes, dp, link)
        ag = comm.all_gather_s(param_bytes, dp, link)
        return _Overlap(m * rs + ag, m * _exposed(rs, bwd_window, c) + ag)
    # FSDP2 ZeRO-2 (gather in every forward) and ZeRO-3 (gather in forward and backward)
    frozen = stage.frozen
    gathered = frozen.gathered if frozen else (float8.gathered_unit_bytes(
        model, train, sp.unit_sizes, sp.unit_kinds, recipe.gather_bytes) if ctx.f8 else None)
    if train.pp == 1:
        per_mb = _per_unit_overlap(model, train, sp, recipe, ctx.flops_rate, link, c, gathered,
                                   replicate=ctx.links.replicate, expert=ctx.links.expert_dp)
        return _Overlap(m * per_mb.raw, m * per_mb.exposed)
    # FSDP2 under torch.distributed.pipelining: the stage syncs gradients on its last micro-batch
    # only and does not reshard after backward (torch/distributed/pipelining/stage.py,
    # backward_maybe_with_nosync: set_requires_gradient_sync, set_reshard_after_backward), so
    # one reduce-scatter per step; units kept gathered (ZeRO-2, or the implementation's policy:
    # torchtitan) are all-gathered once, in the first micro-batch's forward; ZeRO-3 that
    # reshards after forward gathers again per micro-batch (counted as without a pipeline).
    kept = train.zero_stage == 2 or implementation(train.impl).keeps_units_gathered_with_pp
    run = functools.partial(_per_unit_overlap, model, train, sp, recipe, ctx.flops_rate, link, c, gathered,
                            replicate=ctx.links.replicate, expert=ctx.links.expert_dp)
    if kept:
        if m == 1:
            return run(gathers=1, scatters=True)
        first, last = run(gathers=1, scatters=False), run(gathers=0, scatters=True)
        return _Overlap(first.raw + last.raw, first.exposed + last.exposed)
    others, last = run(gathers=2, scatters=False), run(gathers=2, scatters=True)
    return _Overlap((m - 1) * others.raw + last.raw, (m - 1) * others.exposed + last.exposed)


def _offload_and_optimizer(gpu: GPUSpec, train: TrainConfig, ctx: _StepContext, stage: _StageCompute
                           ) -> tuple[float, float]:
    """(offload, optimizer) seconds per step: with offload, the PCIe copies of the gradients and
    the updated parameters and the CPU Adam update (parameter offload also copies every shard up
    and down per micro-batch, beside its compute); else the optimizer's pass over HBM (a paged
    optimizer's state also pages in from host memory and back out)."""
    zero, m, recipe, k, sp = train.zero_stage, train.num_microbatches, ctx.recipe, ctx.k, stage.params
    n_state = sp.optimizer_share if zero == 1 else (sp.sharded if zero >= 2 else sp.local)
    offload = 0.0
    if train.offload != "none":
        d2h = comm.host_transfer_s(n_state * recipe.grad_bytes, gpu, k.host_link_efficiency)
        h2d = comm.host_transfer_s(n_state * recipe.param_bytes, gpu, k.host_link_efficiency)
        cpu_adam = n_state / k.cpu_adam_params_per_s
        offload = d2h + cpu_adam + h2d
        if train.offload == "params":
            # every all-gather first copies the parameter shard up, every gradient shard comes down
            per_mb = comm.host_transfer_s(sp.sharded * recipe.gather_bytes * 2 + sp.sharded * recipe.grad_bytes,
                                          gpu, k.host_link_efficiency)
            offload += m * _exposed(per_mb, stage.forward_window + stage.backward_window, k.overlap_contention)
        return offload, 0.0
    master_or_param = recipe.master_bytes or recipe.param_bytes
    states = optimizer_state_bytes(train.optimizer, n_state, recipe.state_bytes,
                                   (train.exp_avg_dtype, train.exp_avg_sq_dtype))
    touched = (n_state * (2 * master_or_param + recipe.grad_bytes + (recipe.param_bytes if recipe.has_master else 0))
               + 2 * states)
    optimizer = touched / (gpu.hbm_bandwidth_gb_s * 1e9 * k.optimizer_hbm_efficiency)
    if train.paged_optimizer:  # the state pages in from host memory for the step and back out
        offload += 2 * comm.host_transfer_s(states, gpu, k.host_link_efficiency)
    return offload, optimizer


class _Tail(NamedTuple):
    """One stage's data-parallel tail, seconds per step (after its pipeline drains)."""

    dp_exposed: float
    dp_raw: float  # before overlap, for reference
    offload: float
    optimizer: float

    @property
    def seconds(self) -> float:
        return sum((self.dp_exposed, self.offload, self.optimizer))


def _data_parallel_tail(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, ctx: _StepContext,
                        stage: _StageCompute) -> _Tail:
    dp = _dp_communication(model, train, ctx, stage)
    offload, optimizer = _offload_and_optimizer(gpu, train, ctx, stage)
    return _Tail(dp.exposed, dp.raw, offload, optimizer)


# ---------------------------------------------------------------- assembly


def _throughput(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, ctx: _StepContext, slowest: _StageStep,
                tail: _Tail) -> Throughput:
    """step = pipeline + the worst stage's tail; pipeline = (m + (p - 1)/v) x T_mb of the slowest stage."""
    p, v, m = train.pp, train.chunks, train.num_microbatches
    t_mb = slowest.micro_batch_s
    bubble = (p - 1) / v * t_mb if p > 1 else 0.0
    pipeline = m * t_mb + bubble
    step = pipeline + tail.dp_exposed + tail.offload + tail.optimizer
    if not math.isfinite(step) or step <= 0:
        raise ConfigError(f"the predicted step time is not a finite positive number ({step}); check the GPU's peaks "
                          f"and bandwidths and the calibration's efficiencies")
    tokens = train.global_batch * train.seq_len
    model_flops = model_flops_per_step(model, train)
    hardware_flops = hardware_flops_per_step(model, train)
    peak, dtype, efficiency, k = ctx.peak, ctx.dtype, ctx.efficiency, ctx.k
    compute, collectives = slowest.compute, slowest.comm
    return Throughput(
        step_time_s=step,
        tokens_per_s=tokens / step,
        tokens_per_s_per_gpu=tokens / step / train.gpus,
        mfu=model_flops / (step * train.gpus * peak),
        hfu=hardware_flops / (step * train.gpus * peak),
        model_tflops_per_gpu=model_flops / step / train.gpus / 1e12,
        hardware_tflops_per_gpu=hardware_flops / step / train.gpus / 1e12,
        breakdown=StepBreakdown(
            compute_s=m * compute.compute,
            recompute_s=m * compute.recompute,
            tp_communication_s=m * collectives.tp_s,
            cp_communication_s=m * collectives.ring_exposed,
            pp_communication_s=m * collectives.pp_s,
            ep_communication_s=m * collectives.ep_s,
            dp_communication_exposed_s=tail.dp_exposed,
            bubble_s=bubble,
            offload_s=tail.offload,
            optimizer_s=tail.optimizer,
        ),
        dp_communication_s=tail.dp_raw,
        cp_communication_s=m * collectives.ring_raw,
        cp_ring_bytes=m * collectives.ring_bytes,
        compute_efficiency=efficiency,
        calibrated=ctx.cal.calibrated,
        mfu_peak=dtype,
        # the fastest rate any FLOP runs at: the model-wide efficiency or the attention kernel's
        # (compiled, inductor's fusions divide the compute time by compile_compute_speedup, above)
        mfu_bound=max(efficiency, ctx.attention_rate / peak)
        * (k.compile_compute_speedup if train.compile and not ctx.per_op else 1.0)
        * (gpu.peak_tflops.fp8 / gpu.peak_tflops.for_dtype(dtype) if (ctx.f8 or ctx.te) and gpu.peak_tflops.fp8
           else 1.0),
    )


def estimate_step(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, calibration: Calibration | None = None,
                  gpus_per_node: int | None = None, check: bool = True) -> Throughput:
    """One optimizer step on the slowest pipeline stage (the module docstring's formula): each
    representative stage's micro-batch (its compute, then the collectives on its critical path),
    the slowest of them through the pipeline with its bubble, then the worst stage's
    data-parallel tail (exposed DP communication, offload, optimizer)."""
    if check:
        check_layout(model, train)
    ctx = _step_context(model, gpu, train, calibration, gpus_per_node)
    stages = representative_stages(model, train.pp, train.chunks)
    per_stage = {}
    for i in stages:
        compute = _stage_compute(model, gpu, train, ctx, i)
        per_stage[i] = _StageStep(compute, _stage_collectives(model, train, ctx, compute))
    slowest = per_stage[max(stages, key=lambda i: per_stage[i].micro_batch_s)]
    tails = {i: _data_parallel_tail(model, gpu, train, ctx, per_stage[i].compute) for i in stages}
    worst_tail = tails[max(stages, key=lambda i: tails[i].seconds)]
    return _throughput(model, gpu, train, ctx, slowest, worst_tail)
