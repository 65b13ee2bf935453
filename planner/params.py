"""Parameter inventory: every weight tensor of the reference model, with its shape and how
tensor parallelism splits it.

The planner needs more than a parameter *count*: FSDP2 pads each tensor's first dimension
to a multiple of the shard group, ZeroRedundancyOptimizer assigns whole tensors to ranks, and
Megatron splits column-parallel layers on dim 0 and row-parallel layers on dim 1. Per-rank
bytes are exact only if we reason tensor by tensor. The names and shapes here are those of
``strategies/model.py`` (checked by a test), so a prediction and a measurement refer to the
same tensors.

A model is a sequence of *units* -- the granularity at which pipelines split and FSDP wraps:
``embed``, one unit per layer, ``head``. All layers of one kind have identical tensors, so
everything is computed per unit kind and multiplied.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from collections import Counter
from functools import cached_property, lru_cache
from math import ceil, prod

from planner.configs import ModelSpec

# Megatron-LM pads the vocabulary so that each tensor-parallel shard is a multiple of 128
# (--make-vocab-size-divisible-by 128); PyTorch's DTensor sharding does not pad.
MEGATRON_VOCAB_MULTIPLE = 128


# What a tensor is for, read by every module that treats tensors differently (FLOPs, Float8,
# LoRA, quantised inference, tensor parallelism, the strategy layer's initialisation) instead of
# its name: names are parsed here only.
ROLES = ("embedding", "positions", "norm", "projection", "relative_bias", "head", "lora_a", "lora_b", "sinks",
         "router", "expert", "shared_expert")
SUBLAYERS = ("attn", "cross", "mlp")  # self-attention, cross-attention (encoder-decoder), the MLP
# q_a, q_b, kv_a, kv_b: multi-head latent attention's down- and up-projections (DeepSeek-V2/V3)
PROJECTION_NAMES = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2", "q_a", "q_b", "kv_a", "kv_b")
EXPERT_GROUPS = ("experts", "shared")  # an MoE layer's routed experts (role ``expert``) and shared ones
NORM_PREFIXES = ("attn_norm", "cross_norm", "mlp_norm", "embed_norm", "final_norm", "encoder_final_norm")


@dataclass(frozen=True)
class ParamTensor:
    """One weight tensor of the reference model: its name (relative to its unit, as
    ``strategies/model.py`` names it), shape, how tensor parallelism splits it, and -- derived
    from the name, here and nowhere else -- its role."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None = None
    """Dimension split by tensor parallelism (0: column-parallel / vocab-parallel,
    1: row-parallel), or None when replicated on every tensor-parallel rank."""
    group: str = "dense"
    """Which parameters it is sharded and reduced with: ``dense`` (every data-parallel rank
    holds a share of it) or ``expert`` (a routed expert's: sharded over an expert-parallel axis)."""
    role: str = field(init=False, compare=False)
    sublayer: str | None = field(init=False, compare=False)
    projection: str | None = field(init=False, compare=False)
    bias: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        role, sublayer, projection, bias = describe(self.name)
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "sublayer", sublayer)
        object.__setattr__(self, "projection", projection)
        object.__setattr__(self, "bias", bias)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def block_projection(self) -> str | None:
        """``q`` for ``attn.q.weight``: a block's linear weight (None for biases and the rest)."""
        return self.projection if self.role == "projection" and not self.bias else None

    @property
    def is_matmul_weight(self) -> bool:
        """A weight every token multiplies with: the blocks' projections and the head (not
        embeddings, which are looked up, nor the relative-position table)."""
        return len(self.shape) == 2 and self.role in ("projection", "head")

    @property
    def vocab_parallel(self) -> bool:
        """The embedding and the head: split over the vocabulary (Megatron pads it)."""
        return self.role in ("embedding", "head")

    @property
    def shard_dims(self) -> dict[str, int]:
        """Which mesh axis splits which dimension: ``tp`` its ``tp_dim``; the data-parallel
        shard group (FSDP2, ZeRO-3) always dimension 0 (``Shard(0)``)."""
        return {"dp_shard": 0} | ({"tp": self.tp_dim} if self.tp_dim is not None else {})

    def local_shape(self, tp: int, vocab_multiple: int = 1) -> tuple[int, ...]:
        """Shape on the most loaded tensor-parallel rank (rank 0)."""
        if self.tp_dim is None or tp == 1:
            return self.shape
        dim = self.shape[self.tp_dim]
        if vocab_multiple > 1:
            dim = ceil(dim / (vocab_multiple * tp)) * vocab_multiple * tp
        shape = list(self.shape)
        shape[self.tp_dim] = ceil(dim / tp)
        return tuple(shape)


