"""Compute time op by op (issue 23, item 1): every GEMM of a layer at its own shape, every
elementwise op at the bytes it moves, and the fused attention at a rate that depends on the
sequence length.

One micro-batch through one layer on one tensor-parallel rank runs

- **GEMMs**: each block projection once forward (``[tokens, in] @ [in, out]`` on the rank's
  shard: column-parallel weights split ``out``, row-parallel ones ``in``) and twice backward
  (the input gradient ``[tokens, out] @ [out, in]`` and the weight gradient ``[in, tokens] @
  [tokens, out]``), each timed by ``planner/gemm.py`` (tile and wave quantisation, HBM bound,
  launch cost) on the GPU's fitted GEMM model. Megatron-LM and Megatron-DeepSpeed fuse q, k, v
  into one column-parallel GEMM and the MLP's gate and up into another
  (megatron/core/transformer/attention.py ``linear_qkv``; mlp.py ``linear_fc1`` with
  ``gated_linear_unit``); PyTorch models (torchtitan's Llama ``wq``/``wk``/``wv``, ``w1``/``w3``)
  run them apart.
- **elementwise ops** (norms, rotary embedding, the MLP's activation, residual adds, attention
  layout copies, the loss), bound by HBM: the elements each reads and writes, counted below per
  implementation. Their backward reads the incoming gradient and the saved inputs and writes the
  input gradient: twice the forward's traffic.
- **attention**: FlashAttention's FLOPs at ``attention_rate`` (``step_time``), which grows with
  the sequence length as FlashAttention-2's measured curve does (``flash_efficiency``).

The elementwise element counts per token (one element = one compute-dtype value; an fp32
intermediate counts 2) of one forward, by the variant the implementation runs
(``planner/implementations.py``, ``--impl``), and all fused where the stack fuses them
(torch.compile's inductor; Megatron-LM and Transformer Engine: megatron/core/fusions/):

| op | unfused variant | fused |
|---|---|---|
| RMSNorm | composite (Hugging Face, or torch's on a CPU): 18 h -- cast up (1 + 2), square (2 + 2), mean (2), scale (2 + 2), cast down (2 + 1), weight (1 + 1); a fused kernel (trainplan's reference, torchtitan's ``nn.RMSNorm`` on CUDA): 2 h | 2 h |
| LayerNorm | 2 h: one ATen kernel | 2 h |
| residual add | 3 h (two reads, one write) | 3 h |
| rotary embedding | 10 per q and k element: q cos (1 + 1), rotate-half (1 + 1, 0.5 + 0.5), q sin (1 + 1), add (2 + 1); torchtitan's complex product in fp32 moves the same | 2 |
| attention output | 2 q: transpose back to [s, h] and copy | 0 |
| SwiGLU | 5 f: silu (1 + 1), product (2 + 1) | 3 f |
| GELU | 2 f; written as Python arithmetic (``gelu_new``): 20 f, eight ops | 2 f |
| cross-entropy | 7 V: cast the logits up (1 + 2), log-softmax (2 + 2); backward 7 V | 2 V; backward 2 V (Megatron's fused vocab-parallel loss) |

(h the hidden size, q and kv the rank's query and key/value widths, f its MLP width, V its
vocabulary share.) With sequence parallelism the norms and residual adds run on the rank's
1/tp of the tokens. The HBM efficiency of these ops and the attention curve's constants are
data (``ThroughputConstants``), fitted on the fit half of ``validation/published_steps.json``
only (``validation/step_fit.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, log2

from planner.configs import GPUSpec, ModelSpec, TrainConfig
from planner.gemm import GemmModel, gemm_model_for
from planner.implementations import implementation
from planner.params import layer_kind, layer_stack, layer_tensors

BACKWARD_ELEMENTWISE_FACTOR = 2.0  # the backward of an elementwise op moves twice its forward's bytes

BACKWARD_LOSS_FACTOR = 1.0  # the loss's backward moves as much as its forward (the table's last row)


def _megatron_kernels(train: TrainConfig) -> bool:
    """Megatron-LM's (or Megatron-DeepSpeed's) layers: fused kernels, fused projections, and
    the fused vocab-parallel cross-entropy."""
    return train.engine in ("megatron", "deepspeed")


def fused_elementwise(train: TrainConfig) -> bool:
    """Whether the memory-bound ops of the blocks run fused: torch.compile (inductor), Megatron-LM's
    and Transformer Engine's fused kernels (fused RMSNorm/LayerNorm, bias-SwiGLU/GELU, rotary,
    bias-dropout-add: megatron/core/fusions/), Megatron-DeepSpeed likewise."""
    return train.compile or _megatron_kernels(train) or train.impl == "megatron"


def fuses_projections(train: TrainConfig) -> tuple[bool, bool]:
    """(q, k, v as one GEMM; gate and up as one GEMM): Megatron-LM and Megatron-DeepSpeed fuse both
    (megatron/core/transformer/attention.py ``linear_qkv``; mlp.py ``linear_fc1`` with
    ``gated_linear_unit``); otherwise as the implementation runs them (torchtitan 0.3.0's
    ``FusedQKVLinear``)."""
    megatron = _megatron_kernels(train)
    impl = implementation(train.impl)
    return megatron or impl.fused_qkv, megatron or impl.fused_glu


def _local_gemms(model: ModelSpec, train: TrainConfig, kind: str) -> tuple[tuple[int, int], ...]:
    """A layer's forward GEMMs on the rank's shard, as (in, out) widths."""
    t = train.tp
    qkv, glu = fuses_projections(train)
    fused = {"q": "qkv", "k": "qkv", "v": "qkv"} if qkv else {}
    fused |= {"gate": "fc1", "up": "fc1"} if glu else {}
    shapes: dict[str, tuple[int, int]] = {}
    for tensor in layer_tensors(model, kind):
        if not tensor.block_projection:
            continue
        out, inp = tensor.local_shape(t)
        name = f"{tensor.sublayer}.{tensor.block_projection}"
        if tensor.block_projection in fused:  # one GEMM per fused group, widths added
            name = f"{tensor.sublayer}.{fused[tensor.block_projection]}"
            inp0, out0 = shapes.get(name, (inp, 0))
            shapes[name] = (inp0, out0 + out)
        else:
            shapes[name] = (inp, out)
    return tuple(shapes.values())


def _expert_gemms(model: ModelSpec, train: TrainConfig, kind: str, tokens: int
                  ) -> tuple[tuple[int, int, float, tuple[tuple[int, int], ...]], ...]:
    """An MoE layer's GEMMs beside the attention's, as (how many, rows, balanced rows, (in, out)
    widths): the
    router over the rank's routed tokens; each local expert's gate, up and down over its rows
    (one grouped GEMM runs them; each expert's share is timed as its own GEMM, balanced
    routing: tokens x top-k / experts rows, ep times that for a rank's experts under expert
    parallelism); the shared experts as a dense MLP of their width, split by tensor parallelism."""
    if not layer_kind(model, kind).experts:
        return ()
    t, ep, e, k, h = train.tp, train.ep, model.num_experts, model.experts_per_token, model.hidden_size
    routed = tokens // t if ep > 1 else tokens  # with expert parallelism tp splits the routed tokens
    f = model.moe_ffn_hidden_size // (1 if ep > 1 else t)
    load = train.expert_load if ep > 1 else 1.0  # the busiest rank's rows (--expert-load)
    balanced = routed * k * ep / e
    gemms = [(1, routed, routed, ((h, e),)), (e // ep, max(1, ceil(balanced * load)), balanced, ((h, f), (h, f), (f, h)))]
    if model.shared_expert_ffn_hidden_size:
        fs = model.shared_expert_ffn_hidden_size // t
        gemms.append((1, tokens, tokens, ((h, fs), (h, fs), (fs, h))))
    return tuple(gemms)


def gemm_seconds(gemm: GemmModel, tokens: int, widths: tuple[tuple[int, int], ...], peak: float, hbm: float,
                 itemsize: int) -> tuple[float, float]:
    """(forward, backward) seconds of the GEMMs of ``widths`` over ``tokens`` rows."""
    forward = backward = 0.0
    for inp, out in widths:
        forward += gemm.seconds(tokens, out, inp, peak, hbm, itemsize)
        backward += gemm.seconds(tokens, inp, out, peak, hbm, itemsize) + gemm.seconds(inp, out, tokens, peak, hbm,
                                                                                         itemsize)
    return forward, backward


def _per_token(model: ModelSpec, train: TrainConfig) -> dict[str, float]:
    """Forward elements per token per element of each op's width (the module docstring's table)."""
    if fused_elementwise(train):
        return {"rmsnorm": 2, "layernorm": 2, "residual": 3, "rope": 2, "attention_out": 0, "swiglu": 3,
                "geglu": 3, "gelu": 2, "loss": 2 if _megatron_kernels(train) else 7}
    impl = implementation(train.impl)
    composite_gelu = model.activation in impl.composite_activations
    return {"rmsnorm": 2 if impl.rmsnorm == "fused" else 18, "layernorm": 2, "residual": 3, "rope": 10,
            "attention_out": 2, "swiglu": 3 if impl.fused_glu else 5, "geglu": 3 if impl.fused_glu else 5,
            "gelu": 20 if composite_gelu else 2, "loss": 7}


def layer_elementwise_elements(model: ModelSpec, train: TrainConfig, kind: str) -> float:
    """Forward elements one token moves through a layer's elementwise ops on one rank."""
    table = _per_token(model, train)
    t = train.tp
    attentions = len(layer_kind(model, kind).attentions)
    h = model.hidden_size / (t if train.sequence_parallel else 1)  # norms and residuals
    q = model.num_heads * model.head_dim / t
    kv = model.num_kv_heads * model.head_dim / t
    f = model.ffn_hidden_size / t
    if layer_kind(model, kind).experts:
        # the shared experts, and each token's top-k routed rows through their expert's activation;
        # the rows are gathered (read + write), weighted (2 reads + write) and added back (read +
        # write): 7 elements per routed row and hidden unit (strategies/model.py MoE)
        share = 1 / t if train.ep > 1 else 1.0  # with expert parallelism tp splits the routed tokens
        expert_f = model.moe_ffn_hidden_size / (1 if train.ep > 1 else t)
        f = model.shared_expert_ffn_hidden_size / t + share * model.experts_per_token * expert_f
        f += 7 * share * model.experts_per_token * model.hidden_size / table[model.mlp]
    elements = (attentions + 1) * (table[model.norm] + table["residual"]) * h + table[model.mlp] * f
    elements += attentions * table["attention_out"] * q
    if model.position_embedding == "rope":
        elements += attentions * table["rope"] * (q + kv)
    return elements


