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
intermediate counts 2) of one forward, by implementation:

| op | eager PyTorch | fused (torch.compile, Transformer Engine, Megatron's fused kernels) |
|---|---|---|
| RMSNorm | 18 h: cast up (1 + 2), square (2 + 2), mean (2), scale (2 + 2), cast down (2 + 1), weight (1 + 1) | 2 h |
| LayerNorm | 2 h: one ATen kernel | 2 h |
| residual add | 3 h (two reads, one write) | 3 h |
| rotary embedding | 10 per q and k element: complex product in fp32 (torchtitan ``apply_rotary_emb``) | 2 |
| attention output | 2 q: transpose back to [s, h] and copy; GQA's ``repeat_kv`` copies k and v to q's width: 2 (kv + q) | 0 |
| SwiGLU | 5 f: silu (1 + 1), product (2 + 1) | 3 f |
| GELU | 2 f | 2 f |
| cross-entropy | 7 V: cast the logits up (1 + 2), log-softmax (2 + 2); backward 7 V | 2 V; backward 2 V |

(h the hidden size, q and kv the rank's query and key/value widths, f its MLP width, V its
vocabulary share.) With sequence parallelism the norms and residual adds run on the rank's
1/tp of the tokens. The HBM efficiency of these ops and the attention curve's constants are
data (``ThroughputConstants``), fitted on the fit half of ``validation/published_steps.json``
only (``validation/step_fit.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from planner.configs import GPUSpec, ModelSpec, TrainConfig
from planner.gemm import GemmModel, gemm_model_for
from planner.params import layer_kind, layer_stack, layer_tensors

BACKWARD_ELEMENTWISE_FACTOR = 2.0  # the backward of an elementwise op moves twice its forward's bytes

# forward elements per token per element of the op's width (the table above)
_EAGER = {"rmsnorm": 18, "layernorm": 2, "residual": 3, "rope": 10, "swiglu": 5, "gelu": 2, "geglu": 5,
          "loss": 7}
_FUSED = {"rmsnorm": 2, "layernorm": 2, "residual": 3, "rope": 2, "swiglu": 3, "gelu": 2, "geglu": 3, "loss": 2}


def fused_elementwise(train: TrainConfig) -> bool:
    """Whether the memory-bound ops run fused: torch.compile (inductor), Megatron-LM's and
    Transformer Engine's fused kernels (fused RMSNorm/LayerNorm, bias-SwiGLU/GELU, rotary,
    bias-dropout-add: megatron/core/fusions/), DeepSpeed's Megatron-DeepSpeed likewise."""
    return train.compile or train.engine in ("megatron", "deepspeed")


def fuses_projections(train: TrainConfig) -> bool:
    """Megatron-LM (and Megatron-DeepSpeed) run q, k, v as one GEMM and gate, up as another."""
    return train.engine in ("megatron", "deepspeed")


def _local_gemms(model: ModelSpec, train: TrainConfig, kind: str) -> tuple[tuple[int, int], ...]:
    """A layer's forward GEMMs on the rank's shard, as (in, out) widths."""
    t = train.tp
    shapes: dict[str, tuple[int, int]] = {}
    for tensor in layer_tensors(model, kind):
        if not tensor.block_projection:
            continue
        out, inp = tensor.local_shape(t)
        name = f"{tensor.sublayer}.{tensor.block_projection}"
        if fuses_projections(train):  # one GEMM per fused group, widths added
            group = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "fc1", "up": "fc1"}.get(tensor.block_projection)
            if group:
                name = f"{tensor.sublayer}.{group}"
                inp0, out0 = shapes.get(name, (inp, 0))
                shapes[name] = (inp0, out0 + out)
                continue
        shapes[name] = (inp, out)
    return tuple(shapes.values())


def gemm_seconds(gemm: GemmModel, tokens: int, widths: tuple[tuple[int, int], ...], peak: float, hbm: float,
                 itemsize: int) -> tuple[float, float]:
    """(forward, backward) seconds of the GEMMs of ``widths`` over ``tokens`` rows."""
    forward = backward = 0.0
    for inp, out in widths:
        forward += gemm.seconds(tokens, out, inp, peak, hbm, itemsize)
        backward += gemm.seconds(tokens, inp, out, peak, hbm, itemsize) + gemm.seconds(inp, out, tokens, peak, hbm,
                                                                                         itemsize)
    return forward, backward


def layer_elementwise_elements(model: ModelSpec, train: TrainConfig, kind: str) -> float:
    """Forward elements one token moves through a layer's elementwise ops on one rank."""
    table = _FUSED if fused_elementwise(train) else _EAGER
    t = train.tp
    sublayers = len(layer_kind(model, kind).attentions) + 1
    h = model.hidden_size / (t if train.sequence_parallel else 1)  # norms and residuals
    q = model.num_heads * model.head_dim / t
    kv = model.num_kv_heads * model.head_dim / t
    f = model.ffn_hidden_size / t
    elements = sublayers * (table[model.norm] + table["residual"]) * h
    elements += table[model.mlp] * f
    attentions = len(layer_kind(model, kind).attentions)
    if model.position_embedding == "rope":
        elements += attentions * table["rope"] * (q + kv)
    if not fused_elementwise(train):
        elements += attentions * 2 * q + (attentions * 2 * (kv + q) if model.num_kv_heads < model.num_heads else 0)
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
        elementwise += n * tokens * layer_elementwise_elements(model, train, kind)
    vocab = -(-model.vocab_size // train.tp)
    forward, backward = gemm_seconds(gemm, tokens, ((model.hidden_size, vocab),), peak, hbm, itemsize)
    gemm_s += forward + backward
    flops += 6 * tokens * model.hidden_size * vocab
    table = _FUSED if fused_elementwise(train) else _EAGER
    elementwise += tokens * table["loss"] * vocab
    elementwise_s = ((1 + BACKWARD_ELEMENTWISE_FACTOR) * elementwise * itemsize
                     / (hbm * elementwise_hbm_efficiency))
    return OpTimes(gemm_s / (gemm_sustained * gpu.compute_derate), elementwise_s, flops)


def flash_efficiency(plateau: float, seq_len: int, half_seq: float) -> float:
    """FlashAttention's share of the peak at ``seq_len`` query and key positions per block:
    ``plateau x s / (s + half_seq)``. FlashAttention-2 on an H100 SXM5, head dim 128, forward:
    309, 350, 362, 368, 370, 370 TFLOP/s at 512 to 16k (Shah et al. 2024, FlashAttention-3,
    Figure 5): a plateau of 37.4% and ``half_seq`` 90 fit it within 2%."""
    return plateau * seq_len / (seq_len + half_seq)


__all__ = ["OpTimes", "flash_efficiency", "fused_elementwise", "layer_elementwise_elements", "op_times"]