def expert_local_shape(tensor: ParamTensor, experts: int, tp: int, ep: int, efsdp: int) -> tuple[int, ...]:
    """What one rank stores of a routed expert tensor (the largest shard) under torchtitan 0.3.0:
    with expert parallelism (ep > 1) Shard(0) over ``ep`` and no tensor parallelism; without it
    tensor parallelism on each expert's f (``tp_dim``); then FSDP2 over ``efsdp`` ranks
    (dp_shard x cp x tp / ep; the dense FSDP group when ep = 1) on dim 1 when efsdp x ep exceeds
    the experts, else on dim 0 (torchtitan/distributed/fsdp.py:224-233). Checked against
    torchtitan's own sharding in validation/torchtitan_shards.json (tests/test_moe.py)."""
    shape = list(tensor.local_shape(tp) if ep == 1 else tensor.shape)
    shape[0] = ceil(shape[0] / ep)
    dim = 1 if efsdp * ep > experts else 0
    shape[dim] = ceil(shape[dim] / efsdp)
    return tuple(shape)


@lru_cache(maxsize=512)
def describe(name: str) -> tuple[str, str | None, str | None, bool]:
    """(role, sub-layer, projection, is a bias) of a parameter named as ``strategies/model.py``
    names it, relative to its unit (``attn.q.weight``, ``embed.weight``) or fully qualified
    (``layers.3.mlp.down.weight``, wrapper prefixes removed); LoRA's ``attn.q.lora_a.weight``
    is LoRA's A of ``q`` (role ``lora_a``)."""
    parts = name.split(".")
    while parts and (parts[0] in ("layers", "encoder_layers") or parts[0].isdigit()):
        parts = parts[1:]
    leaf = parts[-1] if parts else ""
    if len(parts) == 2 and parts[0] in NORM_PREFIXES:
        return "norm", None, None, leaf == "bias"
    if parts == ["embed", "weight"]:
        return "embedding", None, None, False
    if parts == ["pos_embed", "weight"]:
        return "positions", None, None, False
    if parts == ["head", "weight"]:
        return "head", None, None, False
    if parts[:1] == ["attn"] and parts[1:] == ["sinks"]:
        return "sinks", "attn", None, False
    if len(parts) == 3 and parts[0] == "mlp" and parts[1] in ("router", "shared_gate") and leaf in ("weight", "bias"):
        return "router", "mlp", None, leaf == "bias"
    if (len(parts) == 4 and parts[0] == "mlp" and parts[1] in EXPERT_GROUPS and parts[2] in PROJECTION_NAMES
            and leaf in ("weight", "bias")):
        return ("expert" if parts[1] == "experts" else "shared_expert"), "mlp", parts[2], leaf == "bias"
    if len(parts) >= 3 and parts[0] in SUBLAYERS:
        sublayer, inner = parts[0], parts[1]
        if inner in ("q_norm", "k_norm", "q_a_norm", "kv_a_norm"):
            return "norm", sublayer, None, False
        if inner == "rel_bias":
            return "relative_bias", sublayer, None, False
        if inner in PROJECTION_NAMES and len(parts) == 4 and parts[2] in ("lora_a", "lora_b"):
            return parts[2], sublayer, inner, False
        if inner in PROJECTION_NAMES and len(parts) == 3 and leaf in ("weight", "bias"):
            return "projection", sublayer, inner, leaf == "bias"
    raise ValueError(f"{name!r} is not a parameter of the reference model (planner/params.py)")