@dataclass(frozen=True)
class OpTimes:
    """One micro-batch of the whole model on one rank (forward + backward, seconds), apart from
    the attention kernels."""

    gemm_s: float
    elementwise_s: float
    matmul_flops: float  # what those GEMMs execute

    def efficiency(self, peak: float) -> float:
        """The matmul FLOPs' achieved share of the peak, elementwise time included: what the
        step-time model divides executed FLOPs by."""
        return self.matmul_flops / (self.gemm_s + self.elementwise_s) / peak


def op_times(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, dtype: str, itemsize: int,
             elementwise_hbm_efficiency: float, gemm_sustained: float = 1.0) -> OpTimes | None:
    """The model's GEMM and elementwise time per micro-batch on one rank, or None where no GEMM
    model is fitted for the GPU and dtype."""
    # a search asks for the same few answers many times: cached on what they depend on (hashing
    # the whole TrainConfig would cost more than the answer)
    key = (model, gpu, train.tp, train.local_seq_len, train.micro_batch, train.sequence_parallel, train.compile,
           train.impl, train.engine, train.ep, train.expert_load, dtype, itemsize, elementwise_hbm_efficiency,
           gemm_sustained)
    cached = _CACHE.get(key)
    if cached is None:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        cached = _CACHE[key] = (_op_times(model, gpu, train, dtype, itemsize, elementwise_hbm_efficiency,
                                          gemm_sustained),)
    return cached[0]


