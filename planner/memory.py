"""Per-GPU memory: per rank, per pipeline stage, per component, at the peak phase.

The model walks one training step on the most loaded rank of each pipeline stage and writes
down what is resident at three moments:

- ``forward``: the end of the forward pass (all in-flight micro-batches' activations, the
  loss's fp32 logits), with ZeRO-3/FSDP gathered parameters;
- ``backward``: the larger of the start of backward (activations still all saved, the loss's
  vocab-wide gradients) and its end (activations freed, all gradients written);
- ``optimizer``: parameters, gradients, optimizer state and the step's scratch.

Between the two ends of the backward pass memory changes linearly (each layer frees its
activations and writes its gradients), so the two ends bound it. The peak is the largest
total over the phases -- not the sum of per-component maxima: a 7B AdamW step peaks at the
optimizer step (16 B/param + scratch) while activations peak in forward, when gradients do
not exist yet.

Model states follow the ZeRO paper (Rajbhandari et al. 2019): with K bytes of optimizer state
per parameter, DDP holds (2 + 2 + K)Psi, ZeRO-1 2Psi + 2Psi + K Psi/N, ZeRO-2
2Psi + (2 + K)Psi/N, ZeRO-3 (2 + 2 + K)Psi/N. ``model_states`` computes exactly that; the
phase model refines it per engine (``planner.engines``) with padding, whole-tensor partitions
and FSDP2's gathered parameters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache, partial
from math import ceil, prod
from typing import Annotated, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, computed_field

from planner import activations as act
from planner import finetune, float8, te_fp8
from planner.allocator import CacheInputs
from planner.calibration import Overheads, default_overheads
from planner.configs import (
    GPUSpec,
    ModelSpec,
    TrainConfig,
    check_layout,
    parse_checkpointing,
)
from planner.engines import ENGINES, EngineSemantics
from planner.errors import ConfigError
from planner.flops import model_forward_flops_per_sequence
from planner.implementations import implementation
from planner.params import (
    active_params,
    embed_tensors,
    greedy_partition_max,
    layer_kind,
    layer_stack,
    expert_local_shape,
    pipeline_stages,
    Unit,
    representative_stages,
    total_params,
)
from planner.precision import (
    ADAM8BIT_BLOCK,
    ADAM8BIT_CHUNK,
    ADAM8BIT_SCRATCH_FIXED,
    ADAM8BIT_SCRATCH_PER_ELEMENT,
    OPTIMIZER_STATES,
    RECIPES,
    Recipe,
    optimizer_state_bytes,
)

COMPONENTS = ("params", "grads", "optimizer", "activations", "temporaries", "overhead")
PHASES = ("forward", "backward", "optimizer")


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class MemoryBreakdown(_Result):
    """Bytes per component at one moment on one rank."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    overhead: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.temporaries + self.overhead


Bytes = Annotated[int, Field(ge=0)]


class RankMemory(_Result):
    """Components at the peak phase, and the peak itself (their sum). The same keys for a
    prediction and a measurement (profiler.report)."""

    params: Bytes
    grads: Bytes
    optimizer: Bytes
    activations: Bytes
    temporaries: Bytes
    overhead: Bytes
    peak: Bytes
    peak_phase: str | None = None


class HostMemory(_Result):
    """Offloaded state held in CPU memory, per GPU rank and per node."""

    params: Bytes = 0
    grads: Bytes = 0
    optimizer: Bytes = 0
    per_rank: Bytes = 0
    per_node: Bytes = 0


class StageMemory(RankMemory):
    stage: int
    first_layer: int
    last_layer: int
    num_params: int = Field(description="parameters of this stage on one tensor-parallel rank")
    inflight_microbatches: float
    saved_activations: int = Field(description="activations saved at the end of forward (all in-flight micro-batches)")
    phases: dict[str, MemoryBreakdown]
    temporaries_detail: dict[str, int] = Field(description="what the temporaries at the peak phase are")
    host: HostMemory
    allocator_cache: int = Field(default=0, description="of the overhead: what PyTorch's caching allocator reserves "
                                 "beyond the allocated peak (planner/allocator.py)")
    communicators: int = Field(default=0, description="NCCL communicators this rank holds")


class ModelSummary(_Result):
    name: str
    num_params: int
    active_params: int = Field(description="parameters one token's forward uses (planner/params.py active_params): "
                                           "num_params for a dense model")


class Limit(_Result):
    """A capacity the layout must fit in, what it needs of it and what there is."""

    name: str = Field(description="'GPU memory' (the worst rank's peak) or 'host memory per node' (offloaded state)")
    needed_bytes: int
    available_bytes: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes


def memory_limits(gpu: GPUSpec, peak: int, host_per_node: int) -> list[Limit]:
    """Every limit a layout is checked against: the GPU's memory, and the node's host memory
    when state is offloaded to it."""
    limits = [Limit(name="GPU memory", needed_bytes=peak, available_bytes=gpu.memory_bytes)]
    if host_per_node:
        limits.append(Limit(name="host memory per node", needed_bytes=host_per_node,
                            available_bytes=gpu.host_memory_per_node_bytes))
    return limits


class MemoryEstimate(_Result):
    model: ModelSummary
    gpu: str
    gpu_memory_bytes: int
    train: TrainConfig
    memory: RankMemory = Field(description="the most loaded rank (worst pipeline stage)")
    stages: list[StageMemory]
    host: HostMemory
    limits: list[Limit] = Field(description="every capacity checked: GPU memory, and host memory per node "
                                            "when state is offloaded")
    fits: bool = Field(description="every limit fits")
    does_not_fit: list[str] = Field(description="the names of the limits that fail (empty when it fits)")
    headroom_bytes: int = Field(description="GPU memory left at the peak (negative: short by that much)")
    max_micro_batch: int = Field(description="largest micro-batch that fits every limit (0: not even 1)")
    overheads: Overheads
    notes: list[str] = []


# ---------------------------------------------------------------- model states (ZeRO paper)


class ModelStates(_Result):
    params: int
    grads: int
    optimizer: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_states(num_params: int, dp: int, zero_stage: int, precision: str = "bf16-mixed",
                 optimizer: str = "adamw", engine: str = "deepspeed") -> ModelStates:
    """Per-rank model states as the ZeRO paper counts them: parameters, gradients and
    optimizer state (fp32 master + states), sharded over ``dp`` ranks by stage, evenly.
    ``engine="megatron"`` adds Megatron's persistent fp32 main-gradient copy."""
    recipe = RECIPES[precision]
    shard = ceil(num_params / dp)
    return ModelStates(
        params=recipe.param_bytes * (shard if zero_stage >= 3 else num_params),
        grads=recipe.grad_bytes * (shard if zero_stage >= 2 else num_params),
        optimizer=_optimizer_bytes(recipe, optimizer, ENGINES[engine], shard if zero_stage >= 1 else num_params),
    )


def _optimizer_bytes(recipe: Recipe, optimizer: str, engine: EngineSemantics, numel: int,
                     moments: tuple[str, str] = ("fp32", "fp32")) -> int:
    """Optimizer-owned bytes for ``numel`` parameters: fp32 masters, the states (8-bit AdamW:
    one byte each plus block scales; the precision-aware optimizer's moment dtypes), Megatron's
    fp32 main gradients."""
    total = recipe.master_bytes * numel + optimizer_state_bytes(optimizer, numel, recipe.state_bytes, moments)
    if engine.fp32_main_grads_in_optimizer and recipe.has_master and recipe.grad_bytes < 4:
        total += 4 * numel
    return total


# ---------------------------------------------------------------- per-stage parameters


@dataclass(frozen=True)
class _StageParams:
    """Element counts of one stage on the most loaded (tp rank 0, dp rank 0) rank."""

    local: int  # after tensor parallelism
    sharded: int  # ZeRO-2/3 shard per engine
    optimizer_share: int  # ZeRO-1 share per engine
    largest_tensor: int  # for per-tensor scratch
    largest_tensor_sharded: int
    largest_unit: int  # largest FSDP unit (unsharded, local to tp)
    last_two_units: int  # the head and the last layer: the first units whose gradients are reduced
    unit_sizes: tuple[int, ...]  # elements of each unit (local to tp), in forward order
    unit_expert_sizes: tuple[int, ...]  # of them, routed experts' (their own shard group: efsdp)
    unit_kinds: tuple[str, ...]
    layer_ids: tuple[int, ...]  # global index of each layer held (layer:N checkpoints by index)
    blocks_local: int  # 8-bit optimizer blocks (256 elements) over the tensors, each tensor its own
    blocks_sharded: int  # the same over their FSDP2 shards
    first_unit: int  # the unit still gathered at the end of backward
    last_unit: int  # the unit that runs just before the loss (the head, on the last stage)
    last_to_differentiate: int  # units whose gradients are still being written then
    matmul_weights: int  # 2-D linear weights (autocast copies)
    layer_kinds: tuple[str, ...]  # the kind of each layer held, in order (planner/params.py layer_kind)
    has_embedding: bool
    has_head: bool
    first_layer: int
    last_layer: int

    @cached_property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @cached_property
    def kind_counts(self) -> tuple[tuple[str, int], ...]:
        """(kind, layers of it) in order of first appearance."""
        return tuple(Counter(self.layer_kinds).items())