def adapter_tensors(tensor: ParamTensor, rank: int) -> tuple[ParamTensor, ParamTensor]:
    """LoRA's A (rank x in) and B (out x rank) beside a projection weight, named as
    ``strategies/lora.py`` names them (Hu et al. 2021)."""
    out, inp = tensor.shape
    prefix = tensor.name.rsplit(".", 1)[0]
    return ParamTensor(f"{prefix}.lora_a.weight", (rank, inp)), ParamTensor(f"{prefix}.lora_b.weight", (out, rank))


def _norm(spec: ModelSpec, prefix: str) -> list[ParamTensor]:
    h = spec.hidden_size
    tensors = [ParamTensor(f"{prefix}.weight", (h,))]
    if spec.norm == "layernorm":
        tensors.append(ParamTensor(f"{prefix}.bias", (h,)))
    return tensors


def _linear(name: str, out_features: int, in_features: int, tp_dim: int | None, bias: bool) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", (out_features, in_features), tp_dim)]
    if bias:
        # A column-parallel layer splits its bias with its output; a row-parallel layer adds
        # its bias after the all-reduce, so the bias is replicated.
        tensors.append(ParamTensor(f"{name}.bias", (out_features,), 0 if tp_dim == 0 else None))
    return tensors


def _latent_attention(spec: ModelSpec, prefix: str) -> list[ParamTensor]:
    """Multi-head latent attention (DeepSeek-V2 arXiv 2405.04434, Sec. 2.1; transformers'
    DeepseekV3Attention): queries through a q_lora_rank bottleneck (or one projection, V2-Lite),
    one down-projection to the kv_lora_rank latent plus the shared rotary key, an up-projection of
    the latent to every head's key (no-rope part) and value."""
    h, heads, qk, rope = spec.hidden_size, spec.num_heads, spec.head_dim, spec.qk_rope_head_dim
    tensors = []
    if spec.q_lora_rank:
        tensors += (_linear(f"{prefix}.q_a", spec.q_lora_rank, h, None, False)
                    + [ParamTensor(f"{prefix}.q_a_norm.weight", (spec.q_lora_rank,))]
                    + _linear(f"{prefix}.q_b", heads * qk, spec.q_lora_rank, 0, False))
    else:
        tensors += _linear(f"{prefix}.q", heads * qk, h, 0, False)
    tensors += (_linear(f"{prefix}.kv_a", spec.kv_lora_rank + rope, h, None, False)
                + [ParamTensor(f"{prefix}.kv_a_norm.weight", (spec.kv_lora_rank,))]
                + _linear(f"{prefix}.kv_b", heads * (qk - rope + spec.v_head_dim), spec.kv_lora_rank, 0, False)
                + _linear(f"{prefix}.o", h, heads * spec.v_head_dim, 1, spec.linear_bias))
    return tensors


def _attention(spec: ModelSpec, prefix: str, relative_bias: bool) -> list[ParamTensor]:
    h, d = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    qkv_bias = spec.linear_bias or spec.qkv_bias
    if spec.mla:
        return _latent_attention(spec, prefix)
    tensors = (
        _linear(f"{prefix}.q", q_out, h, 0, qkv_bias)
        + _linear(f"{prefix}.k", kv_out, h, 0, qkv_bias)
        + _linear(f"{prefix}.v", kv_out, h, 0, qkv_bias)
        + _linear(f"{prefix}.o", h, q_out, 1, spec.linear_bias)
    )
    if spec.attention_sinks:  # one learned logit per head, in every head's softmax (gpt-oss)
        tensors.append(ParamTensor(f"{prefix}.sinks", (spec.num_heads,)))
    if relative_bias:
        tensors.append(ParamTensor(f"{prefix}.rel_bias.weight", (spec.relative_attention_buckets, spec.num_heads), 1))
    if spec.qk_norm:  # one weight of head_dim each, shared by the heads (Qwen3's q_norm, k_norm)
        tensors += [ParamTensor(f"{prefix}.q_norm.weight", (d,)), ParamTensor(f"{prefix}.k_norm.weight", (d,))]
    return tensors