_CACHE: dict[tuple, tuple[OpTimes | None]] = {}
op_times.cache_clear = _CACHE.clear  # type: ignore[attr-defined]  # planner.clear_caches empties it


def _op_times(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, dtype: str, itemsize: int,
              elementwise_hbm_efficiency: float, gemm_sustained: float) -> OpTimes | None:
    gemm = gemm_model_for(gpu.name, dtype)
    if gemm is None:
        return None
    peak = gpu.peak_tflops.for_dtype(dtype) * 1e12
    hbm = gpu.hbm_bandwidth_gb_s * 1e9
    tokens = train.micro_batch * train.local_seq_len
    gemm_s = elementwise = flops = 0.0
    for kind, n in layer_stack(model):
        widths = _local_gemms(model, train, kind)
        forward, backward = gemm_seconds(gemm, tokens, widths, peak, hbm, itemsize)
        gemm_s += n * (forward + backward)
        flops += n * 6 * tokens * sum(i * o for i, o in widths)
        for count, rows, balanced, expert_widths in _expert_gemms(model, train, kind, tokens):
            # the busiest rank's rows take the time; the FLOPs are the balanced share (the model's
            # FLOP count): an --expert-load above 1 lowers the efficiency, not the work
            forward, backward = gemm_seconds(gemm, rows, expert_widths, peak, hbm, itemsize)
            gemm_s += n * count * (forward + backward)
            flops += n * count * 6 * balanced * sum(i * o for i, o in expert_widths)
        elementwise += n * tokens * layer_elementwise_elements(model, train, kind)
    vocab = -(-model.vocab_size // train.tp)
    forward, backward = gemm_seconds(gemm, tokens, ((model.hidden_size, vocab),), peak, hbm, itemsize)
    gemm_s += forward + backward
    flops += 6 * tokens * model.hidden_size * vocab
    loss = tokens * _per_token(model, train)["loss"] * vocab
    elementwise_s = (((1 + BACKWARD_ELEMENTWISE_FACTOR) * elementwise + (1 + BACKWARD_LOSS_FACTOR) * loss) * itemsize
                     / (hbm * elementwise_hbm_efficiency))
    return OpTimes(gemm_s / (gemm_sustained * gpu.compute_derate), elementwise_s, flops)


# FlashAttention-2's forward plateau (16k tokens) by head dim relative to head dim 128, on an
# H100 SXM5: 324, 370, 298 TFLOP/s at head dims 64, 128, 256 (Shah et al. 2024,
# FlashAttention-3, Figure 5); between them, linear in log2(head dim), constant outside
HEAD_DIM_FACTOR = ((64, 324 / 370), (128, 1.0), (256, 298 / 370))


def head_dim_factor(head_dim: int) -> float:
    """FlashAttention-2's rate at ``head_dim`` over its rate at 128 (``HEAD_DIM_FACTOR``)."""
    points = HEAD_DIM_FACTOR
    if head_dim <= points[0][0]:
        return points[0][1]
    for (d0, f0), (d1, f1) in zip(points, points[1:]):
        if head_dim <= d1:
            return f0 + (f1 - f0) * (log2(head_dim) - log2(d0)) / (log2(d1) - log2(d0))
    return points[-1][1]


def flash_efficiency(plateau: float, seq_len: int, half_seq: float, head_dim: int = 128) -> float:
    """FlashAttention's share of the peak at ``seq_len`` query and key positions per block:
    ``plateau x s / (s + half_seq)``, times ``head_dim_factor``. The shape is FlashAttention-2's
    forward on an H100 SXM5, head dim 128: 309, 350, 362, 368, 370, 370 TFLOP/s at 512 to 16k
    (Shah et al. 2024, FlashAttention-3, Figure 5), which ``half_seq`` 90 follows within 5%
    relative to the 16k rate; the plateau is the calibration's attention efficiency (head dim
    128)."""
    return plateau * seq_len / (seq_len + half_seq) * head_dim_factor(head_dim)


__all__ = ["OpTimes", "flash_efficiency", "fused_elementwise", "layer_elementwise_elements", "op_times"]