@lru_cache(maxsize=16384)
def _stage_params(model: ModelSpec, pp: int, chunks: int, tp: int, dp: int, zero_stage: int, engine_name: str,
                  stage_index: int, ep: int = 1, edp: int = 0) -> _StageParams:
    stage = pipeline_stages(model, pp, chunks)[stage_index]
    return _units_params(model, stage.units, stage.layer_ids, stage.has_embedding, stage.has_head, stage.layers,
                         tp, dp, zero_stage, engine_name, ep, edp or dp)


def stage_params(model: ModelSpec, train: TrainConfig, stage_index: int) -> _StageParams:
    """The parameters of pipeline stage ``stage_index`` on its most loaded rank."""
    return _stage_params(model, train.pp, train.chunks, train.tp, train.shard_world, train.zero_stage, train.engine,
                         stage_index, train.ep, train.expert_shard_world)


def _units_params(model: ModelSpec, units: tuple[Unit, ...], layer_ids: tuple[int, ...], has_embedding: bool,
                  has_head: bool, layers: tuple[int, int], tp: int, dp: int, zero_stage: int,
                  engine_name: str, ep: int = 1, edp: int = 0) -> _StageParams:
    """``dp`` ranks shard the dense tensors (dim 0), ``edp`` the routed experts' (torchtitan's
    efsdp; dim 1 when efsdp x ep exceeds the experts): ``planner/params.py expert_local_shape``."""
    engine = ENGINES[engine_name]
    edp = edp or dp
    # Layers repeat: each distinct unit (by its tensors' shapes) is measured once, each distinct
    # tensor shape counted with its multiplicity (a 10,000-layer model has a few dozen shapes).
    # A tensor is (local shape, shard group, shard dim): the shape on this rank before FSDP/ZeRO.
    per_unit: dict[tuple, tuple[int, int, tuple, int]] = {}  # signature -> (elements, matmuls, tensors, experts')
    unit_sizes, expert_sizes, matmul = [], [], 0
    by_object: dict[int, tuple] = {}  # repeated layers are one Unit object (planner.params.model_units)
    for u in units:
        if id(u) not in by_object:
            by_object[id(u)] = tuple((t.shape, t.tp_dim, t.role) for t in u.tensors)
    signatures = [by_object[id(u)] for u in units]
    for u, signature in zip(units, signatures):
        if signature not in per_unit:
            local = tuple(_local_tensor(model, t, tp, dp, ep, edp, engine.vocab_multiple) for t in u.tensors)
            matmuls = sum(prod(shape) for t, (shape, _, _) in zip(u.tensors, local) if t.is_matmul_weight)
            experts = sum(prod(shape) for t, (shape, _, _) in zip(u.tensors, local) if t.role == "expert")
            per_unit[signature] = (sum(prod(shape) for shape, _, _ in local), matmuls, local, experts)
        size, matmuls, _, experts = per_unit[signature]
        unit_sizes.append(size)
        expert_sizes.append(experts)
        matmul += matmuls
    counts: Counter = Counter()
    for signature, n in Counter(signatures).items():
        for tensor in per_unit[signature][2]:
            counts[tensor] += n
    if not counts:
        counts[((0,), dp, 0)] = 1
    local = sum(n * prod(shape) for (shape, _, _), n in counts.items())

    def shard(tensor: tuple[tuple[int, ...], int, int]) -> int:
        shape, world, dim = tensor
        return ceil(shape[dim] / world) * prod(shape) // shape[dim] if shape[dim] else 0

    sharded = -(-local // dp) if engine.sharding == "flat" else sum(n * shard(t) for t, n in counts.items())
    if zero_stage == 1 and engine.zero1_partition == "greedy-tensors":
        optimizer_share = greedy_partition_max([shape for shape, _, _ in counts.elements()], dp)
    else:
        optimizer_share = sharded
    if model.tied_embeddings and has_head:  # the logits multiply by the embedding
        matmul += prod(embed_tensors(model)[0].local_shape(tp, engine.vocab_multiple))
    # When the stage's first layer is differentiated, its gradients and the embedding's
    # (if the stage has it) are not written yet.
    pending = sum(unit_sizes[:2]) if has_embedding else unit_sizes[0]
    kinds = [u.kind for u in units]
    layer_kinds = tuple(u.kind for u in units if u.is_layer)
    return _StageParams(
        local=local,
        sharded=sharded,
        optimizer_share=optimizer_share,
        largest_tensor=max(prod(shape) for shape, _, _ in counts),
        largest_tensor_sharded=max(shard(t) for t in counts),
        largest_unit=max(unit_sizes),
        last_two_units=sum(unit_sizes[-2:]),
        unit_sizes=tuple(unit_sizes),
        unit_expert_sizes=tuple(expert_sizes),
        unit_kinds=tuple(kinds),
        layer_ids=layer_ids,
        blocks_local=sum(n * -(-prod(shape) // ADAM8BIT_BLOCK) for (shape, _, _), n in counts.items()),
        blocks_sharded=sum(n * -(-shard(t) // ADAM8BIT_BLOCK) for t, n in counts.items()),
        first_unit=unit_sizes[0],
        last_unit=unit_sizes[-1],
        last_to_differentiate=pending,
        matmul_weights=matmul,
        layer_kinds=layer_kinds,
        has_embedding=has_embedding,
        has_head=has_head,
        first_layer=layers[0],
        last_layer=layers[1],
    )


def _local_tensor(model: ModelSpec, tensor, tp: int, dp: int, ep: int, edp: int,
                  vocab_multiple: int) -> tuple[tuple[int, ...], int, int]:
    """(shape on this rank before FSDP/ZeRO, the group that shards it, the dimension it shards)."""
    if tensor.role == "expert":
        shape = expert_local_shape(tensor, model.num_experts, tp, ep, 1)
        return shape, edp, 1 if edp * ep > model.num_experts else 0
    return tensor.local_shape(tp, vocab_multiple if tensor.vocab_parallel else 1), dp, 0


@dataclass(frozen=True)
class _Frozen:
    """A LoRA fine-tune's frozen base on this stage (``planner/finetune.py``), and the units'
    bytes as FSDP2 gathers them (frozen base as stored, trainable tensors in the gather dtype)."""

    local: int  # bytes of the frozen base held unsharded
    sharded: int  # its ZeRO-3 shard
    gathered: tuple[int, ...]  # per unit
    dequantised: int  # largest projection dequantised to the compute dtype (0: not quantised)
    quantised_numel: int  # elements of the quantised projections
    quantised_bytes: int  # their storage


@dataclass(frozen=True)
class _Teacher:
    weight_bytes: int
    logprobs: int  # fp32 [tokens, vocab], per micro-batch
    forward_peak: int  # its forward's last moment: fp32 logits and their log-softmax
    forward_flops: float  # its forward, per micro-batch (no backward)


@lru_cache(maxsize=1024)
def _teacher(model: ModelSpec, train: TrainConfig) -> _Teacher:
    """Distillation (``--teacher``; strategies/train.py): the teacher's forward runs under
    no_grad before the student's; ``F.log_softmax(teacher(x).float())`` keeps fp32 log-probs,
    which the KL term of the loss saves for its backward (Hinton et al. 2015, temperature 1)."""
    from planner.catalog import load_model

    spec = load_model(train.teacher)
    if spec.position_embedding == "learned" and train.seq_len > spec.max_position_embeddings:
        raise ConfigError(f"seq len {train.seq_len} exceeds the {spec.max_position_embeddings} learned positions of "
                          f"the teacher {spec.name}")
    if spec.vocab_size != model.vocab_size:
        raise ConfigError(f"the teacher {spec.name} has {spec.vocab_size} tokens in its vocabulary, the student "
                          f"{model.vocab_size}: distillation compares their distributions token by token")
    recipe = RECIPES[train.precision]
    tokens = train.seq_len * train.micro_batch
    logits = tokens * spec.vocab_size
    return _Teacher(weight_bytes=total_params(spec) * recipe.compute_bytes, logprobs=4 * logits,
                    forward_peak=(recipe.compute_bytes if recipe.compute_bytes < 4 else 0) * logits + 8 * logits,
                    forward_flops=train.micro_batch * model_forward_flops_per_sequence(spec, train.seq_len))


@lru_cache(maxsize=4096)
def _finetune_params(model: ModelSpec, train: TrainConfig) -> tuple[_StageParams, _Frozen]:
    """(trainable tensors as stage parameters, the frozen base) of a LoRA fine-tune (pp = 1)."""
    recipe = RECIPES[train.precision]
    states = finetune.unit_states(model, train, recipe.param_bytes)
    stage = pipeline_stages(model, 1)[0]
    units = tuple(Unit(u.kind, u.trainable) for u in states)
    trainable = _units_params(model, units, stage.layer_ids, stage.has_embedding, stage.has_head, stage.layers,
                              1, train.shard_world, train.zero_stage, train.engine)
    frozen = _Frozen(
        local=sum(u.frozen_bytes for u in states),
        sharded=sum(ceil(u.frozen_bytes / train.shard_world) for u in states),
        gathered=tuple(u.frozen_bytes + u.trainable_numel * recipe.gather_bytes for u in states),
        dequantised=max(u.largest_dequantised for u in states) * recipe.compute_bytes,
        quantised_numel=sum(u.quantised for u in states),
        quantised_bytes=sum(u.quantised_bytes for u in states),
    )
    return trainable, frozen


class _LayerActs(NamedTuple):
    """One block of a kind, per micro-batch (bytes): what it saves under the config's policy,
    without recompute, and under op-level checkpointing what its backward rebuilds and what
    the rebuild releases."""

    saved: int
    no_recompute: int
    op_recompute: int
    op_released: int


@dataclass(frozen=True)
class _ActSums:
    """Activation bytes per micro-batch: per block of each layer kind, and the rest."""

    layers: dict[str, _LayerActs]  # per layer kind of the model
    op_forward_pending: dict[str, int]  # per layer kind
    rebuilt_mlp_backward_freed: int
    rebuilt_mlp_backward_working: int
    embedding: int
    head: int
    loss_forward: int
    loss_backward: int
    workspace: dict[str, int]  # per layer kind
    layer_forward_working: int
    layer_backward_end: int
    layer_backward_extra: dict[str, int]  # per layer kind
    layer_input: int
    rope_tables: int
    forward_logits: int
    forward_cache_per_layer: int
    loss_outside_forward: int
    pipeline_output_inner: int
    pipeline_output_last: int
    pipeline_recv_buffer: int


@lru_cache(maxsize=16384)
def _act_sums(model: ModelSpec, train: act.ActivationInputs) -> _ActSums:
    """Keyed by exactly the fields the activation functions read (``ActivationInputs``)."""
    loss_forward, loss_backward = act.loss_transients(model, train)
    return _ActSums(
        layers={kind: _LayerActs(act.layer_bytes(model, train, kind), act.layer_bytes(model, train, kind, "none"),
                                 act.op_recomputed_bytes(model, train, kind), act.op_released_bytes(model, train, kind))
                for kind, _ in layer_stack(model)},
        op_forward_pending={kind: act.op_forward_pending_bytes(model, train, kind) for kind, _ in layer_stack(model)},
        rebuilt_mlp_backward_freed=act.rebuilt_mlp_backward(model, train)[0],
        rebuilt_mlp_backward_working=act.rebuilt_mlp_backward(model, train)[1],
        embedding=sum(act.embedding_terms(model, train).values()),
        head=sum(act.head_terms(model, train).values()),
        loss_forward=loss_forward,
        loss_backward=loss_backward,
        workspace={kind: act.layer_backward_workspace(model, train, kind) for kind, _ in layer_stack(model)},
        layer_forward_working=act.layer_forward_working(model, train),
        layer_backward_end=act.layer_backward_end_workspace(model, train),
        layer_backward_extra={kind: act.layer_backward_peak_extra(model, train, kind) for kind, _ in layer_stack(model)},
        layer_input=act.layer_bytes(model, train, "decoder", "full"),
        rope_tables=act.rope_table_bytes(model, train),
        forward_logits=act.forward_output_bytes(model, train)[0],
        forward_cache_per_layer=act.forward_output_bytes(model, train)[1],
        loss_outside_forward=act.loss_outside_forward_bytes(model, train),
        pipeline_output_inner=act.pipeline_output_bytes(model, train, last_stage=False),
        pipeline_output_last=act.pipeline_output_bytes(model, train, last_stage=True),
        pipeline_recv_buffer=act.pipeline_recv_buffer_bytes(model, train),
    )


# ---------------------------------------------------------------- the phase model
#
# A stage's memory is read at named moments of one step: in the forward, the loss and the
# stage's last layer; in the backward, the loss's backward, the middle and the end of a layer's
# backward (its first, last and second-to-last layers), the gradient reduction after it; the
# optimizer step. Each moment adds, to the model states that persist (``_model_states``), the
# activations alive then (``_stage_activations``) and the transient buffers of FSDP/ZeRO, the
# loss and the pipeline (``_buffers``); a phase's memory is its largest moment.


@dataclass
class _Mem:
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.temporaries + self.overhead


@dataclass
class _StageResult:
    phases: dict[str, _Mem]
    details: dict[str, dict[str, int]]
    peak_phase: str
    params: _StageParams
    layer_factor: float
    host: tuple[int, int, int]  # params, grads, optimizer
    saved_activations: int  # at the end of forward: what the forward leaves for backward
    cache_inputs: CacheInputs  # what the caching allocator's cache depends on (planner/allocator.py)
    cache: int  # the allocator's cache at the peak, in every phase's overhead

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase].total


_Parts = tuple[tuple[str, "int | float"], ...]
"""A moment's temporaries by name (each name once; zeros allowed)."""


def _sum(parts: _Parts) -> int:
    return sum([int(value) for _, value in parts])


def _largest(moments: list[tuple[_Mem, _Parts]]) -> tuple[_Mem, dict[str, int]]:
    """The moment with the most memory (the first of equals), its temporaries by name."""
    mem, parts = max(moments, key=lambda m: m[0].total)
    return mem, {name: int(value) for name, value in parts if value}


class _States(NamedTuple):
    """The model states of the stage's rank (bytes, elements where ``n_``), and how they change
    over the step."""

    sp: _StageParams  # what trains (a fine-tune: the adapters)
    trecipe: Recipe  # what the trainable parameters are stored and stepped in
    gathered_units: tuple[int, ...]  # bytes of each unit as FSDP2 gathers it
    dequantised: int  # a quantised base's largest projection, dequantised for its matmul
    teacher: _Teacher | None
    n_param: int
    n_grad: int
    n_state: int
    largest_tensor: int  # of what trains, as the optimizer sees it (sharded by ZeRO-2/3)
    params: int
    optimizer: int
    paged: int  # optimizer state paged out to host memory
    grads_full: int
    in_flight: int  # optimizer in backward: the one gradient not yet applied
    grads_at_end: int  # at the end of backward
    grads_persist: bool  # DDP's buckets and engines that keep gradients between steps
    grads_in_forward: int


def _model_states(model: ModelSpec, train: TrainConfig, sp: _StageParams) -> _States:
    recipe, engine = RECIPES[train.precision], ENGINES[train.engine]
    zero, offload = train.zero_stage, train.offload
    # bytes of each unit as FSDP2 gathers it (Float8 tensorwise: the projections in fp8)
    gathered_units = float8.gathered_unit_bytes(model, train, sp.unit_sizes, sp.unit_kinds, recipe.gather_bytes)
    frozen_resident, dequantised = 0, 0
    trecipe = recipe
    if train.finetune != "full":
        if train.lora_dtype == "fp32":  # fp32 adapters: fp32 gradients and states, no master copy
            trecipe = RECIPES["fp32"]
        # what trains is the adapters: gradients, optimizer state and sharding follow them; the
        # frozen base is resident, sharded by ZeRO-3 (planner/finetune.py)
        sp, frozen = _finetune_params(model, train)
        gathered_units = frozen.gathered
        frozen_resident = frozen.sharded if zero >= 3 or (zero == 2 and engine.zero2_gathers_params) else frozen.local
        dequantised = frozen.dequantised
        sp = replace(sp, matmul_weights=0)
    n_param = sp.sharded if zero >= 3 or (zero == 2 and engine.zero2_gathers_params) else sp.local
    n_grad = sp.sharded if zero >= 2 else sp.local
    n_state = sp.optimizer_share if zero == 1 else (sp.sharded if zero >= 2 else sp.local)
    largest_tensor = sp.largest_tensor_sharded if zero >= 2 else sp.largest_tensor
    teacher = _teacher(model, train) if train.teacher else None
    # distillation: the teacher's weights, frozen in the compute dtype, on every rank
    frozen_resident += teacher.weight_bytes if teacher else 0
    params = 0 if offload == "params" else n_param * trecipe.param_bytes + frozen_resident
    if te_fp8.te_recipe(train.precision) and not train.fp8_param_gather:
        # Transformer Engine's FP8 weight copies, cached for the step (with FP8 primary weights the
        # parameter is the FP8 copy: 1 B and its persistent 1 B transpose on Hopper, as bf16's 2 B)
        params += int(sum(n * te_fp8.weight_cache_bytes(model, train, kind) for kind, n in sp.kind_counts))
    optimizer = 0 if offload != "none" else _optimizer_bytes(trecipe, train.optimizer, engine, n_state,
                                                             (train.exp_avg_dtype, train.exp_avg_sq_dtype))
    if train.optimizer == "adamw8bit" and offload == "none":
        # one absmax per block of 256 of each tensor (not of the rank's total)
        blocks = sp.blocks_sharded if zero >= 2 else sp.blocks_local if zero == 0 else -(
            -sp.blocks_local * sp.optimizer_share // max(sp.local, 1))
        optimizer += OPTIMIZER_STATES["adamw8bit"] * 4 * (blocks - -(-n_state // ADAM8BIT_BLOCK))
    grads_full = n_grad * trecipe.grad_bytes
    # optimizer in backward: each gradient is applied and freed as it arrives -- one tensor's
    # gradient at a time (PyTorch's register_post_accumulate_grad_hook recipe)
    in_flight = 0
    if train.optimizer_in_backward:
        grads_full, in_flight = 0, largest_tensor * trecipe.grad_bytes
    paged = 0
    if train.paged_optimizer:  # the state lives in host memory, paged in for the step
        optimizer, paged = 0, optimizer
    # Offloading moves gradients to the host: DeepSpeed streams them out during backward; our
    # PyTorch offload copies them after backward, so they are on the GPU until then.
    grads_on_gpu = offload == "none" or (offload == "optimizer" and train.engine == "pytorch")
    grads_at_end = grads_full if grads_on_gpu else 0
    # DDP's buckets (gradient_as_bucket_view) outlive zero_grad; a single process has no DDP.
    # FSDP2 (zero_grad(set_to_none=True)) has no gradients in the first micro-batch's forward;
    # later micro-batches (accumulation, or any pipeline) run with the accumulated shards --
    # except under a pipeline, whose last micro-batch's backward writes them (``_buffers``).
    grads_persist = (zero <= 1 and train.shard_world > 1) or engine.grads_between_steps
    grads_in_forward = grads_at_end if grads_persist or train.num_microbatches > 1 else 0
    if _pipeline_fsdp(train):
        grads_in_forward = 0
    return _States(sp, trecipe, gathered_units, dequantised, teacher, n_param, n_grad, n_state, largest_tensor,
                   params, optimizer, paged, grads_full, in_flight, grads_at_end, grads_persist, grads_in_forward)


def _fsdp2(train: TrainConfig) -> bool:
    """ZeRO-2/3 on the pytorch engine: FSDP2 owns the parameters."""
    return train.engine == "pytorch" and train.zero_stage >= 2


def _pipeline_fsdp(train: TrainConfig) -> bool:
    """FSDP2 under torch.distributed.pipelining."""
    return _fsdp2(train) and train.pp > 1


class _Saved(NamedTuple):
    """What one of the stage's layers saves for its backward, and rebuilds in it (bytes)."""

    saved: int
    recomputed: int


class _Activations(NamedTuple):
    """The stage's activations at the end of its forward (``total``), its parts, and what its
    first, last and second-to-last layers save and rebuild."""

    policy: str
    layer_factor: float  # micro-batches in flight (planner/activations.py inflight)
    head_count: int
    total: int
    layers: int  # one micro-batch's layers (their outputs on an inner stage included)
    autocast: int
    embedding: int
    head: int
    rope: int
    last: _Saved  # the stage's last layer: the first one the backward reaches
    first: _Saved
    second: _Saved  # the second-to-last layer ((0, 0) with one layer)
    largest_saved: int  # the largest block's saved bytes (the allocator cache's block)
    cache_out: int  # a Hugging Face forward's returned KV cache
    outputs: int  # what the model's forward returns, dropped before backward


def _stage_activations(model: ModelSpec, train: TrainConfig, stage_index: int, sp: _StageParams, sums: _ActSums,
                       teacher: _Teacher | None) -> _Activations:
    """One micro-batch's worth of each part; ``act.inflight`` says how many are alive. Each
    layer counts as its kind (``sums.layers``): a stage across T5's encoder/decoder boundary
    sums encoder and decoder blocks each at its own."""
    layer_factor, embed_count, head_count = act.inflight(train, stage_index)
    policy, every = parse_checkpointing(train.activation_checkpointing)
    # layer:N checkpoints the N-th, 2N-th, ... block fully and leaves the others alone
    checkpointed = [(i + 1) % every == 0 if policy == "layer" else policy == "full" for i in sp.layer_ids]
    layers_mb = sum(n * sums.layers[kind].saved for kind, n in sp.kind_counts)
    if policy == "layer":  # a checkpointed block keeps its input only
        layers_mb += sum(sums.layer_input - sums.layers[kind].saved
                         for kind, c in zip(sp.layer_kinds, checkpointed) if c)
    embed_mb = sums.embedding if sp.has_embedding else 0
    # the pipeline keeps each in-flight micro-batch's stage output (logits on the last stage)
    head_mb = (sums.head + sums.pipeline_output_last) if sp.has_head else 0
    # torch.autocast casts each linear weight to bf16 per forward, and linear saves the cast.
    autocast_mb = 2 * sp.matmul_weights if train.precision == "amp-bf16" and train.zero_stage <= 1 else 0
    layers_mb += 0 if sp.has_head else sums.pipeline_output_inner
    # one cast of the RoPE tables per forward of the stage (per model chunk, interleaved)
    rope_mb = sums.rope_tables if sp.num_layers else 0
    if teacher is not None:  # its fp32 log-probabilities, kept by the loss through backward
        head_mb += teacher.logprobs
    activations = (int(layer_factor * (layers_mb + autocast_mb)) + round(layer_factor * train.chunks) * rope_mb
                   + embed_count * embed_mb + head_count * head_mb)

    def layer(position: int) -> _Saved:
        """What the stage's layer at ``position`` saves, and recomputes in its backward."""
        if not sp.num_layers:
            return _Saved(0, 0)
        block = sums.layers[sp.layer_kinds[position]]
        if policy == "layer":
            if checkpointed[position]:
                return _Saved(sums.layer_input, block.no_recompute - sums.layer_input)
            return _Saved(block.saved, 0)
        if policy == "op":  # its backward rebuilds what the policy did not keep, less what that releases
            return _Saved(block.saved, block.op_recompute - block.op_released)
        return _Saved(block.saved, block.no_recompute - sums.layer_input if policy == "full" else 0)

    # what the model's forward returns (Hugging Face: logits, KV cache), dropped before backward
    cache_out = sums.forward_cache_per_layer * sp.num_layers
    return _Activations(
        policy, layer_factor, head_count, activations, layers_mb, autocast_mb, embed_mb, head_mb, rope_mb,
        last=layer(-1), first=layer(0), second=layer(-2) if sp.num_layers >= 2 else _Saved(0, 0),
        largest_saved=max((sums.layers[kind].saved for kind, _ in sp.kind_counts), default=0),
        cache_out=cache_out, outputs=cache_out + (sums.forward_logits if sp.has_head else 0))


class _Gathered(NamedTuple):
    """Parameters FSDP/ZeRO holds gathered (bytes) at the forward's layers, the end of the
    backward, the loss, and the loss's backward."""

    forward: int
    backward_end: int
    at_loss: int
    at_loss_backward: int


class _UnitExtremes(NamedTuple):
    """What the phase model reads of a stage's gathered unit sizes (bytes, in unit order)."""

    pair: int  # the largest two adjacent units (the current and the prefetched), or the one unit
    pair_after_first: int  # the same past the first unit (three or more units)
    # the largest unit's unshard: FSDP2 unshards a unit into an all-gather buffer and copies it out
    # to the unsharded parameters before the previous unit's all-gather buffer is released
    # (measured with FSDPMemTracker, torch 2.13: three layers' worth at each layer's pre-forward)
    unshard: int
    largest: int
    largest_three: int
    total: int


@lru_cache(maxsize=4096)
def _unit_extremes(g: tuple[int, ...]) -> _UnitExtremes:
    return _UnitExtremes(
        pair=max([a + b for a, b in zip(g, g[1:])] or g),
        pair_after_first=max(a + b for a, b in zip(g[1:], g[2:])) if len(g) > 2 else 0,
        unshard=max([2 * g[0]] + [a + 2 * b for a, b in zip(g, g[1:])]),
        largest=max(g),
        largest_three=sum(sorted(g, reverse=True)[:3]),
        total=sum(g))


def _gathered(train: TrainConfig, engine: EngineSemantics, sp: _StageParams, g: tuple[int, ...],
              units_stay_gathered: bool) -> _Gathered:
    units = _unit_extremes(g)
    pair = units.pair  # the current and the prefetched unit
    pipeline_fsdp = _pipeline_fsdp(train)
    if train.zero_stage >= 3 and not (train.pp > 1 and train.engine == "pytorch" and units_stay_gathered):
        # current + prefetched unit while layers run; at the loss only the unit that ran last
        # (the head) is still gathered -- FSDP2 frees it in its backward
        forward = pair
        if pipeline_fsdp and sp.has_embedding and len(g) > 2:
            # a pipeline's steady state peaks in a micro-batch's backward among the layers: the
            # embedding's unit is gathered only around the first layer
            forward = units.pair_after_first
        return _Gathered(forward, pair, g[-1], 0)
    if (train.zero_stage == 2 and engine.zero2_gathers_params) or units_stay_gathered:
        # ZeRO-2 as FSDP2, and units kept gathered under a pipeline: at the first layer's
        # backward the embedding's unit and that layer's are gathered (under a pipeline: all of
        # them, until the last micro-batch); at the loss, also the all-gather buffer of the
        # unit that ran last, not yet released
        everything = units.total
        end = everything if pipeline_fsdp else g[0] + (g[1] if len(g) > 1 else 0)
        return _Gathered(everything, end, everything + g[-1], everything)
    return _Gathered(0, 0, 0, 0)


class _Buffers(NamedTuple):
    """The transient buffers of one micro-batch's step (bytes): FSDP/ZeRO's gathered units and
    gradient reduction, the loss's logits, the pipeline's receive buffers."""

    fsdp_units: bool  # FSDP2 ZeRO-3 without a pipeline: unit-by-unit moments (``_fsdp_layer_moments``)
    gathered: _Gathered
    unshard: int  # the largest unit's unshard: its all-gather buffer, its copy and the unit before
    largest_gathered: int
    tied_gathered: int
    unsharded_grads: int  # a pipeline stage's unsharded gradients (FSDP2 under pipelining)
    unsharded_before_backward: int
    loss_forward: int
    loss_backward: int
    workspace: int
    fp8_work: int
    grad_reduce: int
    recv_buffers: int


def _buffers(model: ModelSpec, train: TrainConfig, stage_index: int, st: _States, acts: _Activations,
             sums: _ActSums) -> _Buffers:
    recipe, engine, sp, g = RECIPES[train.precision], ENGINES[train.engine], st.sp, st.gathered_units
    fsdp = _fsdp2(train)
    # FSDP2 ZeRO-3 without a pipeline: units are all-gathered and reduce-scattered one at a
    # time, each with its own buffers (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py)
    fsdp_units = fsdp and train.zero_stage >= 3 and train.pp == 1
    # A tied head multiplies by the embedding after the embedding's unit ran: the strategy
    # layer keeps that unit gathered from its forward to its backward (strategies/fsdp.py).
    tied_gathered = g[0] if fsdp_units and model.tied_embeddings and sp.has_embedding and sp.has_head else 0
    # FSDP2 under torch.distributed.pipelining: the stage turns off resharding after backward and
    # gradient sync until its last micro-batch (torch/distributed/pipelining/stage.py,
    # backward_maybe_with_nosync: set_reshard_after_backward(False), set_requires_gradient_sync(False)).
    # Each unit's unsharded gradients therefore stay, accumulated over the micro-batches in the
    # reduce dtype where it differs from the compute dtype (FSDPParam.to_accumulated_grad_if_needed),
    # until the last micro-batch's backward reduce-scatters them; in the steady state of the
    # schedule every unit's are there. ZeRO-3 still reshards after each forward unless the
    # implementation keeps units gathered under a pipeline (torchtitan's policy).
    pipeline_fsdp = _pipeline_fsdp(train)
    units_stay_gathered = pipeline_fsdp and implementation(train.impl).keeps_units_gathered_with_pp
    unsharded_grads = sum(sp.unit_sizes) * st.trecipe.reduce_bytes if pipeline_fsdp else 0
    loss_fwd, loss_bwd = (sums.loss_forward, sums.loss_backward) if sp.has_head else (0, 0)
    if st.teacher is not None and sp.has_head:
        # the KL term, exp(t) * (t - s) over [tokens, vocab] in fp32: three such tensors at once
        loss_fwd = max(loss_fwd, 3 * st.teacher.logprobs + act.frozen_head_hidden_bytes(model, train))
    # Float8: one projection's backward, its casts included (planner/float8.py), is a moment of
    # its own beside each moment in the middle of a layer's backward. By the other projections'
    # backward the MLP's saved tensors are freed: the down projection's input, the activation's
    # output and the up projection's output (gated), or fc2's input (GELU).
    fp8_work = max((float8.backward_working_bytes(model, train, kind, (2 if model.mlp == "gelu" else 3)
                                                  * sums.rebuilt_mlp_backward_freed) for kind, _ in sp.kind_counts),
                   default=0) if float8.float8_recipe(train.precision) else 0
    extremes = _unit_extremes(g)
    recv_buffers = 0
    if sums.pipeline_recv_buffer:
        chunk_indices = [stage_index + c * train.pp for c in range(train.chunks)]
        last_chunk = train.pp * train.chunks - 1
        directions = sum((i != 0) + (i != last_chunk) for i in chunk_indices)
        recv_buffers = directions * train.num_microbatches * sums.pipeline_recv_buffer
    return _Buffers(
        fsdp_units=fsdp_units,
        gathered=_gathered(train, engine, sp, g, units_stay_gathered),
        unshard=extremes.unshard,
        largest_gathered=extremes.largest,
        tied_gathered=tied_gathered,
        unsharded_grads=unsharded_grads,
        # with GPipe every forward runs before the first backward: none are there at the end of
        # forward; with 1F1B the steady state's forwards and backwards run beside all of them
        unsharded_before_backward=0 if train.schedule == "gpipe" else unsharded_grads,
        loss_forward=loss_fwd, loss_backward=loss_bwd,
        workspace=max(sums.workspace[kind] for kind, _ in sp.kind_counts) if sp.num_layers else 0,
        fp8_work=fp8_work,
        grad_reduce=_gradient_reduction(train, engine, sp, st.trecipe, recipe.gather_bytes),
        recv_buffers=recv_buffers)


def _gradient_reduction(train: TrainConfig, engine: EngineSemantics, sp: _StageParams, trecipe: Recipe,
                        gather: int) -> int:
    """The buffers of one unit's (or bucket's) gradient reduction after its backward."""
    if _pipeline_fsdp(train):
        # no reduce-scatter before the last micro-batch: a unit's new gradient is accumulated
        # into its unsharded gradient (``_Buffers.unsharded_grads``), in the reduce dtype where it differs
        return sp.largest_unit * gather if trecipe.reduce_bytes != gather else 0
    if _fsdp2(train):
        # a unit's unsharded gradient (compute dtype) and the reduce-scatter input (reduce dtype)
        return sp.largest_unit * (gather + trecipe.reduce_bytes)
    if engine.reduce_bucket_elements and train.zero_stage >= 1:
        return min(engine.reduce_bucket_elements, sp.local) * trecipe.grad_bytes
    if not engine.grads_between_steps:
        # autograd's gradient of one tensor before DDP copies it into its bucket view
        return sp.largest_tensor * trecipe.grad_bytes
    return 0


def _forward_peak(train: TrainConfig, st: _States, acts: _Activations, buf: _Buffers,
                  sums: _ActSums) -> tuple[_Mem, dict[str, int]]:
    """Moments of the forward pass: the loss (all activations, the fp32 logits) and the last
    layer (the head's activations not yet written, the gathered units). Under FSDP2 ZeRO-3 the
    last layer has two: its unshard (its input saved, three units' worth of parameters) and,
    with full recompute, the peak of its own forward, whose intermediate tensors live until the
    layer returns although none is saved."""
    total, head, cache_out = acts.total, acts.head, acts.cache_out
    last_layer = [(total - head + cache_out, buf.gathered.forward, 0)]
    if buf.fsdp_units:
        unshard_acts = total - head - acts.last.saved + (sums.layer_input if st.sp.num_layers else 0)
        last_layer = [(unshard_acts + cache_out, buf.unshard, 0)]
        if acts.last.recomputed:  # the last layer is checkpointed (fully, or op by op)
            pending = sums.op_forward_pending[st.sp.layer_kinds[-1]] if acts.policy == "op" else 0
            last_layer.append((total - head + cache_out + sums.layer_forward_working - pending, buf.gathered.forward, 0))
    moments: list[tuple[_Mem, _Parts]] = []
    for saved, gathered, loss in ((total + acts.outputs, buf.gathered.at_loss, buf.loss_forward), *last_layer):
        parts = (("gathered_params", gathered + buf.tied_gathered),
                 ("unsharded_gradients", buf.unsharded_before_backward),
                 ("loss_logits_fp32", loss),
                 ("pipeline_recv_buffers", buf.recv_buffers),
                 ("dequantised_weight", st.dequantised if not loss else 0))
        moments.append((_Mem(st.params, st.grads_in_forward, st.optimizer, max(int(saved), 0), _sum(parts)), parts))
    if st.teacher is not None:
        # the teacher's forward, before the student's: its log-softmax over the fp32 logits
        parts = (("teacher_forward", st.teacher.forward_peak),)
        moments.append((_Mem(st.params, st.grads_in_forward, st.optimizer, 0, _sum(parts)), parts))
    return _largest(moments)


class _Moment(NamedTuple):
    """One moment in a layer's backward (bytes)."""

    activations: int
    grads: int
    gathered: int
    work: int  # activation gradients and the backward's workspace
    reduce: int  # gradient reduction buffers
    recompute: int  # what the layer's backward rebuilt
    fp8: int = 0  # a Float8 projection's backward


class _LayerMoments(NamedTuple):
    moments: list[_Moment]
    mid_layer: list[_Moment]  # those in the middle of a layer's backward, before its MLP's backward ran


def _layer_moments(model: ModelSpec, train: TrainConfig, st: _States, acts: _Activations, buf: _Buffers,
                   sums: _ActSums, end_acts: int, grads_before_first_layer: int) -> _LayerMoments:
    """The last layer's backward (head freed; activation gradients and, with recompute, the
    rebuilt layer); right after it, that layer's gradient reduction (its activations freed);
    and the stage's first layer's backward (this micro-batch's activations freed, gradients
    written)."""
    sp, g, total, head = st.sp, buf.gathered, acts.total, acts.head
    last, first = (sp.layer_kinds[-1], sp.layer_kinds[0]) if sp.num_layers else ("decoder", "decoder")
    work = sums.workspace if sp.num_layers else {last: 0, first: 0}
    moments = [
        _Moment(total - head, st.grads_in_forward, g.forward, work[last], 0, acts.last.recomputed),
        _Moment(total - head - acts.last.saved, st.grads_in_forward, g.forward, 0, buf.grad_reduce, 0),
        _Moment(end_acts, grads_before_first_layer, g.backward_end, work[first], buf.grad_reduce,
                acts.first.recomputed),
    ]
    mid_layer = [moments[0], moments[2]]
    if sp.num_layers:
        # a rebuilt block (checkpointed fully, or op by op) peaks in its MLP's elementwise
        # backward (``act.rebuilt_mlp_backward``): the down projection's input freed and its
        # weight gradient written; in the last layer, after the head's gradients. An MoE
        # block's moments (``act.moe_backward_extra``, its workspace) hold its own weight
        # gradients already, rebuilt or not.
        freed, working = sums.rebuilt_mlp_backward_freed, sums.rebuilt_mlp_backward_working
        per_param = st.grads_at_end // sp.local if sp.local and not st.grads_persist else 0
        down_grad = per_param * model.hidden_size * (model.ffn_hidden_size // train.tp)
        head_grads = per_param * sp.last_unit if sp.has_head else 0
        if layer_kind(model, last).experts:
            moments[0] = moments[0]._replace(grads=st.grads_in_forward + head_grads)
        elif acts.last.recomputed:
            moments[0] = _Moment(total - head - freed, st.grads_in_forward + head_grads + down_grad, g.forward,
                                 working, 0, acts.last.recomputed)
        if acts.first.recomputed and not layer_kind(model, first).experts:
            moments[2] = _Moment(end_acts - freed, grads_before_first_layer + down_grad, g.backward_end, working,
                                 buf.grad_reduce, acts.first.recomputed)
    return _LayerMoments(moments, mid_layer)


def _fsdp_layer_moments(train: TrainConfig, st: _States, acts: _Activations, buf: _Buffers, sums: _ActSums,
                        end_acts: int, grads_before_first_layer: int) -> _LayerMoments:
    """FSDP2 ZeRO-3 without a pipeline, unit by unit. Measured with FSDPMemTracker (torch 2.13,
    llama-2-13b ZeRO-3 on 16, full recompute): while a layer's backward runs, the previous
    unit's reduce-scatter input waits (one unit in the reduce dtype) beside this unit's
    all-gather buffer and unsharded copy; at the layer's post-backward its parameters are
    resharded, and its unsharded gradients and their reduce-scatter input sit beside the next
    unit's prefetched all-gather. A layer's backward has two peaks: in its middle (its saved or
    recomputed activations and the activation gradients) and at its end, its first norm's
    backward (the layer's activations freed but for the norm's input; all its weight gradients
    unsharded)."""
    sp, g, total, head = st.sp, buf.gathered, acts.total, acts.head
    pending = sp.largest_unit * st.trecipe.reduce_bytes
    unit_grads = sp.largest_unit * RECIPES[train.precision].gather_bytes
    has_layers = sp.num_layers > 0
    end_work = sums.layer_backward_end if has_layers else 0
    layer_input = sums.layer_input if has_layers else 0

    def workspace(position: int) -> int:
        """What the layer at ``position`` (of this stage's) holds beyond its saved tensors."""
        return sums.layer_backward_extra[sp.layer_kinds[position]] if has_layers else 0

    def grads_after(units: int) -> int:
        """The units whose backward ran already hold their sharded gradients: the head's during
        the last layer's backward, the head's and the last layer's after it."""
        if st.grads_persist or not sp.local:
            return st.grads_in_forward
        return min(st.grads_at_end, st.grads_in_forward + st.grads_at_end * min(units, sp.local) // sp.local)

    in_last_layer = grads_after(sp.last_unit if sp.has_head else 0)
    after_last_layer = grads_after(sp.last_two_units)
    mid_layer = [_Moment(total - head, in_last_layer, g.forward, workspace(-1), 0, acts.last.recomputed),
                 _Moment(end_acts, grads_before_first_layer, g.backward_end, workspace(0), pending,
                         acts.first.recomputed)]
    moments = [
        mid_layer[0],
        _Moment(total - head - acts.last.saved, st.grads_in_forward, buf.largest_gathered, 0, buf.grad_reduce, 0),
        mid_layer[1],
        _Moment(end_acts + layer_input - acts.first.saved, grads_before_first_layer, g.backward_end, end_work,
                pending + unit_grads, 0),
    ]
    if sp.num_layers >= 2:
        # the second-to-last layer (its own policy under layer:N), the last layer's freed
        second = total - head - acts.last.saved
        mid_layer.append(_Moment(second, after_last_layer, g.forward, workspace(-2), pending, acts.second.recomputed))
        moments += [mid_layer[-1],
                    _Moment(second - acts.second.saved + sums.layer_input, after_last_layer, g.forward, end_work,
                            pending + unit_grads, 0)]
    return _LayerMoments(moments, mid_layer)


def _backward_peak(model: ModelSpec, train: TrainConfig, st: _States, acts: _Activations, buf: _Buffers,
                   sums: _ActSums) -> tuple[_Mem, dict[str, int]]:
    """Moments of the backward pass: the loss's backward (last stage), then the layers'
    (``_layer_moments``, or unit by unit ``_fsdp_layer_moments``), a Float8 projection's
    backward, and under GPipe the moment after the first micro-batch's backward."""
    sp = st.sp
    moments: list[tuple[_Mem, _Parts]] = []
    if sp.has_head:
        parts = (("gathered_params", buf.gathered.at_loss_backward + buf.tied_gathered),
                 ("unsharded_gradients", buf.unsharded_before_backward),
                 ("loss_gradients_fp32", buf.loss_backward),
                 ("pipeline_recv_buffers", buf.recv_buffers))
        moments.append((_Mem(st.params, st.grads_in_forward, st.optimizer, acts.total, _sum(parts)), parts))
    if st.grads_persist or not sp.local:
        grads_before_first_layer = st.grads_at_end
    else:
        grads_before_first_layer = st.grads_at_end * (sp.local - sp.last_to_differentiate) // sp.local
    end_acts = (acts.total - acts.layers - acts.autocast - acts.embedding - acts.head - acts.rope
                + acts.first.saved)
    layer_moments = (_fsdp_layer_moments if buf.fsdp_units else partial(_layer_moments, model))(
        train, st, acts, buf, sums, end_acts, grads_before_first_layer)
    layer = layer_moments.moments
    if buf.fp8_work:  # a Float8 projection's backward, in the middle of a layer's backward
        layer += [m._replace(work=0, fp8=buf.fp8_work) for m in layer_moments.mid_layer]
    after_first_backward = acts.total - (acts.total - acts.head) // max(round(acts.layer_factor), 1)
    if buf.unsharded_grads and not buf.unsharded_before_backward:
        # GPipe: after the first micro-batch's backward every unit's unsharded gradients exist,
        # beside the other micro-batches' activations
        layer.append(_Moment(after_first_backward, st.grads_in_forward, buf.gathered.forward, buf.workspace, 0,
                             acts.last.recomputed))
    for m in layer:
        parts = (("gathered_params", m.gathered + buf.tied_gathered),
                 ("unsharded_gradients", buf.unsharded_grads if (
                     buf.unsharded_before_backward or m.activations <= after_first_backward) else 0),
                 ("activation_gradients", m.work),
                 ("float8_projection_backward", m.fp8),
                 ("gradient_reduction", m.reduce),
                 ("pipeline_recv_buffers", buf.recv_buffers),
                 ("dequantised_weight", st.dequantised),
                 ("gradient_in_flight", st.in_flight))
        moments.append((_Mem(st.params, m.grads, st.optimizer, max(int(m.activations), 0) + m.recompute,
                             _sum(parts)), parts))
    return _largest(moments)


def _optimizer_peak(train: TrainConfig, st: _States, buf: _Buffers) -> tuple[_Mem, dict[str, int]]:
    """The optimizer step: its scratch per implementation; with PyTorch optimizer offload the
    GPU gradients live until zero_grad, through the CPU step."""
    engine, trecipe = ENGINES[train.engine], st.trecipe
    parts: list[tuple[str, int]] = [("pipeline_recv_buffers", buf.recv_buffers)]
    if train.offload == "none":
        if train.optimizer == "adamw8bit":
            # its own loop dequantises m and v a chunk at a time (strategies/kernels/adam8bit.py)
            parts.append(("adam8bit_chunk_scratch",
                          ADAM8BIT_SCRATCH_PER_ELEMENT * min(st.largest_tensor, ADAM8BIT_CHUNK) + ADAM8BIT_SCRATCH_FIXED))
        elif train.optimizer_impl == "foreach":
            parts.append(("optimizer_foreach_scratch", st.n_state * trecipe.state_bytes))
        elif train.optimizer_impl == "for-loop":
            parts.append(("optimizer_tensor_scratch", 2 * st.largest_tensor * trecipe.state_bytes))
        if trecipe.has_master and trecipe.grad_bytes < 4 and not engine.fp32_main_grads_in_optimizer:
            parts.append(("fp32_grad_copy", st.n_state * 4))
    return _largest([(_Mem(st.params, st.grads_at_end, st.optimizer, 0, _sum(tuple(parts))), tuple(parts))])


def _allocator_cache(model: ModelSpec, train: TrainConfig, overheads: Overheads, st: _States, acts: _Activations,
                     sums: _ActSums, peak: _Mem) -> tuple[CacheInputs, int, int]:
    """(what the caching allocator's cache depends on, its bytes, the fixed overhead: the CUDA
    context and NCCL's communicators) -- what the device holds beyond the allocated bytes
    (planner/allocator.py). The allocator never gives memory back, so its cache at the step's
    peak stays through every phase."""
    sp, g = st.sp, st.gathered_units
    fsdp = _fsdp2(train)
    side_pools = 0
    if fsdp:  # FSDP2's all-gather and reduce-scatter streams keep pools of their own
        all_gather_pool = _unit_extremes(g).largest_three
        reduce_scatter_pool = 0 if train.offload == "params" else (
            st.grads_full + sp.largest_unit * st.trecipe.grad_bytes // max(train.shard_world, 1))
        side_pools = all_gather_pool + max(0, reduce_scatter_pool - peak.grads)
    cache_inputs = CacheInputs(
        checkpointed=acts.policy in ("full", "op", "layer"),
        layer_saved=acts.largest_saved,
        logits=sums.loss_forward,
        fsdp_unit=_unit_extremes(g).largest if fsdp else 0,
        # trainplan's vocabulary-parallel embedding (DTensor) computes a replicated, full-vocabulary
        # gradient before keeping its shard (strategies/tensor_parallel.py)
        tp_embedding_gradient=(model.vocab_size * model.hidden_size * st.trecipe.grad_bytes
                               if train.tp > 1 and not fsdp and sp.has_embedding else 0),
        side_pools=side_pools)
    fixed_overhead = overheads.cuda_context_bytes + communicator_count(train) * overheads.communicator_bytes
    if overheads.fragmentation is not None:  # a flat fraction (a calibration file's, or --fragmentation)
        cache = int(overheads.fragmentation * peak.total)
    else:
        rule = overheads.cache_expandable if train.alloc_conf == "expandable_segments" else overheads.cache
        cache = rule.cache_bytes(cache_inputs)
    return cache_inputs, cache, fixed_overhead


def _stage_core(model: ModelSpec, train: TrainConfig, overheads: Overheads, stage_index: int,
                sums: _ActSums | None = None) -> _StageResult:
    """The memory of pipeline stage ``stage_index``'s most loaded rank in each phase of a step
    (``sums``: the layout's ``_act_sums``, where the caller has them)."""
    sp = stage_params(model, train, stage_index)
    sums = sums or _act_sums(model, act.ActivationInputs.of(train))
    st = _model_states(model, train, sp)
    acts = _stage_activations(model, train, stage_index, st.sp, sums, st.teacher)
    buf = _buffers(model, train, stage_index, st, acts, sums)
    (forward, forward_tmp), (backward, backward_tmp) = (_forward_peak(train, st, acts, buf, sums),
                                                        _backward_peak(model, train, st, acts, buf, sums))
    step, optimizer_tmp = _optimizer_peak(train, st, buf)
    phases = {"forward": forward, "backward": backward, "optimizer": step}
    peak_phase = max(PHASES, key=lambda name: phases[name].total)
    cache_inputs, cache, fixed_overhead = _allocator_cache(model, train, overheads, st, acts, sums, phases[peak_phase])
    for mem in phases.values():
        mem.overhead = fixed_overhead + cache
    host = _host_bytes(train, st.trecipe, st.n_param, st.n_grad, st.n_state)
    saved = acts.total + acts.outputs - (acts.head_count * sums.loss_outside_forward if st.sp.has_head else 0)
    return _StageResult(phases, {"forward": forward_tmp, "backward": backward_tmp, "optimizer": optimizer_tmp},
                        peak_phase, st.sp, acts.layer_factor, (host[0], host[1], host[2] + st.paged), saved,
                        cache_inputs, cache)


def communicator_count(train: TrainConfig) -> int:
    """NCCL communicators a rank holds: one per process group of more than one rank it
    collectives over (dp x cp shards and averages gradients, tp, pp, the cp ring), plus the
    default (world) group, which torchrun-launched training initialises eagerly
    (``init_process_group(device_id=...)``), also on one GPU, unless it is one of those groups.
    A plain single-process script holds none."""
    sizes = [size for size in (train.shard_world, train.tp, train.pp, train.cp) if size > 1]
    return len(sizes) + (train.gpus not in sizes)


def allocator_inputs(model: ModelSpec, train: TrainConfig, stage_index: int = 0) -> tuple[int, CacheInputs]:
    """(the stage's allocated peak, what its allocator cache depends on): the fast rule's inputs,
    which validation/allocator.py fits the rule's constants to."""
    core = _stage_core(model, train, Overheads.none(), stage_index)
    return core.peak, core.cache_inputs


def _host_bytes(train: TrainConfig, recipe: Recipe, n_param: int, n_grad: int, n_state: int) -> tuple[int, int, int]:
    """(params, grads, optimizer) held in host memory per rank.

    Optimizer offload (ZeRO-Offload): an fp32 copy of the rank's parameters (the master, even
    for fp32 training: the GPU keeps its own copy) plus the optimizer state on the host, and
    the gradients brought over in fp32 for the CPU step. Parameter offload (ZeRO-3 with
    FSDP2's CPUOffloadPolicy): parameter and gradient shards live on the host in their own
    dtype and the optimizer steps them there (with fp32 masters for mixed-precision recipes);
    DeepSpeed keeps fp32 gradients."""
    if train.offload == "none":
        return 0, 0, 0
    states = OPTIMIZER_STATES[train.optimizer] * recipe.state_bytes
    if train.offload == "optimizer":
        return 0, n_state * 4, n_state * (4 + states)
    grad_bytes = recipe.grad_bytes if train.engine == "pytorch" else 4
    return n_param * recipe.param_bytes, n_grad * grad_bytes, n_state * (recipe.master_bytes + states)


def _breakdown(mem: _Mem) -> MemoryBreakdown:
    return MemoryBreakdown(params=mem.params, grads=mem.grads, optimizer=mem.optimizer, activations=mem.activations,
                           temporaries=mem.temporaries, overhead=mem.overhead)


def _stage_memory(model: ModelSpec, train: TrainConfig, overheads: Overheads, stage_index: int) -> StageMemory:
    core = _stage_core(model, train, overheads, stage_index)
    peak = core.phases[core.peak_phase]
    host_params, host_grads, host_optimizer = core.host
    return StageMemory(
        stage=stage_index,
        first_layer=core.params.first_layer,
        last_layer=core.params.last_layer,
        num_params=core.params.local,
        inflight_microbatches=core.layer_factor,
        saved_activations=core.saved_activations,
        params=peak.params,
        grads=peak.grads,
        optimizer=peak.optimizer,
        activations=peak.activations,
        temporaries=peak.temporaries,
        overhead=peak.overhead,
        peak=peak.total,
        peak_phase=core.peak_phase,
        phases={name: _breakdown(mem) for name, mem in core.phases.items()},
        temporaries_detail=core.details[core.peak_phase],
        host=HostMemory(params=host_params, grads=host_grads, optimizer=host_optimizer,
                        per_rank=host_params + host_grads + host_optimizer),
        allocator_cache=core.cache,
        communicators=communicator_count(train),
    )


def estimate_memory(model: ModelSpec, gpu: GPUSpec, train: TrainConfig,
                    overheads: Overheads | None = None, search_micro_batch: bool = True,
                    gpus_per_node: int | None = None) -> MemoryEstimate:
    """Per-rank memory of ``train`` for ``model`` on ``gpu``: every pipeline stage, the worst
    one as ``memory``, host memory for offload, the fit verdict and the largest micro-batch
    that fits."""
    check_layout(model, train)
    overheads = default_overheads() if overheads is None else overheads
    stages = [_stage_memory(model, train, overheads, i) for i in range(train.pp)]
    worst = max(stages, key=lambda s: s.peak)
    gpus_per_node = min(gpus_per_node or gpu.gpus_per_node, train.gpus)
    host_rank = max(stages, key=lambda s: s.host.per_rank).host
    host = host_rank.model_copy(update={"per_node": host_rank.per_rank * gpus_per_node})
    limits = memory_limits(gpu, worst.peak, host.per_node)
    max_mb = largest_micro_batch(model, gpu, train, overheads, gpus_per_node) if search_micro_batch else 0
    return MemoryEstimate(
        model=ModelSummary(name=model.name, num_params=total_params(model), active_params=active_params(model)),
        gpu=gpu.name,
        gpu_memory_bytes=gpu.memory_bytes,
        train=train,
        memory=RankMemory(**{k: getattr(worst, k) for k in RankMemory.model_fields}),
        stages=stages,
        host=host,
        limits=limits,
        fits=all(limit.fits for limit in limits),
        does_not_fit=[limit.name for limit in limits if not limit.fits],
        headroom_bytes=gpu.memory_bytes - worst.peak,
        max_micro_batch=max_mb,
        overheads=overheads,
        notes=_notes(model, train),
    )


def peak_bytes(model: ModelSpec, train: TrainConfig, overheads: Overheads) -> int:
    """The worst stage's peak, without building the full result (the search's inner loop)."""
    return screen_memory(model, train, overheads)[0]


def screen_memory(model: ModelSpec, train: TrainConfig, overheads: Overheads) -> tuple[int, int]:
    """(worst stage's GPU peak, largest host bytes per rank) from the representative stages."""
    sums = _act_sums(model, act.ActivationInputs.of(train))
    cores = [_stage_core(model, train, overheads, i, sums) for i in representative_stages(model, train.pp, train.chunks)]
    return max(c.peak for c in cores), max(sum(c.host) for c in cores)


def largest_micro_batch(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, overheads: Overheads,
                        gpus_per_node: int | None = None, limit: int = 4096) -> int:
    """Largest micro-batch that fits every limit (0 if not even 1 fits), at the same accumulation.

    Offloaded state in host memory does not grow with the micro-batch: if it does not fit the
    node, no micro-batch does. Every phase total on the GPU is linear in the micro-batch and
    the peak is their maximum, a convex function: extrapolating from micro-batches 1 and 2
    bounds the answer from above, and a bisection below that bound finds it with a few
    evaluations."""

    def peak(mb: int) -> int:
        trial = train.model_copy(update={"micro_batch": mb, "global_batch": mb * train.dp * train.grad_accum})
        return peak_bytes(model, trial, overheads)

    budget = gpu.memory_bytes
    p1, host_per_rank = screen_memory(model, train.model_copy(update={
        "micro_batch": 1, "global_batch": train.dp * train.grad_accum}), overheads)
    per_node = min(gpus_per_node or gpu.gpus_per_node, train.gpus)
    if not all(lim.fits for lim in memory_limits(gpu, p1, host_per_rank * per_node)):
        return 0
    slope = peak(2) - p1
    hi = limit if slope <= 0 else min(limit, 1 + (budget - p1) // slope)
    if peak(hi) <= budget:
        return hi
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


def _notes(model: ModelSpec, train: TrainConfig) -> list[str]:
    notes = list(model.unmodelled)
    if model.is_moe and train.finetune != "full":
        notes.append("LoRA on a mixture of experts: the MoE blocks (router, routed and shared experts) are frozen "
                     "without adapters and stay in the parameters' dtype, quantised base or not (as bitsandbytes "
                     "quantises nn.Linear modules only)")
    if train.ep > 1:
        notes.append(f"expert parallelism: dropless routing, the busiest rank receiving {train.expert_load:g}x the "
                     f"balanced share of routed rows (--expert-load); a rank whose experts are chosen more often "
                     f"holds more")
    if train.activation_checkpointing == "selective" and train.attention == "flash":
        notes.append("selective recompute saves almost nothing with flash attention: flash already "
                     "recomputes the attention scores instead of saving them")
    if model.tied_embeddings and train.pp > 1:
        notes.append("tied embeddings across pipeline stages: the last stage holds a copy of the embedding")
    if train.engine == "pytorch" and train.zero_stage == 2:
        notes.append("ZeRO-2 as FSDP2 (reshard_after_forward=False): a parameter shard between steps, "
                     "the full parameters gathered from the first forward to each layer's backward")
    return notes