def _mlp(spec: ModelSpec, prefix: str, ffn: int = 0) -> list[ParamTensor]:
    h, f, bias = spec.hidden_size, ffn or spec.ffn_hidden_size, spec.linear_bias
    if spec.mlp == "gelu":
        return _linear(f"{prefix}.fc1", f, h, 0, bias) + _linear(f"{prefix}.fc2", h, f, 1, bias)
    return (
        _linear(f"{prefix}.gate", f, h, 0, bias)
        + _linear(f"{prefix}.up", f, h, 0, bias)
        + _linear(f"{prefix}.down", h, f, 1, bias)
    )


def _moe(spec: ModelSpec, prefix: str) -> list[ParamTensor]:
    """An MoE layer's MLP: the router (hidden -> experts), the routed experts stacked on a
    leading experts dimension (as torchtitan's GroupedExperts and transformers' fused experts
    hold them: gate and up (E, f, h), down (E, h, f); gpt-oss's biases (E, f) and (E, h)), then
    the shared experts as one gated MLP and Qwen2-MoE's shared-expert gate. Routed experts are
    their own sharding group (``expert``)."""
    h, e, f, bias = spec.hidden_size, spec.num_experts, spec.moe_ffn_hidden_size, spec.linear_bias
    tensors = _linear(f"{prefix}.router", e, h, None, spec.router_bias)
    # without expert parallelism tensor parallelism splits each expert's f (torchtitan
    # models/common/moe_sharding.py: w1, w3 Shard(1), w2 Shard(2)); ``expert_local_shape`` with it
    for name, shape, tp_dim in (("gate", (e, f, h), 1), ("up", (e, f, h), 1), ("down", (e, h, f), 2)):
        tensors.append(ParamTensor(f"{prefix}.experts.{name}.weight", shape, tp_dim, "expert"))
        if bias:
            tensors.append(ParamTensor(f"{prefix}.experts.{name}.bias", shape[:2], 1 if tp_dim == 1 else None,
                                       "expert"))
    if spec.shared_expert_ffn_hidden_size:  # split by tensor parallelism as a dense MLP
        tensors += _mlp(spec, f"{prefix}.shared", spec.shared_expert_ffn_hidden_size)
        if spec.shared_expert_gate:
            tensors += _linear(f"{prefix}.shared_gate", 1, h, None, False)
    return tensors


# ---------------------------------------------------------------- layer kinds


@dataclass(frozen=True)
class LayerKind:
    """A kind of transformer block, as data: a model is a sequence of layer kinds
    (``layer_stack``), and every module that treats blocks differently reads these properties
    instead of branching on an encoder-decoder flag. Today: ``decoder`` (a decoder-only model's
    block, or T5's decoder block with cross-attention) and ``encoder`` (T5's encoder block)."""

    name: str
    attentions: tuple[str, ...]
    """Its attention sub-layers in forward order: self-attention ``attn``, then ``cross``
    (attending to the encoder's output: Vaswani et al. 2017, T5's decoder)."""
    causal: bool
    """Its self-attention is masked (a decoder's); cross-attention and encoders never are."""
    generates: bool
    """Runs once per generated token over a KV cache when serving (an encoder runs once per prompt)."""
    experts: bool = False
    """Its MLP is a mixture of experts (``_moe``): a router, routed and shared experts."""

    @property
    def unmasked_attention(self) -> float:
        """The share of its attention square a causal kernel computes: half of the
        self-attention's (FlashAttention skips the masked blocks), all of cross-attention's."""
        n = len(self.attentions)
        return (2 * n - 1) / (2 * n) if self.causal else 1.0


