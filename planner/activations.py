"""Activation memory from first principles: every tensor a layer saves for backward.

Baseline: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", sec. 4: a GPT layer with 16-bit activations and 1-byte dropout masks saves
sbh(34 + 5as/h) bytes -- attention 11sbh + 5as^2b, MLP 19sbh, two layer norms 4sbh -- and
with tensor parallelism t and sequence parallelism the pieces divide as in their Table 2.
We itemise the same tensors so that the formula generalises to:

- flash attention: no s^2 scores are saved; the kernel keeps q, k, v, its output and the
  fp32 log-sum-exp (4 bytes per head per token) and recomputes the scores in backward;
- GQA: k and v have ``num_kv_heads`` heads (flash); the eager path repeats them to all heads;
- SwiGLU / GeGLU: gate output (the activation's input), activation output, up output and
  their product (the down projection's input) -- four ffn-sized tensors;
- RMSNorm / LayerNorm statistics (fp32 rstd, and mean for LayerNorm) per token;
- dropout masks (1 byte) only where dropout > 0 (modern LLMs train without dropout);
- selective recompute (Megatron's: the core attention is recomputed) and full recompute
  (only the layer input is kept).

All functions return bytes for one micro-batch on one tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from math import ceil

from planner import te_fp8
from planner.configs import ModelSpec, TrainConfig
from planner.engines import ENGINES
from planner.finetune import is_adapted
from planner.implementations import Implementation, implementation
from planner.params import layer_kind
from planner.precision import RECIPES

INDEX_BYTES = 8  # int64 token ids / targets
FP32 = 4


@dataclass(frozen=True)
class ActivationInputs:
    """Every field of a ``TrainConfig`` that the per-micro-batch functions below read, and no
    other: the memory model caches their results keyed by this object, so a field they read
    but this object lacks fails loudly (AttributeError) instead of silently sharing a cache
    entry between layouts that differ in it. (``inflight`` reads the schedule; it is never
    cached and takes the full config.)"""

    seq_len: int
    micro_batch: int
    tp: int
    pp: int
    sequence_parallel: bool
    precision: str
    attention: str
    engine: str
    activation_checkpointing: str
    zero_stage: int  # torch.autocast runs only without FSDP2 (``_autocast``)
    impl: str  # whose model code (planner/implementations.py)
    compile: bool  # torch.compile'd blocks: the partitioner recomputes pointwise ops
    finetune: str  # full, lora, qlora: what a frozen base does not save (planner/finetune.py)
    lora_rank: int
    lora_targets: str
    train_embeddings: bool
    lora_dtype: str
    cp: int  # context parallel: seq_len is the rank's share; RoPE rows are gathered per forward
    ep: int  # expert parallel: which ranks an MoE layer's tokens and experts are split over
    expert_load: float  # with it, the busiest rank's routed rows over the balanced share

    @classmethod
    def of(cls, train: TrainConfig) -> ActivationInputs:
        """``seq_len`` is the rank's share of each sequence (all of it without context parallelism)."""
        values = {name: getattr(train, name) for name in _INPUT_FIELDS}
        values["seq_len"] = train.local_seq_len
        # two fields are read only as a distinction, so layouts that share it share one cache
        # entry (a search's 2,304 keys become 456): ``zero_stage <= 1`` (``_autocast``) and
        # ``pp == 1`` (the pipeline's buffers). tests/test_cache_properties.py reads the functions through both forms.
        values["zero_stage"] = min(train.zero_stage, 2)
        values["pp"] = min(train.pp, 2)
        return cls(**values)


_INPUT_FIELDS = tuple(f.name for f in fields(ActivationInputs))


@dataclass(frozen=True)
class _Dims:
    s: int  # sequence length
    b: int  # micro-batch
    h: int  # hidden
    heads: int  # attention heads on this tensor-parallel rank
    kv_heads: int
    d: int  # head dim
    ffn: int  # ffn hidden on this rank
    vocab: int  # vocabulary on this rank
    ab: int  # activation bytes
    seq_div: int  # 1, or tp with sequence parallelism
    linear_input_div: int  # divisor of a column-parallel linear's saved input
    stats: int  # norm statistics bytes per token
    dropout: bool
    flash: bool
    norm_ab: int  # bytes of the residual stream (the norms' inputs)
    cast_copies: bool  # torch.autocast casts a linear's input once per linear
    impl: Implementation  # whose model code (planner/implementations.py)
    fused_qkv: bool  # one projection makes q, k and v (the model's or the implementation's)
    compiled: bool  # torch.compile'd blocks (TrainConfig.compile)
    frozen_norms: bool  # a LoRA fine-tune: the norms' weights get no gradient
    te: str  # Transformer Engine's FP8 recipe (planner/te_fp8.py): its linears keep FP8 inputs
    moe_tokens: int  # tokens an MoE layer routes on this rank (with ep and tp: tp splits them)
    expert_ffn: int  # each routed expert's FFN on this rank (tp splits it without ep)
    shared_ffn: int  # the shared experts' FFN on this rank
    expert_parallel: bool  # ep > 1: rows travel to their experts' ranks (all-to-all) and back
    expert_load: float  # the received rows of the busiest rank over the balanced share
    local_experts: int  # routed experts whose weights this rank holds (num_experts / ep)


@lru_cache(maxsize=4096)
def _dims(model: ModelSpec, train: TrainConfig | ActivationInputs) -> _Dims:
    """Cached: the memory model asks it some twenty times per ``ActivationInputs``."""
    impl = implementation(train.impl)
    tp, sp = train.tp, train.sequence_parallel
    engine = ENGINES[train.engine]
    vocab = model.vocab_size
    if engine.vocab_multiple > 1 and tp > 1:
        vocab = ceil(vocab / (engine.vocab_multiple * tp)) * engine.vocab_multiple * tp
    return _Dims(
        s=getattr(train, "local_seq_len", train.seq_len),  # context parallel: the rank's share
        b=train.micro_batch,
        h=model.hidden_size,
        heads=model.num_heads // tp,
        kv_heads=model.num_kv_heads // tp,
        d=model.head_dim,
        ffn=model.ffn_hidden_size // tp,
        vocab=ceil(vocab / tp),
        ab=RECIPES[train.precision].compute_bytes,
        seq_div=tp if sp else 1,
        linear_input_div=tp if sp and not engine.sp_saves_gathered_input else 1,
        stats=2 * FP32 if model.norm == "layernorm" else FP32,
        dropout=model.dropout > 0,
        flash=train.attention == "flash",
        norm_ab=FP32 if _autocast(train) else RECIPES[train.precision].compute_bytes,
        cast_copies=_autocast(train),
        impl=impl,
        fused_qkv=model.fused_qkv or impl.fused_qkv,
        compiled=train.compile,
        frozen_norms=train.finetune != "full",
        te=te_fp8.te_recipe(train.precision),
        # torchtitan 0.3.0 models/common/moe.py: without expert parallelism every tensor-parallel
        # rank routes all tokens through its slice of each expert's FFN; with it the
        # tensor-parallel ranks split the tokens and run whole experts
        moe_tokens=train.micro_batch * getattr(train, "local_seq_len", train.seq_len) // (
            tp if train.ep > 1 else 1),
        expert_ffn=model.moe_ffn_hidden_size // (1 if train.ep > 1 else tp),
        shared_ffn=model.shared_expert_ffn_hidden_size // tp,
        expert_parallel=train.ep > 1,
        expert_load=train.expert_load,
        local_experts=model.num_experts // train.ep,
    )


def _autocast(train: TrainConfig | ActivationInputs) -> bool:
    """amp-bf16 without sharding runs under torch.autocast: fp32 parameters, so the residual
    stream (embedding output plus each block's additions) stays fp32, and every linear casts
    its own bf16 copy of its input (autocast caches casts of weights, not of activations).
    Under FSDP2 the MixedPrecisionPolicy casts block inputs to bf16 instead."""
    return train.precision == "amp-bf16" and train.zero_stage <= 1 and train.engine == "pytorch"


def _norm_terms(model: ModelSpec, x: _Dims, prefix: str) -> dict[str, int]:
    """What one norm keeps, sequence-sharded under sequence parallelism. Fused kernels (and
    LayerNorm everywhere): the input and fp32 statistics. Hugging Face's composite RMSNorm
    (``planner/implementations.py``): the fp32 input (``x.float()`` copies a 16-bit input),
    the fp32 rstd, and the normalised input in the input's dtype, which ``weight *`` keeps."""
    tokens = x.s * x.b // x.seq_div
    if x.compiled and prefix == "mlp":
        # torch.compile keeps the attention projection's output (a matmul's, in the compute
        # dtype) and recomputes the residual sum x + o(...) that this norm reads
        return {f"{prefix}_norm_input": x.ab * tokens * x.h, f"{prefix}_norm_stats": x.stats * tokens}
    if model.norm == "rmsnorm" and x.impl.rmsnorm != "fused":
        # ``weight * normed`` keeps ``normed`` for the weight's gradient: not when it is frozen
        normed = 0 if x.frozen_norms else x.norm_ab if x.impl.rmsnorm == "hf" else FP32
        return {f"{prefix}_norm_input": FP32 * tokens * x.h, f"{prefix}_norm_stats": x.stats * tokens,
                f"{prefix}_norm_normed": normed * tokens * x.h}
    return {f"{prefix}_norm_input": x.norm_ab * tokens * x.h, f"{prefix}_norm_stats": x.stats * tokens}


