"""Floating-point operations: per token, per micro-batch on one GPU, per step.

Three counts, kept apart on purpose:

- **model FLOPs** (for MFU): forward + backward = 3 x forward, every matmul (2 FLOPs per
  multiply-add) including the logits, a causal decoder's attention over the unmasked half of
  the s x s square (as FlashAttention's benchmark counts it), no recomputation. With
  ``causal=False`` the full square, as PaLM (Chowdhery et al. 2022, appendix B), nanoGPT's
  ``estimate_mfu`` and Korthikanti et al. 2022 (Eq. 7: 72BLsh^2(1 + s/(6h) + v/(12hL)) for
  GPT) count it. Causal model FLOPs never exceed the executed ones, so MFU stays below the
  compute efficiency.
- **hardware FLOPs** (for HFU): model FLOPs plus recomputation, same conventions
  (Narayanan et al. 2021 Eq. 3: 96BslH^2(1 + s/(6H) + V/(16lH)) with full recompute).
- **executed FLOPs** (for time): what the GPU really runs -- causal flash attention skips the
  masked half of the square, and its backward recomputes the scores (5 matmuls against the
  forward's 2, i.e. 2.5x).

Embedding lookups, norms, activations and the softmax are not matmuls; their time is inside
the compute efficiency.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.configs import ModelSpec, TrainConfig, parse_checkpointing
from planner.params import layer_kind, layer_stack, layer_tensors, numel_per_token, pipeline_stages

BACKWARD_MATMUL_FACTOR = 2.0  # dgrad + wgrad
FLASH_BACKWARD_FACTOR = 2.5  # FlashAttention-2 backward: 5 matmuls vs 2 in forward


def _matmul_params(model: ModelSpec, tensors) -> int:
    """Weights one token multiplies with: the projections, an MoE layer's router and shared
    experts, and its top-k of the routed experts (``numel_per_token``)."""
    return sum(numel_per_token(t, model) for t in tensors
               if t.is_matmul_weight or (t.role in ("router", "shared_expert", "expert") and not t.bias))


@lru_cache(maxsize=256)
def layer_matmul_params(model: ModelSpec, kind: str = "decoder") -> int:
    """Weights a layer multiplies with per token (q, k, v, o, MLP; cross-attention too; an MoE
    layer's router, shared experts and top-k routed experts: torchtitan's active parameters,
    models/utils.py get_moe_model_nparams_and_flops)."""
    return _matmul_params(model, layer_tensors(model, kind))


def head_matmul_params(model: ModelSpec) -> int:
    """The output projection (the tied embedding counts: the logits are a matmul with it)."""
    return model.vocab_size * model.hidden_size


def attention_square_flops(model: ModelSpec, seq_len: int, kind: str = "decoder") -> int:
    """Forward FLOPs of QK^T and (softmax)V for one sequence over the full s x s square: 2 s^2
    per head and dimension of q.k, and of v (multi-head latent attention's v_head_dim differs
    from its q/k head_dim: torchtitan's head_dims = qk_nope + qk_rope + v)."""
    dims = model.head_dim + (model.v_head_dim or model.head_dim)
    per_attention = 2 * seq_len * seq_len * model.num_heads * dims
    return per_attention * len(layer_kind(model, kind).attentions)


def rank_attention_flops(model: ModelSpec, train: TrainConfig, kind: str = "decoder") -> float:
    """Forward attention FLOPs of one micro-batch through one layer on one rank: the s x s square
    split over the tensor-parallel heads and, with context parallelism, evenly over the cp ranks
    (round-robin load balancing); causal flash attention skips the masked half of a decoder's
    self-attention (cross-attention is not causal)."""
    attention = attention_square_flops(model, train.seq_len, kind) / train.cp
    if train.attention == "flash":
        attention = _unmasked(model, kind, attention)
    return attention * train.micro_batch / train.tp


def _unmasked(model: ModelSpec, kind: str, attention: float) -> float:
    """``attention`` (over all of a block's attention sub-layers) less the masked half of a causal
    block's self-attention (``LayerKind.unmasked_attention``); cross-attention is not causal."""
    block = layer_kind(model, kind)
    if not block.causal:
        return attention
    n = len(block.attentions)
    return attention * (2 * n - 1) / (2 * n)


def _counted_attention(model: ModelSpec, seq_len: int, kind: str, causal: bool) -> float:
    """The attention a model FLOP count charges: the full square (PaLM, nanoGPT, Korthikanti
    et al. and Narayanan et al. count it so) or, ``causal``, only the unmasked half of a
    decoder's self-attention -- what a causal model must compute, as FlashAttention's own
    benchmark counts it (benchmarks/benchmark_flash_attention.py: flops / 2 if causal).
    Cross-attention and encoders are never masked."""
    square = attention_square_flops(model, seq_len, kind)
    return _unmasked(model, kind, square) if causal else square


@lru_cache(maxsize=4096)
def model_forward_flops_per_sequence(model: ModelSpec, seq_len: int, causal: bool = True) -> float:
    stack = layer_stack(model)
    matmuls = 2 * seq_len * (sum(n * layer_matmul_params(model, kind) for kind, n in stack) + head_matmul_params(model))
    return matmuls + _stack_attention(model, seq_len, causal)


def _stack_attention(model: ModelSpec, seq_len: int, causal: bool) -> float:
    """The counted attention of every block of the model (one sequence, forward)."""
    return sum(n * _counted_attention(model, seq_len, kind, causal) for kind, n in layer_stack(model))


def model_flops_per_token(model: ModelSpec, seq_len: int, causal: bool = True) -> float:
    """3 x forward: ~6N + 6 L h s for causal decoder-only models (``causal=False``: 6N + 12 L h
    s, PaLM's accounting over the full attention square)."""
    return 3 * model_forward_flops_per_sequence(model, seq_len, causal) / seq_len


def model_flops_per_step(model: ModelSpec, train: TrainConfig, causal: bool = True) -> float:
    """The FLOPs MFU divides by. Causal by default: the full-square convention charges work a
    causal kernel skips, and its MFU exceeds 100% where attention dominates (tiny-llama at seq
    4096 in fp32 reported 109%). A LoRA fine-tune's step must compute the frozen weights'
    forward and input gradients (2 + 2 FLOPs per weight and token), the adapters' forward and
    both gradients (2 + 4), attention's forward and backward (3 x forward)."""
    if train.finetune == "full":
        return 3 * model_forward_flops_per_sequence(model, train.seq_len, causal) * train.global_batch
    s = train.seq_len
    matmuls = 0.0
    for kind, count in (*layer_stack(model), ("head", 1)):
        frozen, adapters = finetune_matmul_params(model, train, kind)
        matmuls += count * 2 * s * (2 * frozen + 3 * adapters)
    return (matmuls + 3 * _stack_attention(model, s, causal)) * train.global_batch


@lru_cache(maxsize=1024)
def finetune_matmul_params(model: ModelSpec, train: TrainConfig, kind: str) -> tuple[int, int]:
    """(frozen, trainable) weights a unit of ``kind`` multiplies with per token in a LoRA
    fine-tune: the base's projections (or the head) and the adapters' A and B (or the head
    when it trains)."""
    from planner.finetune import unit_states

    states = {u.kind: u for u in unit_states(model, train, 2)}
    unit = states[kind]
    if kind == "head":
        head = head_matmul_params(model)
        return (0, head) if train.train_embeddings else (head, 0)
    return layer_matmul_params(model, kind), unit.trainable_numel


@lru_cache(maxsize=256)
def op_recomputed_params(model: ModelSpec, kind: str = "decoder") -> int:
    """Weights of the linears torchtitan's op-level policy recomputes in a layer: every second
    bias-free matmul in execution order (a biased linear runs as addmm, which it saves); see
    ``planner.activations._op_level_terms``."""
    tensors = layer_tensors(model, kind)  # in execution order: q, k, v, o (self, then cross), the MLP's
    biased = {(t.sublayer, t.projection) for t in tensors if t.role == "projection" and t.bias}
    counted, recomputed = 0, 0
    for t in tensors:
        if t.block_projection is None or (t.sublayer, t.projection) in biased:
            continue
        counted += 1
        if counted % 2 == 0:
            recomputed += t.numel
    return recomputed


def _checkpointed_layers(checkpointing: str, layer_ids) -> int:
    policy, every = parse_checkpointing(checkpointing)
    if policy == "layer":
        return sum(1 for i in layer_ids if (i + 1) % every == 0)
    return len(layer_ids) if policy == "full" else 0


@lru_cache(maxsize=4096)
def recompute_flops_per_sequence(model: ModelSpec, seq_len: int, checkpointing: str, causal: bool = True) -> float:
    """Extra forward work in backward: full recompute repeats the layers' forward (not the
    head's); selective recompute repeats the core attention (the s x s products); op-level
    recomputes every second matmul (and the cheap ops FLOP counts ignore); layer:N repeats
    the forward of every N-th layer."""
    policy, _ = parse_checkpointing(checkpointing)
    if policy == "none":
        return 0
    stack = layer_stack(model)
    if policy == "op":
        return 2 * seq_len * sum(n * op_recomputed_params(model, kind) for kind, n in stack)
    if policy == "selective":
        return _stack_attention(model, seq_len, causal)
    recomputed, first = 0.0, 0
    for kind, n in stack:  # full, or layer:N per stack of its kind
        per_layer = 2 * seq_len * layer_matmul_params(model, kind) + _counted_attention(model, seq_len, kind, causal)
        recomputed += _checkpointed_layers(checkpointing, range(first, first + n)) * per_layer
        first += n
    return recomputed


def hardware_flops_per_step(model: ModelSpec, train: TrainConfig, causal: bool = True) -> float:
    recompute = recompute_flops_per_sequence(model, train.seq_len, train.activation_checkpointing, causal)
    return model_flops_per_step(model, train, causal) + recompute * train.global_batch


@dataclass(frozen=True)
class StageFlops:
    """Executed FLOPs of one micro-batch on one GPU of a pipeline stage (all its chunks)."""

    forward: float
    backward: float
    recompute: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def unit_flops(model: ModelSpec, train: TrainConfig, kind: str) -> StageFlops:
    """Executed FLOPs of one micro-batch through one unit of ``kind`` (a layer, the head; the
    embedding lookup is no matmul) on one tensor-parallel rank: the window its neighbours'
    collectives overlap. Units of one kind do the same work."""
    s, b, t = train.local_seq_len, train.micro_batch, train.tp
    flash = train.attention == "flash"
    if kind not in ("embed", "head"):  # a layer
        matmul_params, attention = layer_matmul_params(model, kind), rank_attention_flops(model, train, kind)
    elif kind == "head":
        matmul_params, attention = head_matmul_params(model), 0
    else:
        return StageFlops(forward=0.0, backward=0.0, recompute=0.0)
    matmul = 2 * s * b * matmul_params / t
    forward = matmul + attention
    backward = BACKWARD_MATMUL_FACTOR * matmul + (FLASH_BACKWARD_FACTOR if flash else 2.0) * attention
    if train.finetune != "full":
        frozen, adapters = finetune_matmul_params(model, train, kind)
        forward = 2 * s * b * (frozen + adapters) + attention
        # a frozen weight needs no gradient: its backward is the input's gradient only
        backward = 2 * s * b * (frozen + BACKWARD_MATMUL_FACTOR * adapters) + (
            FLASH_BACKWARD_FACTOR if flash else 2.0) * attention
    policy, every = parse_checkpointing(train.activation_checkpointing)
    if kind == "head" or policy == "none":  # the head is never checkpointed
        recompute = 0.0
    elif policy == "full":
        recompute = forward
    elif policy == "layer":
        recompute = forward / every  # on average; stage_flops counts which layers
    elif policy == "selective":
        recompute = attention
    else:  # op
        recompute = 2 * s * b * op_recomputed_params(model, kind) / t
    return StageFlops(forward=forward, backward=backward, recompute=recompute)


def stage_flops(model: ModelSpec, train: TrainConfig, stage_index: int) -> StageFlops:
    stage = pipeline_stages(model, train.pp, train.chunks)[stage_index]
    kinds = stage.unit_counts
    per_kind = {kind: unit_flops(model, train, kind) for kind in kinds}
    recompute = sum(n * per_kind[k].recompute for k, n in kinds.items())
    policy, every = parse_checkpointing(train.activation_checkpointing)
    if policy == "layer":
        # every N-th layer's forward again, each at its own kind's
        checkpointed: dict[str, int] = {}
        for kind, i in zip(stage.layer_kinds, stage.layer_ids):
            if (i + 1) % every == 0:
                checkpointed[kind] = checkpointed.get(kind, 0) + 1
        recompute = sum((n * per_kind[kind].forward for kind, n in checkpointed.items()), 0.0)
    return StageFlops(forward=sum(n * per_kind[k].forward for k, n in kinds.items()),
                      backward=sum(n * per_kind[k].backward for k, n in kinds.items()), recompute=recompute)


__all__ = [
    "StageFlops",
    "attention_square_flops",
    "hardware_flops_per_step",
    "head_matmul_params",
    "layer_matmul_params",
    "model_flops_per_step",
    "model_flops_per_token",
    "rank_attention_flops",
    "recompute_flops_per_sequence",
    "stage_flops",
    "unit_flops",
]