_ENCODER = LayerKind("encoder", ("attn",), causal=False, generates=False)
_DECODER = LayerKind("decoder", ("attn",), causal=True, generates=True)
_CROSS_DECODER = LayerKind("decoder", ("attn", "cross"), causal=True, generates=True)
_MOE = LayerKind("moe", ("attn",), causal=True, generates=True, experts=True)


def layer_kind(spec: ModelSpec, name: str) -> LayerKind:
    """The kind ``name`` of ``spec``'s blocks (constants: the search asks this per layer and
    candidate, where hashing a ModelSpec would cost more than the answer). An MoE model's
    decoder layers are ``moe`` and, where the config keeps them dense, ``decoder``."""
    if name == "decoder":
        return _CROSS_DECODER if spec.encoder_layers else _DECODER
    if name == "encoder":
        return _ENCODER
    if name == "moe":
        return _MOE
    raise ValueError(f"no layer kind {name!r}")


def layer_stack(spec: ModelSpec) -> tuple[tuple[str, int], ...]:
    """The model's blocks as (kind, count) runs in forward (and pipeline) order; an MoE model's
    dense and MoE layers interleave as its config says (a kind may have several runs)."""
    if spec.num_experts:
        return _moe_stack(spec.num_layers, spec.dense_layers)
    return tuple((kind, n) for kind, n in (("encoder", spec.encoder_layers), ("decoder", spec.num_layers)) if n)