def _attention_terms(model: ModelSpec, x: _Dims, prefix: str, selective: bool = False) -> dict[str, int]:
    tokens = x.s * x.b
    # Flash kernels take GQA's k, v at kv width; the eager path repeats them to every head,
    # inside the core attention -- which selective recompute checkpoints at its kv-width inputs.
    kv_heads = x.kv_heads if x.flash or selective else x.heads
    terms = _norm_terms(model, x, prefix) | {
        # one input for q, k and v -- three autocast copies under torch.autocast
        # (one for a fused qkv projection)
        f"{prefix}_qkv_input": _te_input(x, tokens * x.h) if x.te else
        (3 if x.cast_copies and not x.fused_qkv and not x.compiled else 1) * x.ab * tokens * x.h // x.linear_input_div,
        f"{prefix}_q": x.ab * tokens * x.heads * x.d,
        f"{prefix}_k": x.ab * tokens * kv_heads * x.d,
        f"{prefix}_v": x.ab * tokens * kv_heads * x.d,
        # Flash: the kernel's output is also the output projection's input (one tensor).
        # Eager: probs @ v saves its inputs only; the projection saves the reshaped output.
        f"{prefix}_out": x.ab * tokens * x.heads * x.d,
    }
    if model.qk_norm:
        # per-head norms on q and k (their projections' outputs, in the compute dtype)
        for name, heads in (("q", x.heads), ("k", x.kv_heads)):
            terms[f"{prefix}_{name}_norm_input"] = (FP32 if x.impl.rmsnorm != "fused" else x.ab) * tokens * heads * x.d
            terms[f"{prefix}_{name}_norm_stats"] = FP32 * tokens * heads
            if x.impl.rmsnorm != "fused" and not x.frozen_norms:
                normed = x.ab if x.impl.rmsnorm == "hf" else FP32
                terms[f"{prefix}_{name}_norm_normed"] = normed * tokens * heads * x.d
    if x.impl.rope_gathered_per_layer and model.position_embedding == "rope":
        # the cache gathered by position, kept by q's and k's rotation: torchtitan's Llama3
        # (ComplexRoPE) gathers complex64 [b, s, 1, d/2] frequencies; its Qwen3, the family with
        # per-head q/k norms, gathers fp32 cos|sin [b, s, 1, 2d] (CosSinRoPE: q * cos and
        # rotate_half(q) * sin keep views of it; torchtitan/models/common/rope.py:268-346)
        terms[f"{prefix}_rope_freqs"] = (FP32 * 2 * x.d if model.qk_norm else 8 * (x.d // 2)) * tokens
    if x.impl.name == "hf" and x.fused_qkv and model.position_embedding != "rope":
        # q, k, v are views of one projection's output. SDPA keeps the q view: the whole output
        # stays (transformers/models/gpt2/modeling_gpt2.py, GPT2Attention); eager's q @ k^T
        # copies the strided q to a contiguous one and keeps that. With the KV cache on, k and
        # v are the cache's copies (its torch.cat).
        if x.flash:
            terms[f"{prefix}_q"] = x.ab * tokens * (x.heads + 2 * x.kv_heads) * x.d
        if not x.impl.kv_cache_in_training:
            terms[f"{prefix}_k"] = terms[f"{prefix}_v"] = 0
    if x.te == "delayed":
        # the output projection quantises the attention output and keeps that FP8 copy beside the
        # kernel's bf16 one (the other recipes keep the original: planner/te_fp8.py)
        terms[f"{prefix}_out_fp8"] = int(te_fp8.saved_input_bytes(x.te) * tokens * x.heads * x.d)
    if x.flash:
        terms[f"{prefix}_logsumexp"] = FP32 * tokens * x.heads
    else:
        scores = x.heads * x.s * x.s * x.b
        terms[f"{prefix}_softmax"] = x.ab * scores
        if x.impl.eager_softmax == "fp32" and x.ab != FP32:
            # softmax(dtype=float32) saves its fp32 output; probs @ v keeps a 16-bit copy
            terms[f"{prefix}_softmax"] = FP32 * scores
            terms[f"{prefix}_softmax_cast"] = x.ab * scores
        if x.dropout:
            terms[f"{prefix}_softmax_dropout_mask"] = scores
            terms[f"{prefix}_softmax_dropout_out"] = x.ab * scores
    if x.dropout:
        terms[f"{prefix}_dropout_mask"] = tokens * x.h // x.seq_div
    return terms


def _latent_attention_terms(model: ModelSpec, x: _Dims, prefix: str) -> dict[str, int]:
    """What the reference model's latent attention (strategies/model.py ``LatentAttention``)
    saves, tensor by tensor (traced with saved-tensor hooks, torch 2.13 CPU): the normalised
    input (both down-projections'); the query bottleneck's output, its norm's fp32 statistics
    and normalised output (q_b's input); the whole kv down-projection's output -- the latent is
    a view of it, and the latent's norm keeps its input --, its statistics and the normalised
    latent (kv_b's input); the kernel's q and k (each head's no-rope part and rotary part,
    concatenated), its zero-padded v, its output at the query/key head dim and fp32
    log-sum-exp; the output projection's input, cut back to the value head dim. The
    down-projections and their norms are replicated on tensor-parallel ranks, the heads split."""
    tokens = x.s * x.b
    qk, rope, rkv, rq = x.d, model.qk_rope_head_dim, model.kv_lora_rank, model.q_lora_rank
    terms = _norm_terms(model, x, prefix) | {
        f"{prefix}_qkv_input": x.ab * tokens * x.h // x.linear_input_div,
        f"{prefix}_kv_a_out": x.ab * tokens * (rkv + rope),
        f"{prefix}_kv_a_norm_stats": FP32 * tokens,
        f"{prefix}_kv_b_input": x.ab * tokens * rkv,
        f"{prefix}_q": x.ab * tokens * x.heads * qk,
        f"{prefix}_k": x.ab * tokens * x.heads * qk,
        f"{prefix}_v": x.ab * tokens * x.heads * qk,
        f"{prefix}_out": x.ab * tokens * x.heads * qk,
        f"{prefix}_logsumexp": FP32 * tokens * x.heads,
        f"{prefix}_o_input": x.ab * tokens * x.heads * model.v_head_dim,
    }
    if rq:
        terms |= {f"{prefix}_q_a_out": x.ab * tokens * rq, f"{prefix}_q_a_norm_stats": FP32 * tokens,
                  f"{prefix}_q_b_input": x.ab * tokens * rq}
    if x.dropout:
        terms[f"{prefix}_dropout_mask"] = tokens * x.h // x.seq_div
    return terms


def _core_attention_keys(prefix: str) -> tuple[str, ...]:
    """Tensors that selective recompute (Megatron's core-attention recompute) does not keep."""
    return (
        f"{prefix}_logsumexp",
        f"{prefix}_softmax",
        f"{prefix}_softmax_dropout_mask",
        f"{prefix}_softmax_dropout_out",
    )


def _mlp_terms(model: ModelSpec, x: _Dims) -> dict[str, int]:
    tokens = x.s * x.b
    ffn_tensor = x.ab * tokens * x.ffn
    gated = model.mlp != "gelu"
    terms = _norm_terms(model, x, "mlp") | {
        # (torch.compile casts once for both)
        "mlp_input": _te_input(x, tokens * x.h) if x.te else
        (2 if x.cast_copies and gated and not x.compiled else 1) * x.ab * tokens * x.h // x.linear_input_div,
    }
    if model.mlp == "gelu":
        terms |= {"mlp_act_input": ffn_tensor, "mlp_down_input": ffn_tensor}
        if model.activation in x.impl.composite_activations:
            # 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))) op by op: the products keep tanh's
            # output, 0.5 * x and 1 + tanh (transformers/activations.py:65-66)
            terms |= {"mlp_act_tanh": ffn_tensor, "mlp_act_half_input": ffn_tensor, "mlp_act_one_plus_tanh": ffn_tensor}
    else:
        terms |= {
            "mlp_gate_out": ffn_tensor,
            "mlp_act_out": ffn_tensor,
            "mlp_up_out": ffn_tensor,
            "mlp_down_input": ffn_tensor,
        }
        if x.impl.fused_glu or x.compiled:
            # One op on the fc1 output keeps no silu output of its own. torch.compile's
            # partitioner (torch/_functorch/partitioners.py, min_cut_rematerialization_partition)
            # recomputes pointwise ops in backward from saved matmul outputs: it keeps gate, up
            # and their product, not silu(gate) (CompiledFunctionBackward.saved_tensors of the
            # reference block, torch 2.13 CPU inductor).
            del terms["mlp_act_out"]
    if x.te:  # fc2 keeps its input in FP8 (transformer_engine/pytorch/module/linear.py:600-616)
        terms["mlp_down_input"] = int(te_fp8.saved_input_bytes(x.te) * tokens * x.ffn)
    if x.dropout:
        terms["mlp_dropout_mask"] = tokens * x.h // x.seq_div
    return terms


def _routing_terms(tokens: int, top_k: int, experts: int, router_bytes: int) -> dict[str, int]:
    """What every token-choice router and sort keeps (the three MoE blocks below): the scores
    [T, E], the top-k indices [T, K] (int64), the top-k weights [T, K] and their sums [T, 1]
    (renormalised), the sort of the expert ids and each row's token [T x K] (int64), the groups'
    offsets [E] (int32)."""
    rows = tokens * top_k
    return {"moe_router_probs": router_bytes * tokens * experts, "moe_topk_indices": INDEX_BYTES * tokens * top_k,
            "moe_topk_weights": router_bytes * tokens * top_k, "moe_topk_weight_sums": router_bytes * tokens,
            "moe_sort_order": INDEX_BYTES * rows, "moe_token_index": INDEX_BYTES * rows, "moe_group_offsets": 4 * experts}


def _shared_expert_terms(model: ModelSpec, x: _Dims, act_out: bool = True) -> dict[str, int]:
    """Shared experts as a gated MLP of their width over every token (gate, activation, up
    outputs and the down projection's input), and Qwen2-MoE's sigmoid gate on them."""
    if not model.shared_expert_ffn_hidden_size:
        return {}
    shared = x.ab * x.s * x.b * x.shared_ffn
    terms = {"moe_shared_gate_out": shared, "moe_shared_up_out": shared, "moe_shared_down_input": shared}
    if act_out:
        terms["moe_shared_act_out"] = shared
    if model.shared_expert_gate:
        terms |= {"moe_shared_gate_sigmoid": x.ab * x.s * x.b, "moe_shared_output": x.ab * x.s * x.b * x.h}
    return terms


def _received_rows(model: ModelSpec, x: _Dims) -> int:
    """The routed rows this rank's experts hold: N = tokens x top-k without expert parallelism;
    with it the busiest rank's, ``expert_load`` x its balanced share N (dropless routing)."""
    n = x.moe_tokens * model.experts_per_token
    return ceil(n * x.expert_load) if x.expert_parallel else n


def _router_bytes(x: _Dims) -> int:
    """The router's logits and scores: fp32 under CUDA's fp32 autocast of torchtitan's gate, else
    the compute dtype."""
    return FP32 if x.impl.fp32_router_autocast else x.ab


def _moe_terms(model: ModelSpec, x: _Dims) -> dict[str, int]:
    """What the reference model's MoE block (strategies/model.py ``MoE``) saves for its backward,
    on one rank and micro-batch, tensor by tensor (torch 2.13's derivatives: linear and
    grouped_mm keep their inputs, softmax and sigmoid their outputs, topk its indices, a
    division and a product both operands, an index its indices):

    - the router: the MLP norm's output (the router's, the experts' gather's and the shared
      experts' input: one tensor), the fp32 softmax probabilities [T, E], the top-k indices
      [T, K] (int64), the top-k weights [T, K] and their sums [T, 1] (fp32, renormalised);
    - the dispatch: the sort order and each routed row's token [N] (int64, N = T x K), the rows
      gathered per expert [N, h], the groups' offsets [E] (int32); with expert parallelism the
      rows each rank receives [R, h] and their permutations to expert order and back [R] (int64);
    - each expert's gated MLP as grouped GEMMs over its rows (``torch.nn.functional.grouped_mm``,
      as torchtitan's GroupedExperts): gate and up outputs, the activation's output and the
      product -- four [R, f] tensors;
    - the combine: the experts' output [N, h] and the routing weights in sorted order [N],
      multiplied; the weighted rows [N, h], which the sum back per token (``index_add``) keeps
      besides its indices (its derivative formula names the source for its shape, and autograd's
      codegen saves a tensor a formula names);
    - the shared experts as a dense MLP of their width, and Qwen2-MoE's gate on them (its
      sigmoid [T, 1] and the shared output [T, h], multiplied).

    Routing is dropless: the rows are N = T x K on every rank without expert parallelism; with
    it a rank receives the rows its experts were chosen for, R = N under balanced routing and
    ``expert_load`` x N on the busiest rank (--expert-load; the report's notes say so)."""
    t, k, e = x.moe_tokens, model.experts_per_token, model.num_experts
    n = t * k
    r = _received_rows(model, x)
    # without expert parallelism the MoE input is the MLP's gathered input (sequence parallel);
    # with it each tensor-parallel rank routes its own share of the tokens
    split = x.expert_parallel
    terms = _norm_terms(model, x, "mlp") | {
        "moe_input": x.ab * t * x.h if split else x.ab * t * x.h // x.linear_input_div,
        **_routing_terms(t, k, e, FP32),
        "moe_expert_input": x.ab * r * x.h,
        "moe_gate_out": x.ab * r * x.expert_ffn,
        "moe_act_out": x.ab * r * x.expert_ffn,
        "moe_up_out": x.ab * r * x.expert_ffn,
        "moe_down_input": x.ab * r * x.expert_ffn,
        "moe_expert_output": x.ab * n * x.h,
        "moe_weights_sorted": x.ab * n,
        "moe_weighted_rows": x.ab * n * x.h,
    }
    if split:  # expert parallelism: the received rows' permutation to expert order and back
        terms["moe_received_permutation"] = INDEX_BYTES * r
        terms["moe_received_inverse"] = INDEX_BYTES * r
    if model.linear_bias:  # each row's expert biases, gathered by its expert's index
        terms["moe_bias_index"] = INDEX_BYTES * r
    terms |= _shared_expert_terms(model, x, act_out=not x.impl.fused_glu)
    if model.shared_expert_ffn_hidden_size and split and x.moe_tokens != x.s * x.b:
        # the shared experts see the gathered sequence (torchtitan moe_sharding.py)
        terms["moe_shared_input"] = x.ab * x.s * x.b * x.h // x.linear_input_div
    if x.dropout:
        terms["mlp_dropout_mask"] = x.s * x.b * x.h // x.seq_div
    return terms


def _torchtitan_moe_terms(model: ModelSpec, x: _Dims) -> dict[str, int]:
    """What torchtitan 0.3.0's MoE block saves without expert parallelism (planner/implementations.py
    names the source lines; measured block by block on CPU, tests/test_moe.py): the gate's input
    -- under CUDA's fp32 autocast its fp32 copy and the fp32 copy of the gate's weight --, the
    scores [T, E], the top-k indices, the top-k scores and their sums (route_norm), the sort of the
    expert ids and each row's token [N] (int64), the groups' offsets; the grouped GEMMs' bf16 inputs
    (``x.bfloat16()`` once per GEMM: a copy each for the gate and up projections unless the rows
    are bf16 already), the bf16 copies of the weights unless they are bf16, the four [N, f]
    intermediates (bf16), the sorted scores [N] and the experts' output up-cast to fp32 [N, h] for
    the weighting (the scatter-add keeps only its indices); shared experts as torchtitan's
    FeedForward."""
    t, k, e, f = x.s * x.b, model.experts_per_token, model.num_experts, x.expert_ffn
    n = t * k
    router = _router_bytes(x)
    bf16 = 2
    casts = 1 if x.ab == bf16 else 2  # .bfloat16() of bf16 rows is the tensor itself
    terms = _norm_terms(model, x, "mlp") | {
        "moe_input": (FP32 if x.impl.fp32_router_autocast and x.ab != FP32 else x.ab) * t * x.h // x.linear_input_div,
        **_routing_terms(t, k, e, router),
        "moe_expert_input": casts * bf16 * n * x.h,
        "moe_gate_out": bf16 * n * f,
        "moe_act_out": bf16 * n * f,
        "moe_up_out": bf16 * n * f,
        "moe_down_input": bf16 * n * f,
        "moe_weights_sorted": router * n,
        "moe_expert_output_fp32": FP32 * n * x.h,
    }
    if x.impl.fp32_router_autocast and x.ab != FP32:
        terms["moe_router_weight_fp32"] = FP32 * e * x.h  # autocast's cast of the bf16 gate weight
        if model.shared_expert_ffn_hidden_size:  # the shared experts keep the bf16 input too
            terms["moe_shared_input"] = x.ab * t * x.h // x.linear_input_div
    if x.ab != bf16:  # GroupedExperts casts every weight with .bfloat16() and the GEMMs keep the casts
        terms["moe_expert_weights_bf16"] = bf16 * 3 * e * f * x.h
    return terms | _shared_expert_terms(model, x)


def _hf_moe_terms(model: ModelSpec, x: _Dims) -> dict[str, int]:
    """What transformers 5.25's sparse MoE block saves with its default experts implementation,
    ``grouped_mm`` (transformers/integrations/moe.py:424-537; the routers of Mixtral and Qwen-MoE,
    models/mixtral/modeling_mixtral.py:104-111, models/qwen3_moe/modeling_qwen3_moe.py:259-268),
    measured with saved-tensor hooks on CPU (tests/test_moe.py): the router's input, its fp32
    softmax, the top-k indices, the top-k weights and their sums (renormalised, fp32); the sort of
    the expert ids and each row's token [S] (int64, S = T x K), the groups' offsets; the gathered
    rows [S, h]; the fused gate-and-up output [S, 2f] (the activation and the product keep views of
    it), the activation's output and the product [S, f]; the routing weights in sorted order [S]
    (fp32) and the experts' output [S, h] they multiply; the inverse permutation [S] (int64) --
    the sum over each token's k rows keeps nothing. Shared experts (Qwen2-MoE) as the model's MLP
    of their width, and the sigmoid gate on them."""
    t, k, e, f = x.s * x.b, model.experts_per_token, model.num_experts, x.expert_ffn
    n = t * k
    terms = _norm_terms(model, x, "mlp") | {
        "moe_input": x.ab * t * x.h,
        **_routing_terms(t, k, e, FP32),
        "moe_expert_input": x.ab * n * x.h,
        "moe_gate_up_out": x.ab * n * 2 * f,
        "moe_act_out": x.ab * n * f,
        "moe_down_input": x.ab * n * f,
        "moe_weights_sorted": FP32 * n,
        "moe_expert_output": x.ab * n * x.h,
        "moe_inverse_order": INDEX_BYTES * n,
    }
    return terms | _shared_expert_terms(model, x)


def _te_input(x: _Dims, elements: int) -> int:
    """A LayerNormLinear's normalised input as Transformer Engine keeps it: FP8, 1 B per element
    (and block scales); with sequence parallelism the per-tensor recipes keep the rank's rowwise
    shard and gather it again in backward, the block-scaled ones the gathered columnwise copy
    (planner/te_fp8.py)."""
    shard = x.linear_input_div if te_fp8.per_tensor(x.te) else 1
    return int(te_fp8.saved_input_bytes(x.te) * elements // shard)


def _linears(model: ModelSpec, x: _Dims, kind: str) -> list[tuple[str, int, bool]]:
    """The block's linear layers in the order its forward runs them: (name, bytes of the
    output on this tensor-parallel rank, has a bias). A column-parallel output is the local
    slice; a row-parallel one is the full hidden size (a partial sum before its reduction)."""
    tokens = x.s * x.b
    qkv_bias = model.linear_bias or model.qkv_bias
    attention = []
    for prefix in layer_kind(model, kind).attentions:
        if x.fused_qkv:
            attention += [(f"{prefix}_qkv_out", x.ab * tokens * (x.heads + 2 * x.kv_heads) * x.d, qkv_bias),
                          (f"{prefix}_o_out", x.ab * tokens * x.h, model.linear_bias)]
            continue
        attention += [(f"{prefix}_q_out", x.ab * tokens * x.heads * x.d, qkv_bias),
                      (f"{prefix}_k_out", x.ab * tokens * x.kv_heads * x.d, qkv_bias),
                      (f"{prefix}_v_out", x.ab * tokens * x.kv_heads * x.d, qkv_bias),
                      (f"{prefix}_o_out", x.ab * tokens * x.h, model.linear_bias)]
    ffn, hidden = x.ab * tokens * x.ffn, x.ab * tokens * x.h
    if layer_kind(model, kind).experts:
        # the router's gate (the experts' grouped GEMMs are not matmuls a policy counts), then
        # the shared experts' gated MLP
        moe = [("moe_router_logits", _router_bytes(x) * x.moe_tokens * model.num_experts, model.router_bias)]
        if model.shared_expert_ffn_hidden_size:
            shared = x.ab * tokens * x.shared_ffn
            moe += [("moe_shared_gate_out", shared, False), ("moe_shared_up_out", shared, False),
                    ("moe_shared_down_out", hidden, False)]
        return attention + moe
    if model.mlp == "gelu":
        mlp = [("mlp_fc1_out", ffn, model.linear_bias), ("mlp_fc2_out", hidden, model.linear_bias)]
    else:
        mlp = [("mlp_gate_out", ffn, model.linear_bias), ("mlp_up_out", ffn, model.linear_bias),
               ("mlp_down_out", hidden, model.linear_bias)]
    return attention + mlp


def _op_level_terms(model: ModelSpec, x: _Dims, kind: str) -> dict[str, int]:
    """What torchtitan's op-level selective checkpointing keeps of a block (its policy:
    torchtitan 0.3.0, torchtitan/distributed/activation_checkpoint.py, ``SelectiveAC``): the
    block's input (the checkpoint's); the outputs of matmuls, but every second one (counted in
    execution order) recomputed -- a linear with a bias runs as addmm, which is saved and not
    counted; the attention kernel's outputs (flash: output and log-sum-exp; eager: the two
    bmm outputs, scores and probs @ v); reduce-scatter outputs (sequence parallelism's
    row-parallel outputs). Everything else (norms, RoPE, activations, softmax) is recomputed.
    An MoE layer: the router's gate counts as a matmul; top-k's values and indices and, with
    expert parallelism, the all-to-all's outputs are kept (torchtitan's save list names topk and
    all_to_all_single); the grouped GEMMs are recomputed. Measured on the reference model
    (tiny-llama, tiny-moe, CPU) and torchtitan's Qwen3-MoE: exact, and within 1.1%."""
    tokens = x.s * x.b
    terms = {"layer_input": x.norm_ab * tokens * x.h // x.seq_div}
    counted = 0
    for name, nbytes, bias in _linears(model, x, kind):
        if not bias:
            counted += 1
        if bias or counted % 2 == 1:
            terms[name] = nbytes
            if x.compiled and name.endswith(("_down_out", "_fc2_out")) and x.seq_div == 1:
                # torch.compile's partitioner keeps only what the backward graph reads: the
                # MLP's last matmul feeds the residual sum alone, whose gradient needs no input
                # (CompiledFunctionBackward.saved_tensors of the reference block, torch 2.13 CPU)
                del terms[name]
        if x.seq_div > 1 and name.endswith(("_o_out", "_down_out", "_fc2_out")):
            terms[name.replace("_out", "_reduce_scattered")] = nbytes // x.seq_div
    for prefix in layer_kind(model, kind).attentions:
        if not x.impl.sac_saves_attention:
            continue
        terms[f"{prefix}_out"] = x.ab * tokens * x.heads * x.d
        if x.flash:
            terms[f"{prefix}_logsumexp"] = FP32 * tokens * x.heads
        else:
            terms[f"{prefix}_scores"] = x.ab * x.heads * x.s * x.s * x.b
    if layer_kind(model, kind).experts:
        # topk is saved (its ties could route differently when recomputed): values and indices
        routed = _moe_block_terms(model, x)
        terms["moe_topk_weights"] = routed["moe_topk_weights"]
        terms["moe_topk_indices"] = routed["moe_topk_indices"]
        if x.expert_parallel:  # the all-to-all's outputs: the rows received, the rows sent back
            terms["moe_received_rows"] = x.ab * _received_rows(model, x) * x.h
            terms["moe_returned_rows"] = x.ab * x.moe_tokens * model.experts_per_token * x.h
    return terms


def _op_shared_terms(model: ModelSpec, x: _Dims, kind: str) -> dict[str, str]:
    """Tensors op-level checkpointing keeps that are the very tensors the block without
    recompute saves for its backward (op-level name -> no-recompute name): the block input is
    the first norm's input; RoPE rewrites q and k, so their projections are other tensors
    when it is on; the eager path repeats GQA's k and v to every head before saving them;
    flash's output and log-sum-exp (eager's output projection saves a reshaped copy); the gated MLP's gate and up outputs, GELU's
    fc1 output (the activation's input)."""
    rope = model.position_embedding == "rope"
    kv_same = x.flash or x.kv_heads == x.heads
    shared = {"layer_input": "attn_norm_input"}
    for prefix in layer_kind(model, kind).attentions:
        if not rope:
            shared[f"{prefix}_q_out"] = f"{prefix}_q"
        if not rope and kv_same:
            shared[f"{prefix}_k_out"] = f"{prefix}_k"
        if kv_same:
            shared[f"{prefix}_v_out"] = f"{prefix}_v"
        if x.flash:  # eager saves the projection's reshaped copy of the bmm output instead
            shared[f"{prefix}_out"] = f"{prefix}_out"
            shared[f"{prefix}_logsumexp"] = f"{prefix}_logsumexp"
    shared |= {"mlp_gate_out": "mlp_gate_out", "mlp_up_out": "mlp_up_out", "mlp_fc1_out": "mlp_act_input"}
    # the router's top-k values and indices are the tensors the block saves without recompute
    # (its logits are not: the softmax keeps its output); the shared experts' gate and up outputs
    shared |= {"moe_topk_weights": "moe_topk_weights", "moe_topk_indices": "moe_topk_indices",
               "moe_returned_rows": "moe_expert_output",
               "moe_shared_gate_out": "moe_shared_gate_out", "moe_shared_up_out": "moe_shared_up_out"}
    return shared


def op_recomputed_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder") -> int:
    """What a block under op-level checkpointing rebuilds in its backward: torch.utils.checkpoint
    reruns the block's forward, and every op the policy did not cache saves its tensors for
    backward again -- the block's no-recompute saved set, less the tensors the policy kept
    (``_op_shared_terms``). Traced op by op on the reference block (FSDPMemTracker, torch 2.13)."""
    x = _dims(model, train)
    kept = _op_level_terms(model, x, kind)
    full = layer_terms(model, train, kind, "none")
    shared = _op_shared_terms(model, x, kind)
    return sum(full.values()) - sum(full.get(shared[name], 0) for name in kept if name in shared)


def op_released_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder") -> int:
    """Kept tensors a block under op-level checkpointing lets go once its backward has rebuilt
    the forward: the recompute takes each cached output back out of the policy's cache, and one
    that no backward saves (the q projection's output under RoPE, which the recompute rotates
    into a new tensor) is freed. The MLP's output projection's stays until the block's backward
    ends. Traced on the reference block (torch 2.13, CPU, tensors found by address)."""
    x = _dims(model, train)
    kept = _op_level_terms(model, x, kind)
    shared = _op_shared_terms(model, x, kind)
    held = ("layer_input", "mlp_down_out", "mlp_fc2_out", "mlp_down_reduce_scattered", "mlp_fc2_reduce_scattered")
    return sum(nbytes for name, nbytes in kept.items() if name not in shared and name not in held)


def rebuilt_mlp_backward(model: ModelSpec, train: TrainConfig | ActivationInputs) -> tuple[int, int]:
    """(freed, working) at the MLP's elementwise backward in a block whose forward its backward
    rebuilt (full or op-level checkpointing), the peak of that block's backward (traced op by
    op on torchtitan 0.3.0's Llama3 block, MemTracker, torch 2.13 CPU): the down projection's
    saved input is freed by its backward, which has written its weight gradient; alive are the
    incoming hidden-sized gradient and the product's gradient with its two operands'
    gradients (three ffn-sized tensors gated, two for GELU)."""
    x = _dims(model, train)
    tokens = x.s * x.b
    ffn = x.ab * tokens * x.ffn
    gated = model.mlp != "gelu"
    return ffn, x.ab * tokens * x.h // x.seq_div + (3 if gated else 2) * ffn


def op_forward_pending_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder") -> int:
    """Op-level checkpointing's kept tensors that are not alive at the peak of the block's own
    forward (its MLP's product, ``layer_forward_working``): the MLP's output projection (and
    its reduce-scatter) has not run yet; the up (gated) or fc1 (GELU) output is one of the
    working tensors already."""
    kept = _op_level_terms(model, _dims(model, train), kind)
    later = ("mlp_down_out", "mlp_fc2_out", "mlp_down_reduce_scattered", "mlp_fc2_reduce_scattered",
             "mlp_up_out", "mlp_fc1_out",
             # an MoE layer's forward working set (moe_forward_bytes) holds the received rows
             # already: the all-to-all's kept output is that tensor
             "moe_received_rows")
    return sum(kept.get(name, 0) for name in later)


def layer_terms(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder",
                recompute: str | None = None) -> dict[str, int]:
    """Saved tensors of one layer, by name, in bytes, for one micro-batch on one TP rank.

    ``recompute`` (none, selective, full, op) defaults to the config's activation checkpointing;
    ``layer:N`` mixes full and none per layer (the memory model counts which layer is which)."""
    x = _dims(model, train)
    recompute = train.activation_checkpointing if recompute is None else recompute
    if recompute.startswith("layer:"):
        recompute = "none"
    if recompute == "full":
        return {"layer_input": x.norm_ab * x.s * x.b * x.h // x.seq_div}
    if recompute == "op":
        return _op_level_terms(model, x, kind)
    selective = recompute == "selective"
    terms, dropped = {}, []
    for sublayer in layer_kind(model, kind).attentions:
        terms |= (_latent_attention_terms(model, x, sublayer) if model.mla
                  else _attention_terms(model, x, sublayer, selective))
        dropped += _core_attention_keys(sublayer)
    if layer_kind(model, kind).experts:
        terms |= _moe_block_terms(model, x)
    else:
        terms |= _mlp_terms(model, x)
    if selective:
        terms = {k: v for k, v in terms.items() if k not in dropped}
        if x.compiled and x.flash and model.position_embedding == "rope":
            # compiled, the checkpointed core attention's rotated q is rebuilt in backward from
            # the saved projection output (CompiledFunctionBackward.saved_tensors, torch 2.13 CPU)
            terms.pop("attn_q", None)
    if train.finetune != "full":
        terms = _lora_terms(model, x, train, terms)
    return terms


def _lora_terms(model: ModelSpec, x: _Dims, train: ActivationInputs | TrainConfig,
                terms: dict[str, int]) -> dict[str, int]:
    """A layer's saved tensors with a frozen base and LoRA adapters (Hu et al. 2021): a frozen
    projection keeps no input of its own -- autograd saves a matmul's input only for the
    weight's gradient (torch's derivatives.yaml, mm: ``self`` is saved only if ``mat2`` requires
    grad) -- while an adapter's A keeps that same input and B keeps A's output [tokens, r]."""
    adapted = set(train.lora_targets.split(","))
    tokens = x.s * x.b
    # fp32 adapters over a 16-bit base (peft): each adapter casts its input to fp32 and A keeps
    # that copy, so the 16-bit input itself is kept by no one (peft/tuners/lora/layer.py,
    # Linear.forward: ``x = self._cast_input_dtype(x, lora_A.weight.dtype)``)
    casts = train.lora_dtype == "fp32" and x.ab != FP32
    a_bytes = FP32 if train.lora_dtype == "fp32" else x.ab
    qkv = bool(adapted & {"q", "k", "v"}) and not casts
    fc1 = bool(adapted & {"gate", "up"}) and not casts
    keep = {"attn_qkv_input": qkv, "mlp_input": fc1, "mlp_down_input": "down" in adapted and not casts}
    if not x.flash:  # eager: the output projection keeps its own reshaped copy of probs @ v
        keep["attn_out"] = "o" in adapted and not casts
    # an MoE block keeps no adapters (its router, experts and shared experts are not block
    # projections): frozen, its matmuls keep no inputs -- the MoE input, the gathered rows, the
    # down projections' inputs (measured with saved-tensor hooks on the reference block)
    keep |= dict.fromkeys(("moe_input", "moe_shared_input", "moe_expert_input", "moe_down_input",
                           "moe_shared_down_input"), False)
    terms = {name: nbytes for name, nbytes in terms.items() if keep.get(name, True)}
    gelu = model.mlp == "gelu"
    # (block part, projection, input width)
    projections = [("attn", "q", x.h), ("attn", "k", x.h), ("attn", "v", x.h), ("attn", "o", x.heads * x.d)]
    if "moe_router_probs" not in terms:  # an MoE layer's MLP has no adapters (above)
        projections += ([("mlp", "fc1", x.h), ("mlp", "fc2", x.ffn)] if gelu else
                        [("mlp", "gate", x.h), ("mlp", "up", x.h), ("mlp", "down", x.ffn)])
    for prefix, name, width in projections:
        if is_adapted(name, train):
            terms[f"{prefix}_lora_{name}_a_out"] = a_bytes * tokens * train.lora_rank
            if casts:
                terms[f"{prefix}_lora_{name}_input_fp32"] = FP32 * tokens * width
    return terms


def layer_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder",
                recompute: str | None = None) -> int:
    return sum(layer_terms(model, train, kind, recompute).values())


def embedding_terms(model: ModelSpec, train: TrainConfig | ActivationInputs) -> dict[str, int]:
    """Saved by the embedding on the first stage (per micro-batch)."""
    x = _dims(model, train)
    tokens = x.s * x.b
    terms = {"token_ids": INDEX_BYTES * tokens}
    if train.finetune != "full" and not train.train_embeddings:
        # a frozen embedding keeps no indices, and its output needs no gradient: the first
        # layer's first norm (frozen too) saves nothing unless the layer is checkpointed whole
        terms = {}
        policy = train.activation_checkpointing
        if policy != "full" and policy != "layer:1":
            terms["first_norm_unsaved"] = -sum(_norm_terms(model, x, "attn").values())
    if model.position_embedding == "learned":
        terms["position_ids"] = INDEX_BYTES * x.s  # one arange, shared by the batch
    if model.embedding_norm:
        terms["embed_norm_input"] = x.ab * tokens * x.h // x.seq_div
        terms["embed_norm_stats"] = x.stats * tokens // x.seq_div
    if x.dropout:
        terms["embed_dropout_mask"] = tokens * x.h // x.seq_div
    if model.encoder_layers:
        # The decoder's embedding; the encoder output is kept by every cross-attention.
        terms["decoder_token_ids"] = INDEX_BYTES * tokens
        terms["encoder_output"] = x.ab * tokens * x.h
    return terms


def head_terms(model: ModelSpec, train: TrainConfig | ActivationInputs) -> dict[str, int]:
    """Saved on the last stage: final norm, the head's input, the fp32 log-softmax of the
    logits (Korthikanti et al.: 'cross entropy ... 4sbv/t'), the targets."""
    x = _dims(model, train)
    tokens = x.s * x.b
    frozen_head = train.finetune != "full" and not train.train_embeddings
    terms = _norm_terms(model, x, "final") | {
        "head_input": 0 if frozen_head else x.ab * tokens * x.h // x.linear_input_div,
        "log_softmax": FP32 * tokens * x.vocab,
        "targets": INDEX_BYTES * tokens,
        "loss_total_weight": FP32,  # nll_loss's scalar normaliser
    }
    if model.encoder_layers:
        terms["encoder_final_norm_input"] = x.ab * tokens * x.h // x.seq_div
    return terms


def loss_outside_forward_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """The loss's saved tensors (fp32 log-softmax, targets, normaliser) when the caller computes
    the loss after the model's forward returns (torchtitan's trainer): not yet saved when the
    forward ends, though alive from the loss to its backward like the rest of the head's."""
    if implementation(train.impl).loss_in_forward:
        return 0
    terms = head_terms(model, train)
    return sum(terms[name] for name in ("log_softmax", "targets", "loss_total_weight"))


def forward_output_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs) -> tuple[int, int]:
    """(logits, KV cache per layer) a model's forward returns beyond what autograd saves, per
    micro-batch: alive at the end of forward, dropped with the output before
    backward in a plain training loop (``loss = model(**batch).loss``).

    Hugging Face returns the logits (the head's output, in the compute dtype) and, with
    ``use_cache`` (its config default), a DynamicCache holding every layer's k and v. Those are
    the very tensors attention saves unless it saves other ones: eager attention's repeat_kv
    copies (GQA), or torch.autocast's 16-bit copies -- RoPE leaves k in fp32 under autocast,
    its cos/sin being fp32 (``planner/implementations.py``)."""
    x = _dims(model, train)
    if not x.impl.returns_logits:
        return 0, 0
    tokens = x.s * x.b
    logits = x.ab * tokens * x.vocab
    if not x.impl.kv_cache_in_training:
        return logits, 0
    kv = tokens * x.kv_heads * x.d
    repeated = not x.flash and x.kv_heads != x.heads
    rope = model.position_embedding == "rope"
    k_bytes = max(x.ab, x.norm_ab) if rope else x.ab
    cache = 0
    if repeated or k_bytes != x.ab:
        cache += k_bytes * kv
    if repeated:
        cache += x.ab * kv
    return logits, cache


def rope_table_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """The reference model keeps RoPE's cos and sin tables in fp32 for every position it
    supports ([positions, 1, head_dim], ``strategies/model.py``) and casts them to the compute
    dtype once per forward; q * cos then saves the cast tables. Nothing is cast (or saved
    beyond the buffers) when the compute dtype is fp32."""
    if model.position_embedding != "rope":
        return 0
    x = _dims(model, train)
    rope = model.qk_rope_head_dim or model.head_dim  # latent attention rotates only its rotary part
    if x.impl.rope == "per-forward":
        # Hugging Face: [1, seq, head_dim] cos and sin per forward, in the hidden states' dtype
        return 2 * x.s * rope * x.norm_ab
    if getattr(train, "cp", 1) > 1:
        # context parallel: the rows of this rank's positions, gathered once per forward (the
        # full cast tables die as soon as they are sharded; strategies/model.py)
        return 2 * x.s * rope * x.ab
    if x.ab == FP32:
        return 0
    positions = max(model.max_position_embeddings, train.seq_len)
    return 2 * positions * rope * x.ab


def pipeline_output_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs, last_stage: bool) -> int:
    """What torch.distributed.pipelining keeps per in-flight micro-batch beyond the saved
    tensors: the stage's output, held for that micro-batch's backward -- the hidden state on
    inner stages, the logits (before the fp32 cast) on the last. Megatron frees the output's
    data once sent (Korthikanti et al. 2022, appendix B), so only the pytorch engine pays."""
    if train.pp == 1 or train.engine != "pytorch":
        return 0
    x = _dims(model, train)
    tokens = x.s * x.b
    return x.ab * tokens * x.vocab if last_stage else x.ab * tokens * x.h // x.seq_div


def pipeline_recv_buffer_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """One of torch.distributed.pipelining's receive buffers: a stage allocates one per
    micro-batch for the activations it receives (all but the first stage) and one for the
    gradients it receives (all but the last), once, and keeps them between steps."""
    if train.pp == 1 or train.engine != "pytorch":
        return 0
    x = _dims(model, train)
    return x.ab * x.s * x.b * x.h // x.seq_div


def frozen_head_hidden_bytes(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """A frozen head saves no input, yet the decoder's output (the final norm's) is alive while
    the loss runs: the reference model's forward holds it until it returns."""
    if train.finetune == "full" or train.train_embeddings or implementation(train.impl).returns_logits:
        return 0
    x = _dims(model, train)
    return x.ab * x.s * x.b * x.h // x.linear_input_div


def loss_transients(model: ModelSpec, train: TrainConfig | ActivationInputs) -> tuple[int, int]:
    """(forward, backward) bytes alive beside the saved tensors while the loss runs.

    Forward: the fp32 logits are log-softmax's input while its fp32 output is written.
    Backward: nll_loss's gradient and log-softmax's input gradient (both fp32, vocab-wide)
    coexist with the saved log-softmax output."""
    x = _dims(model, train)
    logits_fp32 = FP32 * x.s * x.b * x.vocab
    hidden = frozen_head_hidden_bytes(model, train)  # 0 for models returning their logits
    if x.impl.returns_logits:
        # The returned logits are counted as forward outputs; 16-bit ones get an fp32 copy for
        # the loss (transformers/loss/loss_utils.py:61). The decoder's output (the final norm's,
        # held by the base model's output object while the loss runs) is another tensor than
        # the head's saved input when torch.autocast casts it.
        decoder_output = x.norm_ab * x.s * x.b * x.h if x.cast_copies else 0
        return (logits_fp32 if x.ab != FP32 else 0) + decoder_output, 2 * logits_fp32
    if train.tp > 1 and train.engine == "pytorch":
        # DTensor's loss_parallel works on the vocabulary shard through one more fp32
        # shard-sized tensor (the max-shifted logits) in forward and in backward (measured).
        return 2 * logits_fp32 + hidden, 3 * logits_fp32
    return logits_fp32 + hidden, 2 * logits_fp32


def layer_backward_workspace(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder") -> int:
    """Activation gradients alive at once inside one layer's backward (an estimate the
    profiler checks): the residual stream's incoming and outgoing gradients plus the larger
    of the MLP's (three ffn-sized gradients for gated MLPs, two for GELU) and attention's
    (eager: the gradients of the probabilities and of the scores; flash: dq, dk, dv and the
    kernel's fp32 dq accumulator) -- less, for attention, the MLP's saved tensors, which its
    backward (earlier) has freed."""
    x = _dims(model, train)
    tokens = x.s * x.b
    residual = 2 * x.ab * tokens * x.h // x.seq_div
    mlp = (2 if model.mlp == "gelu" else 3) * x.ab * tokens * x.ffn
    if x.flash:
        attention = x.ab * tokens * (x.heads + 2 * x.kv_heads) * x.d + FP32 * tokens * x.heads * x.d
    else:
        attention = 2 * x.ab * x.heads * x.s * x.s * x.b
    if not layer_kind(model, kind).experts:
        # attention's backward runs after the MLP's, whose saved tensors are freed by then
        mlp_saved = sum(_mlp_terms(model, x).values())
        return max(residual + max(mlp, attention - mlp_saved), _qk_norm_backward(model, x, mlp_saved))
    # an MoE layer's block (its weight gradients counted as they appear: more than a persistent
    # gradient buffer holds beside them, never less)
    moe_saved = _moe_saved(model, train)
    return max(moe_backward_extra(model, train), residual + attention - moe_saved,
               _qk_norm_backward(model, x, moe_saved))


def _qk_norm_backward(model: ModelSpec, x: _Dims, mlp_saved: int) -> int:
    """The per-head q norm's backward (fused RMSNorm, ``_norm_backward_fp32`` of its fp32 working
    tensors, q-sized), with the attention kernel's dq, dk, dv and the residual's two gradients
    alive, the MLP's saved tensors and the kernel's own (q, k, v, its output and statistics)
    freed: the peak of a layer with per-head norms whose q is wide (traced on the reference
    block, tiny-qwen3-moe, bf16: within 604 bytes). 0 without them or with composite norms."""
    if not model.qk_norm or x.impl.rmsnorm != "fused" or not x.flash:
        return 0
    t = x.s * x.b
    q, kv = t * x.heads * x.d, t * x.kv_heads * x.d
    kernel_saved = sum(v for k, v in _attention_terms(model, x, "attn").items()
                       if k in ("attn_q", "attn_k", "attn_v", "attn_out", "attn_logsumexp"))
    fp32_tensors = 4 + (2 if x.ab != FP32 else 0)  # the input's and the gradient's fp32 copies when 16-bit
    return (2 * x.ab * t * x.h // x.seq_div + x.ab * (q + 2 * kv) + fp32_tensors * FP32 * q
            - mlp_saved - kernel_saved)


def layer_forward_working(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """With full recompute a layer saves only its input, yet its forward still builds every
    intermediate tensor and frees each once the next op has used it. The most alive at once
    (traced op by op on the reference block, FSDPMemTracker, torch 2.13): the MLP's product,
    with the block's residual sum, the normalised MLP input and the product's operands alive --
    two hidden-sized tensors and three ffn-sized ones for gated MLPs (gate's activation, up,
    their product), two for GELU (fc1's output and its activation)."""
    x = _dims(model, train)
    tokens = x.s * x.b
    ffn_tensors = 2 if model.mlp == "gelu" else 3
    dense = 2 * x.ab * tokens * x.h // x.seq_div + ffn_tensors * x.ab * tokens * x.ffn
    attention = _attention_forward_working(model, x)
    if not model.is_moe or x.impl.moe != "reference":
        return max(dense, attention)
    moe = 2 * x.ab * tokens * x.h // x.seq_div + _moe_forward_working(model, x)
    return max(moe, dense if model.dense_layers else 0, attention)


def _attention_forward_working(model: ModelSpec, x: _Dims) -> int:
    """The most the reference attention (strategies/model.py ``Attention``, fused kernel) holds at
    once in a forward that saves nothing, beyond the layer's input (traced op by op on CPU,
    torch 2.13, fitted exactly over eight shapes, fp32 and bf16): the normalised input with q, k
    and v, at the largest of RoPE's moments -- q's rotation (q, its rotated half, the two
    products: four q-sized tensors), k's (five k-sized ones with v), the output projection's
    input and output beside q, k, v -- and, with per-head norms, each norm's moment (its fp32
    copy of a 16-bit input, the normalised product and its cast back, and the per-head fp32
    statistics). Other implementations and eager or latent attention: not modelled (0)."""
    if x.impl.name != "trainplan" or not x.flash or model.mla:
        return 0
    a, t = x.ab, x.s * x.b
    q, kv, h = a * t * x.heads * x.d, a * t * x.kv_heads * x.d, a * t * x.h
    moments = [h + 4 * q + 2 * kv, h + 2 * q + 5 * kv, 2 * (h + q + kv)]
    if model.qk_norm:
        upcast = FP32 if a != FP32 else 0  # x.float() of an fp32 tensor is the tensor itself
        per_q, per_kv = q // a, kv // a
        moments += [h + (2 * a + FP32 + upcast) * per_q + 2 * kv + FP32 * t * x.heads,
                    h + 2 * q + (3 * a + FP32 + upcast) * per_kv + FP32 * t * x.kv_heads]
    return max(moments)


def _moe_forward_working(model: ModelSpec, x: _Dims) -> int:
    return moe_forward_bytes(model, x.moe_tokens, x.ab, x.expert_ffn, x.s * x.b, _received_rows(model, x))


def moe_forward_bytes(model: ModelSpec, tokens: int, ab: int, expert_ffn: int, shared_tokens: int,
                      received: int | None = None) -> int:
    """The most the reference MoE block (strategies/model.py ``MoE``) holds at once in a forward
    that saves nothing (checkpointed, or inference), beyond its input (traced op by op on CPU,
    torch 2.13; tests/test_moe.py traces it again): the routing's small tensors -- the fp32
    probabilities, the top-k indices and weights, the sort order and each row's token, the counts
    -- and the gathered rows [R, h], which the forward keeps to its end, with, at the largest of
    three moments: the experts' activation, up output and product [R, f] (and the groups'
    offsets); the experts' output and its weighted copy [N, h]; with shared experts, the routed
    sum, the shared output and their sum [T, h] beside the weighted rows. ``received``: the rows a
    rank's experts receive under expert parallelism (N without it)."""
    t, k, e, h = tokens, model.experts_per_token, model.num_experts, model.hidden_size
    n = t * k
    r = n if received is None else received
    routing = FP32 * t * e + INDEX_BYTES * (t * k + 2 * n + e) + ab * t * k
    experts = r * h * ab + 3 * ab * r * expert_ffn + 4 * e
    combine = ab * (r * h + 2 * n * h + n)
    shared = ab * (r * h + n * h + n + 3 * shared_tokens * h) if model.shared_expert_ffn_hidden_size else 0
    return routing + max(experts, combine, shared)


def _moe_backward_moments(model: ModelSpec, x: _Dims) -> list[int]:
    """The moments of one MoE block's backward (router to combine, the MLP norm aside) where the
    most bytes can be alive beyond the block's saved tensors (those it has freed by then counted
    negative; the weight gradients written so far counted), for each implementation. Traced op by op on CPU (torch 2.13,
    every storage an op returns counted until freed; fitted exactly, zero residual, over 15
    shapes of hidden size, experts, top-k, expert width and tokens, fp32 and bf16; tests/
    test_moe.py re-traces them). In order: the combine's backward (the incoming gradient
    gathered to the routed rows, the weighted product's two gradients, their row sums); then
    each expert GEMM's backward as its weight gradient [E, h, f] and its input gradient appear
    and the saved tensors it read are freed -- down first, the activation's product, up, gate.
    Under expert parallelism the experts' side has the rows this rank received (R) where the
    combine has its own (N); the all-to-all's own buffers are the dispatch's. torchtitan runs the
    experts' GEMMs in bf16 (2 bytes) and combines in fp32 whatever the model's dtype; with fp32
    weights each weight gradient is cast up while its bf16 copy lives, and the GEMMs' saved bf16
    copies of the weights are freed as each is used (the five further moments)."""
    a, h, f = x.ab, x.h, x.expert_ffn
    t = x.moe_tokens
    n = t * model.experts_per_token
    r = _received_rows(model, x)
    w = x.local_experts * h * f  # one stacked expert weight on this rank
    g = a * t * h  # the incoming gradient
    idx = INDEX_BYTES * n  # the token index the combine's backward gathers with, freed after it
    if x.impl.moe == "torchtitan":
        moments = [g + 3 * FP32 * n * h + FP32 * n,
                   g - 2 * n * h + 2 * n * f + 2 * w,
                   g - 4 * n * h + 4 * n * f + 2 * w,
                   g - 2 * n * h - 2 * n * f + 4 * w,
                   g - 6 * n * f + 6 * w]
        if a != 2:  # fp32 weights: each bf16 gradient cast up, the saved bf16 weight copies freed
            moments += [g - 4 * n * h + 4 * w,
                        g - 4 * n * h - 4 * n * f + 6 * w,
                        g - 4 * n * f + 4 * w,
                        g - 2 * n * h - 8 * n * f + 8 * w - FP32 * model.num_experts,
                        g + 4 * n * h - 8 * n * f + 6 * w - FP32 * model.num_experts]
        return moments
    if x.impl.moe == "hf":  # gate and up fused into one [E, 2f, h] weight
        moments = [g + 3 * a * n * h,
                   g + a * r * f + a * w - idx,
                   g - a * n * h + 2 * a * r * f + a * w - idx,
                   g - 2 * a * r * f + 3 * a * w - idx]
    elif x.frozen_norms:  # LoRA: the block is frozen, its backward makes input gradients only
        moments = [g + 2 * a * n * h + a * n,
                   g + a * r * h - 2 * a * n * h + a * r * f - idx,
                   g - 2 * a * n * h + 3 * a * r * f - idx,
                   3 * g - a * n * h - 3 * a * r * f - idx - FP32 * model.num_experts]
    else:
        moments = [g + 2 * a * n * h + a * n,
                   g + a * r * h - 2 * a * n * h + a * r * f + a * w - idx,
                   g - 2 * a * n * h + 2 * a * r * f + a * w - idx,
                   g + a * r * h - 2 * a * n * h - a * r * f + 2 * a * w - idx,
                   g + 2 * a * r * h - 2 * a * n * h - 3 * a * r * f + 3 * a * w - idx]
    if not model.shared_expert_ffn_hidden_size:
        return moments
    # the shared experts' backward runs first, as a dense gated MLP of their width over every
    # token; after it their input's gradient and their three weight gradients stay, their four
    # saved [T, s] tensors are freed (traced with the reference block)
    ts, hs = a * x.s * x.b * x.shared_ffn, a * h * x.shared_ffn
    if x.frozen_norms:  # no weight gradients, one [T, s] tensor fewer saved
        shared, after = [g + 3 * ts, 2 * g, 3 * g - 2 * ts, 4 * g - 3 * ts], g - 3 * ts
    else:
        shared = [g + 2 * ts + hs, 2 * g - ts + 2 * hs, 3 * g - 3 * ts + 3 * hs, 4 * g - 4 * ts + 3 * hs]
        after = g - 4 * ts + 3 * hs
    return shared + [m + after for m in moments]


def _moe_rebuilt_forward_end(model: ModelSpec, x: _Dims, kept_rows: int = 0) -> int:
    """A checkpointed MoE layer's backward first rebuilds its forward: at the rebuilt forward's
    last op, beside everything it saved again and the incoming gradient, the routed experts' sum
    [T, h] is alive while the shared experts run, with the renormalised top-k weights and the
    per-expert counts; in a frozen (LoRA) block, whose GEMMs save no inputs, also the block's
    input, the gathered rows and the shared experts' product (traced op by op on the reference
    block, torch 2.13 CPU: fp32 and LoRA, exact). ``kept_rows``: received rows a checkpointing
    policy kept, saved already."""
    a, t = x.ab, x.moe_tokens
    rows = _received_rows(model, x)
    shared = bool(model.shared_expert_ffn_hidden_size)
    alive = a * t * x.h * (1 + shared) + a * t * model.experts_per_token + INDEX_BYTES * model.num_experts
    if x.frozen_norms:
        alive += a * t * x.h + a * rows * x.h + shared * a * x.s * x.b * x.shared_ffn
    if not x.expert_parallel:
        return alive
    # with expert parallelism the rebuilt forward peaks earlier, at the combine's all-to-all:
    # the received rows, the experts' output and its copy back in source order, all [R, h] and
    # not saved, and one more row tensor of the collective's, while the weighted rows, the
    # sorted weights and the shared experts' tensors are not saved yet (traced on two gloo
    # ranks, tiny-moe ZeRO-3 ep2 with full recompute: within 22 KB of each rank's peak)
    n = t * model.experts_per_token
    not_yet = a * n * x.h + a * n + shared * 4 * a * x.s * x.b * x.shared_ffn
    return max(alive, a * t * x.h + 4 * a * rows * x.h - not_yet - kept_rows)


def moe_backward_extra(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """The most bytes an MoE block's backward holds beyond its saved tensors
    (``_moe_backward_moments``; when checkpointing rebuilds the block, the rebuilt forward's end,
    ``_moe_rebuilt_forward_end``)."""
    x = _dims(model, train)
    moments = _moe_backward_moments(model, x)
    policy = train.activation_checkpointing
    if not (policy in ("full", "op") or policy.startswith("layer:")) or x.impl.moe != "reference":
        return max(moments)
    # op-level checkpointing keeps the all-to-all's received rows: saved, not extra
    kept_rows = x.ab * _received_rows(model, x) * x.h if policy == "op" and x.expert_parallel else 0
    return max(moments + [_moe_rebuilt_forward_end(model, x, kept_rows)])


def layer_backward_peak_extra(model: ModelSpec, train: TrainConfig | ActivationInputs, kind: str = "decoder") -> int:
    """Bytes beyond the layer's own saved (or recomputed) tensors at the peak inside its
    backward under FSDP, whose weight gradients stay unsharded in the compute dtype until the
    layer's post-backward. Traced op by op on the reference block (FSDPMemTracker, torch 2.13;
    llama-2-13b and mistral-7b, full recompute), two moments compete:

    - the MLP's elementwise backward: the product's gradient and its two operands' gradients
      (three ffn-sized tensors for gated MLPs, two for GELU) while the product itself (the down
      projection's saved input) is already freed, the down projection's weight gradient, and
      the incoming hidden-sized gradient;
    - the MLP norm's backward: the MLP's saved tensors freed, all its weight gradients, the
      fused RMSNorm's fp32 working tensors (``_norm_backward_fp32``) and two hidden-sized
      gradients."""
    x = _dims(model, train)
    tokens = x.s * x.b
    hidden = x.ab * tokens * x.h // x.seq_div
    ffn = x.ab * tokens * x.ffn
    gated = model.mlp != "gelu"
    weight = x.ab * model.hidden_size * x.ffn  # one MLP weight, local to tensor parallelism
    mlp_saved = sum(v for k, v in _mlp_terms(model, x).items() if not k.startswith("mlp_norm_"))
    elementwise = ((3 if gated else 2) - 1) * ffn + weight + hidden
    norm_work = _norm_backward_fp32(model, x) * FP32 * tokens * x.h // x.seq_div + 2 * hidden
    # the per-head norms' backward: the MLP's (or MoE's) and the output projection's weight
    # gradients written, the q, k, v projections' not yet
    out_proj = x.ab * x.heads * x.d * x.h
    if not layer_kind(model, kind).experts:
        qk = _qk_norm_backward(model, x, mlp_saved) + (3 if gated else 2) * weight + out_proj
        return max(elementwise, -mlp_saved + (3 if gated else 2) * weight + norm_work, qk if model.qk_norm else 0)
    # an MoE layer: its block's moments, or its norm's backward with every saved tensor of the
    # block freed and all its weight gradients written (the experts', the router's, the norm's,
    # the shared experts'), traced with the reference block
    grads = 0 if x.frozen_norms else x.ab * (3 * x.local_experts * x.h * x.expert_ffn + model.num_experts * x.h
                                             + x.h + 3 * x.h * x.shared_ffn)
    moe_saved = _moe_saved(model, train)
    qk = _qk_norm_backward(model, x, moe_saved) + grads + out_proj if model.qk_norm else 0
    return max(moe_backward_extra(model, train), -moe_saved + grads + norm_work, qk)


def _moe_saved(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """What an MoE layer's block saves, its norm aside (LoRA's frozen block included)."""
    return sum(v for k, v in layer_terms(model, train, "moe", "none").items() if k.startswith("moe_"))


def _moe_block_terms(model: ModelSpec, x: _Dims) -> dict[str, int]:
    """What the implementation's MoE block saves (with its MLP norm's terms)."""
    return {"torchtitan": _torchtitan_moe_terms, "hf": _hf_moe_terms, "reference": _moe_terms}[x.impl.moe](model, x)


def _norm_backward_fp32(model: ModelSpec, x: _Dims) -> int:
    """Hidden-sized fp32 tensors alive at the last op of the fused RMSNorm's backward
    (``strategies/kernels/norm.py``: the subtraction): the normalised input, the gradient
    times the weight, the normalised input times the row mean, their difference -- and the
    fp32 copies of the input and of the incoming gradient when the residual stream is not fp32
    (``.float()`` of an fp32 tensor is the tensor itself). Traced on llama-2-13b (bf16, six)
    and the reference block (fp32, four) with FSDPMemTracker, torch 2.13. LayerNorm keeps
    the count first measured for it (five)."""
    if model.norm != "rmsnorm":
        return 5
    return 4 + (2 if x.norm_ab != FP32 else 0)


def layer_backward_end_workspace(model: ModelSpec, train: TrainConfig | ActivationInputs) -> int:
    """What the last op of a layer's backward -- its first norm's backward -- holds beside the
    layer's weight gradients (traced op by op on the reference block, FSDPMemTracker, torch
    2.13): the fused RMSNorm's backward works in fp32 (``_norm_backward_fp32``), and the
    residual stream's incoming and outgoing gradients are alive in the compute dtype."""
    x = _dims(model, train)
    tokens = x.s * x.b
    return (_norm_backward_fp32(model, x) * FP32 + 2 * x.ab) * tokens * x.h // x.seq_div


def inflight(train: TrainConfig, stage: int) -> tuple[float, int, int]:
    """Micro-batches whose activations a pipeline stage holds at its peak.

    Returns (layer_factor, embed_count, head_count): the stage's per-layer activations are
    multiplied by ``layer_factor`` x layers-on-stage; the embedding's and head's by their counts.
    GPipe holds all m micro-batches; 1F1B stage r holds min(p - r, m) (Narayanan et al. 2021);
    interleaved 1F1B with v chunks warms up 2(p - r - 1) + (v - 1)p + 1 chunk-forwards, each
    of L/(pv) layers, which for stage 0 is L(1 + (p - 1)/(pv)) layers (Korthikanti et al. 2022).
    """
    p, m, v = train.pp, train.num_microbatches, train.chunks
    if p == 1:
        return 1.0, 1, 1
    if train.schedule == "gpipe":
        return float(m), m, m
    if train.schedule == "1f1b":
        n = min(p - stage, m)
        return float(n), n, 1
    chunk_forwards = min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v)
    return chunk_forwards / v, min(m, 2 * p - 1), 1