@lru_cache(maxsize=256)
def _moe_stack(num_layers: int, dense_layers: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    dense = set(dense_layers)
    runs: list[list] = []
    for i in range(num_layers):
        kind = "decoder" if i in dense else "moe"
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return tuple((kind, n) for kind, n in runs)


def layer_kind_at(spec: ModelSpec, index: int) -> str:
    """The kind of the model's ``index``-th block (over all stacks, in pipeline order)."""
    for kind, n in layer_stack(spec):
        if index < n:
            return kind
        index -= n
    raise IndexError(index)


def layer_tensors(spec: ModelSpec, kind: str, first: bool = False) -> tuple[ParamTensor, ...]:
    """Tensors of one layer of ``kind`` (``layer_kind``): a norm and an attention per attention
    sub-layer, then the MLP. ``first``: the first layer of its stack, which holds the T5
    relative position bias."""
    relative = spec.position_embedding == "relative" and first
    tensors = []
    for sublayer in layer_kind(spec, kind).attentions:
        tensors += _norm(spec, f"{sublayer}_norm") + _attention(spec, sublayer, relative and sublayer == "attn")
    tensors += _norm(spec, "mlp_norm") + (_moe(spec, "mlp") if layer_kind(spec, kind).experts else _mlp(spec, "mlp"))
    return tuple(tensors)


def embed_tensors(spec: ModelSpec) -> tuple[ParamTensor, ...]:
    h = spec.hidden_size
    tensors = [ParamTensor("embed.weight", (spec.vocab_size, h), 0)]
    if spec.position_embedding == "learned":
        tensors.append(ParamTensor("pos_embed.weight", (spec.max_position_embeddings, h)))
    if spec.embedding_norm:
        tensors += _norm(spec, "embed_norm")
    return tuple(tensors)


def head_tensors(spec: ModelSpec, tied_copy: bool = False) -> tuple[ParamTensor, ...]:
    """Final norm(s) and the output projection. ``tied_copy``: the head's weight is the tied
    embedding, held again because the head lives on another pipeline stage (Megatron keeps such
    a copy and all-reduces its gradient with the first stage)."""
    tensors = list(_norm(spec, "final_norm"))
    if spec.encoder_layers:
        tensors += _norm(spec, "encoder_final_norm")
    if not spec.tied_embeddings or tied_copy:
        tensors.append(ParamTensor("head.weight", (spec.vocab_size, spec.hidden_size), 0))
    return tuple(tensors)


@dataclass(frozen=True)
class Unit:
    """A pipeline / FSDP unit: the embedding, one layer, or the head."""

    kind: str  # "embed" | a layer kind (``layer_kind``: "encoder", "decoder") | "head"
    tensors: tuple[ParamTensor, ...]

    @property
    def is_layer(self) -> bool:
        return self.kind not in ("embed", "head")

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


def model_units(spec: ModelSpec) -> list[Unit]:
    """All units in forward order (unique tensors: a tied head does not repeat the embedding)."""
    return list(_model_units(spec))


@lru_cache(maxsize=256)
def _model_units(spec: ModelSpec) -> tuple[Unit, ...]:
    units = [Unit("embed", embed_tensors(spec))]
    made: dict[str, tuple[Unit, Unit]] = {}
    for kind, count in layer_stack(spec):
        # layers after the first of a stack are alike: one Unit object stands for each of them
        if kind in made:
            units += [made[kind][1]] * count
            continue
        first, rest = Unit(kind, layer_tensors(spec, kind, first=True)), Unit(kind, layer_tensors(spec, kind))
        made[kind] = first, rest
        units += [first] + [rest] * (count - 1)
    units.append(Unit("head", head_tensors(spec)))
    return tuple(units)


def total_params(spec: ModelSpec) -> int:
    return sum(unit.numel for unit in model_units(spec))


def active_params(spec: ModelSpec) -> int:
    """Parameters one token's forward uses: every tensor but the routed experts, of which
    ``experts_per_token`` of ``num_experts`` (equal in size) -- the embedding table counted
    whole, as Mistral and Qwen count their "activated" parameters (DeepSeek's and OpenAI's
    figures leave the embedding out: presets' ``published_active_params.embedding``). A dense
    model's are all its parameters."""
    return sum(numel_per_token(t, spec) for unit in model_units(spec) for t in unit.tensors)


def numel_per_token(tensor: ParamTensor, spec: ModelSpec) -> int:
    """Elements of ``tensor`` one token uses: of a routed expert tensor (the experts are equal in
    size) ``experts_per_token`` of ``num_experts``, of any other tensor all."""
    if tensor.role == "expert":
        return tensor.numel // spec.num_experts * spec.experts_per_token
    return tensor.numel


def named_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Fully qualified parameter names and shapes, as ``strategies/model.py`` names them."""
    shapes: dict[str, tuple[int, ...]] = {}
    layer_index = {"encoder_layers": 0, "layers": 0}
    for unit in model_units(spec):
        if unit.is_layer:
            stack = "encoder_layers" if unit.kind == "encoder" else "layers"
            prefix = f"{stack}.{layer_index[stack]}."
            layer_index[stack] += 1
        else:
            prefix = ""
        for tensor in unit.tensors:
            shapes[prefix + tensor.name] = tensor.shape
    return shapes


# ---------------------------------------------------------------- pipeline stages


@dataclass(frozen=True)
class StageUnits:
    """What one pipeline stage (one rank of the pp group) holds."""

    index: int
    layers: tuple[int, int]  # [first, last) over encoder+decoder layers
    units: tuple[Unit, ...]
    layer_ids: tuple[int, ...] = ()  # the global index of each layer held, in order

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def has_embedding(self) -> bool:
        return any(u.kind == "embed" for u in self.units)

    @property
    def has_head(self) -> bool:
        return any(u.kind == "head" for u in self.units)

    @cached_property
    def layer_kinds(self) -> tuple[str, ...]:
        """The kind of each layer held, in order."""
        return tuple(u.kind for u in self.units if u.is_layer)

    @cached_property
    def unit_counts(self) -> dict[str, int]:
        """Units held per kind (embed, each layer kind, head)."""
        return dict(Counter(u.kind for u in self.units))


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, as even as possible, earlier parts one layer larger (torchtitan / Megatron
    with uneven layers both give the remainder to the first stages)."""
    base, extra = divmod(num_layers, parts)
    bounds, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


@lru_cache(maxsize=1024)
def pipeline_stages(spec: ModelSpec, pp: int, chunks: int = 1) -> tuple[StageUnits, ...]:
    """Units held by each of the ``pp`` ranks. With ``chunks`` > 1 (interleaved schedule) rank r
    holds model chunks r, r + pp, r + 2 pp, ... of ``pp * chunks`` equal chunks."""
    units = model_units(spec)
    embed, layers, head = units[0], units[1:-1], units[-1]
    chunk_bounds = split_layers(len(layers), pp * chunks)
    stages = []
    for rank in range(pp):
        held: list[Unit] = []
        ids: list[int] = []
        first_layer, last_layer = None, None
        for c in range(chunks):
            lo, hi = chunk_bounds[rank + c * pp]
            held.extend(layers[lo:hi])
            ids.extend(range(lo, hi))
            first_layer = lo if first_layer is None else first_layer
            last_layer = hi
        if rank == 0:
            held.insert(0, embed)
        if rank == pp - 1:
            tied_copy = spec.tied_embeddings and pp > 1
            held.append(Unit("head", head_tensors(spec, tied_copy=tied_copy)) if tied_copy else head)
        stages.append(StageUnits(rank, (first_layer or 0, last_layer or 0), tuple(held), tuple(ids)))
    return tuple(stages)


# ---------------------------------------------------------------- per-rank shards


def local_tensor_shapes(units: tuple[Unit, ...], tp: int, vocab_multiple: int = 1) -> list[tuple[int, ...]]:
    shapes = []
    for unit in units:
        for tensor in unit.tensors:
            multiple = vocab_multiple if tensor.vocab_parallel else 1
            shapes.append(tensor.local_shape(tp, multiple))
    return shapes


def fsdp_shard_numel(shapes: list[tuple[int, ...]], world: int) -> int:
    """Elements FSDP2 allocates per rank: each tensor's dim 0 padded to a multiple of the
    shard group, then split evenly (``_get_dim0_padded_size`` / ``chunks[0]`` in
    torch/distributed/fsdp/_fully_shard)."""
    total = 0
    for shape in shapes:
        rest = prod(shape[1:]) if len(shape) > 1 else 1
        total += ceil(shape[0] / world) * rest
    return total


def flat_shard_numel(shapes: list[tuple[int, ...]], world: int) -> int:
    """Elements per rank when all tensors are flattened into one buffer and split evenly
    (DeepSpeed ZeRO, Megatron's distributed optimizer)."""
    return ceil(sum(prod(s) for s in shapes) / world)


def greedy_partition_max(shapes: list[tuple[int, ...]], world: int) -> int:
    """Largest per-rank share of ZeroRedundancyOptimizer: tensors sorted by size, largest first,
    each given to the rank with the smallest total so far (``_partition_parameters``)."""
    sizes = sorted((prod(s) for s in shapes), reverse=True)
    # Ranks beyond the number of tensors stay empty: the heap needs no more than that.
    loads = [(0, rank) for rank in range(min(world, len(sizes)))]
    heapq.heapify(loads)
    for size in sizes:
        load, rank = heapq.heappop(loads)
        heapq.heappush(loads, (load + size, rank))
    return max(load for load, _ in loads)


@lru_cache(maxsize=4096)
def representative_stages(spec: ModelSpec, pp: int, chunks: int = 1) -> tuple[int, ...]:
    """Stages that can be the worst: the first, the last, and the first stage of each run of
    stages holding the same layers. Between them, stages hold the same layers and fewer
    in-flight micro-batches (every schedule's warm-up shrinks with the stage index), so
    neither their memory nor their time can exceed the run's first stage."""
    stages = pipeline_stages(spec, pp, chunks)
    picked = {0, pp - 1}
    previous = None
    for stage in stages:
        signature = tuple(u.kind for u in stage.units)
        if signature != previous:
            picked.add(stage.index)
            previous = signature
    return tuple(sorted(picked))
