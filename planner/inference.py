"""Inference: will this model run on this GPU, at what batch and context, how fast?

Memory per GPU (the components a run measures, ``profiler/inference.py``):

- ``weights``: block projections as ``--weights`` stores them (16-bit, INT8 with an fp32 scale per
  output row, INT4 in groups of 128 with bf16 scales and zeros, NF4 at 4.127 bits), the
  embedding, norms and head in the compute dtype; tensor parallelism splits them as in training.
- ``kv_cache``: batch x length x layers x 2 x kv_heads x head_dim x bytes, preallocated for
  prompt + new tokens (Hugging Face's ``StaticCache``); INT8 adds one compute-dtype scale per
  token and head. An encoder-decoder's decoder also caches the encoder output's k and v.
- ``activations``: the peak of the forward pass's live tensors, found by walking the allocations
  ``strategies/inference.py`` makes op by op (``_ForwardWalk``): the residual stream, norms, RoPE,
  projections (with a dequantised weight where the kernel makes one), attention output, MLP, the
  last position's logits.
- ``swap_buffers``: layer offload's device slots (``slots`` x the largest swapped layer).
- ``overhead``: CUDA context (and communicators, the allocator's cache) from the calibration.

Time (roofline per phase, Williams et al. 2009): prefill is compute-bound -- forward FLOPs over
the dtype's dense peak times the calibrated efficiency, or the weights' bytes over HBM where that
is longer; each decode step reads every resident weight and the KV cache so far, over HBM bandwidth
times ``decode_hbm_efficiency``, or computes 2 x params x batch FLOPs, whichever is longer.
Weight-only matmuls read the stored bytes once with fused kernels (``kernels="fused"``, the
default: Marlin, bitsandbytes, torchao); trainplan's executor (``kernels="dequant"``) reads the
codes, writes the dequantised weight and reads it again, and holds that copy while it multiplies.
W8A8 reads its int8 codes once either way. Layer offload (the seed notes' BMInf)
adds the host-link loads that its scheduler cannot hide: ``offload_pass_time`` simulates the
scheduler event by event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import ceil
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field, model_validator

from planner.calibration import Calibration, Overheads
from planner.capabilities import inference_architecture_refusal, inference_refusal
from planner.configs import MAX_GPUS, MAX_LAYERS, MAX_MICRO_BATCH, MAX_SEQ_LEN, GPUSpec, ModelSpec, _Frozen
from planner.errors import ConfigError, LayoutError
from planner.finetune import quantised_bytes
from planner.activations import moe_forward_bytes
from planner.flops import _counted_attention, head_matmul_params, layer_matmul_params
from planner.memory import Limit, memory_limits
from planner.params import ParamTensor, Unit, layer_kind, layer_stack, pipeline_stages

Weights = Literal["bf16", "fp16", "fp32", "int8", "w8a8", "int4", "nf4"]
WEIGHTS_HELP = ("how block projections are stored: bf16, fp16, fp32 (as is), int8 (weight-only, per-row absmax), "
                "w8a8 (int8 weights and per-token int8 activations, int8 GEMM), int4 (group-wise, 128), nf4 (QLoRA's "
                "4-bit NormalFloat)")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
INT4_GROUP = 128
INT4_CHUNK_ELEMENTS = 1 << 16  # strategies/kernels/int4.py dequantises this many weights per step
NF4_BLOCK = 64
NF4_CHUNK_CODES = 2048  # strategies/kernels/nf4.py looks up this many code bytes per step
W8A8_MIN_ROWS = 32  # strategies/kernels/int8.py pads fewer rows to this for torch._int_mm (needs > 16)


class InferenceConfig(_Frozen):
    """One inference layout: how the weights are stored, batch and lengths, parallelism, offload."""

    gpus: int = Field(default=1, gt=0, le=MAX_GPUS)
    tp: int = Field(default=1, gt=0, le=MAX_GPUS)
    pp: int = Field(default=1, gt=0, le=MAX_GPUS)
    weights: Weights = "bf16"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="activations and compute; auto: the weights' own 16/32-bit dtype, else bf16 "
        "where the GPU has bf16 math, fp16 where it is faster than fp32, else fp32")
    kv_cache: Literal["auto", "int8"] = Field(default="auto", description="auto: the compute dtype; int8: "
                                              "per-token, per-head absmax codes")
    batch: int = Field(default=1, gt=0, le=MAX_MICRO_BATCH)
    prompt_len: int = Field(default=512, gt=0, le=MAX_SEQ_LEN)
    new_tokens: int = Field(default=128, gt=0, le=MAX_SEQ_LEN)
    prefill_chunk: int = Field(default=0, ge=0, le=MAX_SEQ_LEN, description="prompt tokens per forward (0: all)")
    kernels: Literal["fused", "dequant"] = Field(
        default="fused", description="weight-only matmuls: fused (Marlin, bitsandbytes, torchao's int4/int8 "
        "kernels read the stored bytes once, no dequantised copy) or dequant (trainplan's executor: each weight "
        "dequantised to the compute dtype, multiplied, dropped)")
    offload: Literal["none", "layers"] = "none"
    slots: int = Field(default=2, gt=0, le=MAX_LAYERS, description="device buffers that swapped layers pass through")
    swapped_layers: int = Field(default=0, ge=0, le=MAX_LAYERS, description="layers kept in host memory "
                                "(0 with --offload layers: the fewest that fit)")

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        if self.tp * self.pp != self.gpus:
            raise LayoutError(f"tp x pp = {self.tp} x {self.pp} != {self.gpus} GPUs (inference has no data parallelism: "
                              f"run one replica per {self.tp * self.pp} GPUs)")
        if self.weights in DTYPE_BYTES and self.dtype not in ("auto", self.weights):
            raise ConfigError(f"--weights {self.weights} computes in {self.weights}; --dtype applies to quantised weights")
        if self.offload == "none" and self.swapped_layers:
            raise ConfigError("--swapped-layers needs --offload layers")
        if self.offload == "layers" and self.gpus > 1:
            raise LayoutError("layer offload is planned for one GPU (BMInf's setting); use tp/pp or offload, not both")
        if self.prefill_chunk > self.prompt_len:
            raise ConfigError(f"--prefill-chunk {self.prefill_chunk} exceeds the prompt ({self.prompt_len} tokens)")
        return self

    @property
    def cache_len(self) -> int:
        """Positions the decoder's self-attention cache holds: prompt + new tokens."""
        return self.prompt_len + self.new_tokens

    @property
    def quantised(self) -> bool:
        return self.weights not in DTYPE_BYTES


def compute_dtype_name(cfg: InferenceConfig, gpu: GPUSpec | None = None) -> str:
    if not cfg.quantised:
        return cfg.weights
    if cfg.dtype != "auto":
        return cfg.dtype
    if gpu is None:
        return "bf16"
    peaks = gpu.peak_tflops
    if peaks.bf16:
        return "bf16"
    return "fp16" if (peaks.fp16 or 0) > peaks.fp32 else "fp32"


def check_inference(model: ModelSpec, cfg: InferenceConfig) -> None:
    if reason := inference_architecture_refusal(model) or inference_refusal(model, cfg):  # sinks; MLA's limits
        raise LayoutError(reason)
    for what, value in (("attention heads", model.num_heads), ("key/value heads", model.num_kv_heads),
                        ("FFN hidden size", model.ffn_hidden_size)):
        if value % cfg.tp:
            raise LayoutError(f"tp={cfg.tp} does not divide the {value} {what} of {model.name}")
    if cfg.pp > model.total_layers:
        raise LayoutError(f"pp={cfg.pp} is more pipeline stages than the {model.total_layers} layers of {model.name}")
    if model.position_embedding == "learned" and cfg.cache_len > model.max_position_embeddings:
        raise LayoutError(f"prompt + new tokens = {cfg.cache_len} exceed the {model.max_position_embeddings} learned "
                          f"positions of {model.name}")
    if cfg.swapped_layers > model.total_layers:
        raise LayoutError(f"--swapped-layers {cfg.swapped_layers} exceeds the {model.total_layers} layers of {model.name}")
    if cfg.offload == "layers" and cfg.swapped_layers and cfg.swapped_layers <= cfg.slots:
        raise LayoutError(f"{cfg.swapped_layers} swapped layers through {cfg.slots} slots would never swap: swap more "
                          f"layers than slots")


# ---------------------------------------------------------------- bytes


def int4_bytes(shape: tuple[int, int]) -> int:
    """Codes two per byte plus bf16 scale and zero per group of 128 (strategies/kernels/int4.py)."""
    out, inp = shape
    return out * ceil(inp / 2) + 4 * out * ceil(inp / INT4_GROUP)


def stored_bytes(tensor: ParamTensor, cfg: InferenceConfig, compute_bytes: int, tp: int = 1) -> int:
    shape = tensor.local_shape(tp)
    if cfg.quantised and tensor.block_projection is not None:
        if cfg.weights in ("int8", "w8a8"):
            return quantised_bytes(shape, "int8", compute_bytes)
        if cfg.weights == "int4":
            return int4_bytes(shape)
        return quantised_bytes(shape, "nf4", compute_bytes)
    numel = 1
    for size in shape:
        numel *= size
    return numel * compute_bytes


def unit_bytes(unit: Unit, cfg: InferenceConfig, compute_bytes: int, tp: int = 1) -> int:
    return sum(stored_bytes(t, cfg, compute_bytes, tp) for t in unit.tensors)


def kv_cache_bytes(model: ModelSpec, cfg: InferenceConfig, compute_bytes: int, kind: str = "decoder",
                   tp: int = 1) -> int:
    """One layer's cache: self-attention over prompt + new tokens (an encoder-decoder's decoder:
    over the new tokens, plus cross-attention k, v over the prompt); a block that does not
    generate (an encoder) keeps none."""
    if not layer_kind(model, kind).generates:
        return 0
    if model.mla:
        # multi-head latent attention caches what it expands keys and values from: the normed
        # kv_lora_rank latent and the rotary key, one "head" each, before kv_b (transformers 5.25
        # DeepseekV3Attention.forward: cache.update(kv_nope, k_rot) "while latent KV is still
        # compressed"); kv_a is not split by tensor parallelism, so neither is the cache
        if cfg.kv_cache == "int8":
            raise ConfigError("an int8 KV cache of multi-head latent attention is not modelled (use --kv-cache auto)")
        return cfg.batch * cfg.cache_len * (model.kv_lora_rank + model.qk_rope_head_dim) * compute_bytes
    entries = 2 * cfg.batch * (model.num_kv_heads // tp) * cfg.cache_len  # k and v rows of head_dim
    if cfg.kv_cache == "int8":
        return entries * model.head_dim + entries * compute_bytes
    return entries * model.head_dim * compute_bytes


# ---------------------------------------------------------------- the forward pass, allocation by allocation


class _ForwardWalk:
    """Live bytes of ``strategies/inference.forward``, op by op (names are the executor's)."""

    def __init__(self, base: int = 0):
        self.live: dict[str, int] = {}
        self.now = base
        self.peak = base

    def new(self, name: str, nbytes: int) -> None:
        if nbytes:
            self.live[name] = self.live.get(name, 0) + nbytes
            self.now += nbytes
            self.peak = max(self.peak, self.now)

    def free(self, *names: str) -> None:
        for name in names:
            self.now -= self.live.pop(name, 0)

    def transient(self, nbytes: int) -> None:
        """Allocated and freed at once (scratch inside one call)."""
        self.peak = max(self.peak, self.now + nbytes)


@dataclass(frozen=True)
class _Dims:
    tokens: int  # batch x tokens in this forward
    batch: int
    chunk: int
    length: int  # positions attended
    e: int  # compute dtype bytes


def _norm(walk: _ForwardWalk, rows: int, width: int, e: int, name: str, kind: str = "rmsnorm") -> None:
    """RMSNorm (strategies/kernels/norm.py), no grad: x.float() (a copy unless fp32), pow, rstd, the
    normalised fp32 product, its cast, times the weight. LayerNorm: ATen's native_layer_norm
    writes the output and an fp32 mean and rstd per row, which die at once."""
    n = rows * width
    if kind == "layernorm":
        walk.new(name, e * n)
        walk.transient(8 * rows)
        return
    if e != 4:
        walk.new("xf", 4 * n)
    walk.transient(4 * n + 4 * rows)  # xf.pow(2) then its mean
    walk.new("rstd", 4 * rows)
    walk.new("xn", 4 * n)
    if e != 4:
        walk.new("xn_cast", e * n)
        walk.free("xn")
    walk.new(name, e * n)
    walk.free("xf", "rstd", "xn", "xn_cast")


def _quantize_rows(walk: _ForwardWalk, rows: int, width: int, e: int) -> None:
    """strategies/kernels/int8.quantize_rows: absmax, scale, then round(t.float() / scale) to int8."""
    n = rows * width
    walk.transient(e * n + e * rows)  # abs, then amax
    walk.new("q_scale", 4 * rows)
    if e != 4:
        walk.new("q_float", 4 * n)
    walk.new("q_div", 4 * n)
    walk.free("q_float")
    walk.new("q_round", 4 * n)
    walk.free("q_div")
    walk.new("q_codes", n)
    walk.free("q_round")


def _projection_call(walk: _ForwardWalk, cfg: InferenceConfig, d: _Dims, out: int, inp: int, name: str) -> None:
    """One block projection [out, in] applied to ``d.tokens`` rows; leaves ``name`` live."""
    rows, e = d.tokens, d.e
    if not cfg.quantised:
        walk.new(name, rows * out * e)
        return
    if cfg.weights == "w8a8":
        _quantize_rows(walk, rows, inp, e)
        # strategies/kernels/int8.int8_matmul pads 16 rows or fewer for torch._int_mm
        padded = W8A8_MIN_ROWS if rows <= 16 and inp % 8 == 0 and out % 8 == 0 else rows
        if padded != rows:
            walk.new("padded", padded * inp)
        walk.new("int32", padded * out * 4)
        walk.free("padded")
        walk.new("y_float", rows * out * 4)
        walk.free("int32")
        walk.transient(rows * out * 4)  # times the activation scales, then the weight scales
        walk.new("y", rows * out * 4)
        walk.free("y_float")
        walk.new(name, rows * out * e)
        walk.free("y", "q_scale", "q_codes")
        return
    numel = out * inp
    if cfg.kernels == "dequant":
        if cfg.weights == "int8":
            walk.transient(out * e if e != 4 else 0)  # the row scales in the compute dtype
            walk.new("weight", numel * e)
        elif cfg.weights == "int4":
            walk.new("weight", numel * e)
            rows_per = min(out, max(1, INT4_CHUNK_ELEMENTS // inp))
            chunk = rows_per * inp
            # stacked codes, their cast and the scaled values; from the second chunk on, the
            # previous chunk's codes and values are alive until rebound
            walk.transient(chunk * (1 + 2 * e) if rows_per == out else chunk * (2 + 3 * e))
        else:
            blocks = ceil(numel / NF4_BLOCK)
            walk.new("nf4_table", 256 * 2 * e)
            walk.new("weight", blocks * NF4_BLOCK * e)
            walk.transient(NF4_CHUNK_CODES * 4)  # a chunk of codes as int32 indices
            # block_absmax: the second-level scales repeated per block, then two fp32 temporaries
            # of one value per block at a time (codes / 127, times the scales, plus the mean)
            groups = ceil(blocks / 256)
            walk.transient(groups * 256 * 4 + 2 * blocks * 4)
            walk.free("nf4_table")
    walk.new(name, rows * out * e)
    walk.free("weight")


def _head_norm(walk: _ForwardWalk, rows: int, width: int, e: int, name: str) -> None:
    """A per-head RMSNorm over ``name`` (``rows`` heads x tokens of ``width``): its output
    replaces its input."""
    _norm(walk, rows, width, e, "head_normed")
    walk.free(name)
    walk.live[name] = walk.live.pop("head_normed")


def _rope(walk: _ForwardWalk, nbytes: int, name: str) -> None:
    """apply_rope: x * cos, -x2 and the concatenation of rotate_half, times sin, the sum, which
    replaces ``name``."""
    _rope_new(walk, nbytes, "rope_out")
    walk.free(name)
    walk.live[name] = walk.live.pop("rope_out")


def _rope_new(walk: _ForwardWalk, nbytes: int, name: str) -> None:
    """apply_rope on a view (its input stays alive): leaves ``name`` live."""
    walk.new("x_cos", nbytes)
    walk.new("neg", nbytes // 2)
    walk.new("cat", nbytes)
    walk.free("neg")
    walk.new("cat_sin", nbytes)
    walk.free("cat")
    walk.new(name, nbytes)
    walk.free("x_cos", "cat_sin")


def _latent_attention(walk: _ForwardWalk, model: ModelSpec, cfg: InferenceConfig, d: _Dims) -> None:
    """strategies/inference._latent_attention: the queries; the compressed kv (latent and
    rotary key) normed and rotated into the cache; kv_b expanding every cached position's keys
    and values (its input, a strided slice of the cache, copied contiguous first); q and k
    concatenated from their no-rope and rotary parts, v padded to the q/k head dim; the
    kernel's output cut back to the value dim (a copy) for the output projection."""
    h, qk, rope, v_dim = model.hidden_size, model.head_dim, model.qk_rope_head_dim, model.v_head_dim
    heads, rank, rows, e = model.num_heads, model.kv_lora_rank, d.tokens, d.e
    cached = d.batch * d.length
    _norm(walk, rows, h, e, "n", model.norm)
    if model.q_lora_rank:
        _projection_call(walk, cfg, d, model.q_lora_rank, h, "q_a")
        _norm(walk, rows, model.q_lora_rank, e, "q_a_normed")
        walk.free("q_a")
        _projection_call(walk, cfg, d, heads * qk, model.q_lora_rank, "q")
        walk.free("q_a_normed")
    else:
        _projection_call(walk, cfg, d, heads * qk, h, "q")
    _projection_call(walk, cfg, d, rank + rope, h, "compressed")
    walk.free("n")
    _norm(walk, rows, rank, e, "latent")
    _rope_new(walk, rows * rope * e, "k_rot")
    walk.free("compressed", "latent", "k_rot")
    walk.new("latent_rows", cached * rank * e)  # the cache's strided latent, made contiguous for kv_b
    walk.new("kv", cached * heads * (qk - rope + v_dim) * e)
    walk.free("latent_rows")
    _rope_new(walk, rows * heads * rope * e, "q_rot")
    walk.new("q_full", rows * heads * qk * e)
    walk.free("q", "q_rot")
    walk.new("k", cached * heads * qk * e)
    walk.new("v", cached * heads * qk * e)
    walk.free("kv")
    masked = d.chunk > 1 and d.length > d.chunk
    if masked:
        walk.new("mask", d.chunk * d.length)
    walk.new("attn_out", rows * heads * qk * e)
    walk.transient(d.batch * heads * d.chunk * 4 + (d.chunk * d.length * e if masked else 0))
    walk.free("q_full", "k", "v", "mask")
    walk.new("attn_flat", rows * heads * v_dim * e)
    walk.free("attn_out")
    _projection_call(walk, cfg, d, h, heads * v_dim, "o")
    walk.free("attn_flat")


def _layer(walk: _ForwardWalk, model: ModelSpec, cfg: InferenceConfig, d: _Dims, tp: int, kind: str = "decoder") -> None:
    """One decoder block (strategies/inference._block); ``x`` is live before and after."""
    if model.mla:
        _latent_attention(walk, model, cfg, d)
        walk.new("h", d.tokens * model.hidden_size * d.e)
        walk.free("o")
        _mlp_half(walk, model, cfg, d, tp, kind)
        return
    h, hd = model.hidden_size, model.head_dim
    q_out, kv_out = model.num_heads // tp * hd, model.num_kv_heads // tp * hd
    rows, e = d.tokens, d.e
    _norm(walk, rows, h, e, "n", model.norm)
    _projection_call(walk, cfg, d, q_out, h, "q")
    if model.qk_norm:  # Qwen3's per-head RMSNorm on q and k, before RoPE
        _head_norm(walk, rows * q_out // hd, hd, e, "q")
    rope = model.position_embedding == "rope"
    if rope:
        _rope(walk, rows * q_out * e, "q")
    _projection_call(walk, cfg, d, kv_out, h, "k")
    if model.qk_norm:
        _head_norm(walk, rows * kv_out // hd, hd, e, "k")
    if rope:
        _rope(walk, rows * kv_out * e, "k")
    _projection_call(walk, cfg, d, kv_out, h, "v")
    walk.free("n")
    if cfg.kv_cache == "int8":
        for _ in ("k", "v"):
            _quantize_rows(walk, rows * model.num_kv_heads // tp, hd, e)
            walk.free("q_scale", "q_codes")
    walk.free("k", "v")
    heads, kv_heads = model.num_heads // tp, model.num_kv_heads // tp
    if cfg.kv_cache == "int8":  # the cache so far, dequantised for attention
        walk.new("keys", d.batch * kv_heads * d.length * hd * e)
        walk.new("values", d.batch * kv_heads * d.length * hd * e)
    masked = d.chunk > 1 and d.length > d.chunk
    if masked:
        walk.new("mask", d.chunk * d.length)
    walk.new("attn_out", rows * heads * hd * e)
    walk.transient(d.batch * heads * d.chunk * 4 + (d.chunk * d.length * e if masked else 0))  # lse, float mask
    walk.free("q", "keys", "values", "mask")
    if d.chunk > 1:  # [b, heads, c, d] transposed to [b, c, heads, d] and flattened: a copy
        walk.new("attn_flat", rows * heads * hd * e)
        walk.free("attn_out")
    _projection_call(walk, cfg, d, h, q_out, "o")
    walk.free("attn_out", "attn_flat")
    walk.new("h", rows * h * e)
    walk.free("o")
    _mlp_half(walk, model, cfg, d, tp, kind)


def _mlp_half(walk: _ForwardWalk, model: ModelSpec, cfg: InferenceConfig, d: _Dims, tp: int, kind: str) -> None:
    """The block's second half: its norm, MLP (or MoE block) and residual sum; ``h`` live before,
    ``x`` after."""
    h, rows, e = model.hidden_size, d.tokens, d.e
    f = model.ffn_hidden_size // tp
    _norm(walk, rows, h, e, "n2", model.norm)
    if layer_kind(model, kind).experts:  # the reference MoE block: its own forward's working set
        walk.transient(moe_forward_bytes(model, rows, e, model.moe_ffn_hidden_size, rows))
        walk.new("o", rows * h * e)
    elif model.mlp == "gelu":
        _projection_call(walk, cfg, d, f, h, "a")
        walk.new("g", rows * f * e)
        walk.free("a")
        _projection_call(walk, cfg, d, h, f, "o")
        walk.free("g")
    else:
        _projection_call(walk, cfg, d, f, h, "g")
        walk.new("s", rows * f * e)
        walk.free("g")
        _projection_call(walk, cfg, d, f, h, "u")
        walk.new("p", rows * f * e)
        walk.free("s", "u")
        _projection_call(walk, cfg, d, h, f, "o")
        walk.free("p")
    walk.free("n2")
    walk.new("x_next", rows * h * e)
    walk.free("o", "h", "x")
    walk.live["x"] = walk.live.pop("x_next")


def forward_peak(model: ModelSpec, cfg: InferenceConfig, e: int, batch: int, chunk: int, length: int,
                 layers: int, has_embedding: bool = True, has_head: bool = True, tp: int = 1,
                 keep_logits: bool = False, kinds: tuple[str, ...] = ("decoder",)) -> int:
    """Peak live bytes of one forward of ``chunk`` tokens per sequence attending to ``length``
    positions (beyond weights and cache)."""
    walk = _ForwardWalk()
    d = _Dims(batch * chunk, batch, chunk, length, e)
    h = model.hidden_size
    walk.new("x", d.tokens * h * e)
    if has_embedding and model.position_embedding == "learned":
        walk.new("pos", chunk * h * e + chunk * 8)  # positions [chunk] int64, their embeddings [chunk, h]
        walk.new("x_pos", d.tokens * h * e)
        walk.free("pos", "x")
        walk.live["x"] = walk.live.pop("x_pos")
    # every block leaves the same tensors alive that it found: each kind's first block's peak is theirs
    for kind in (dict.fromkeys(kinds) if layers else ()):
        _layer(walk, model, cfg, d, tp, kind)
    if has_head:
        _norm(walk, batch, h, e, "last", model.norm)
        walk.free("x")
        vocab = model.vocab_size // tp if tp > 1 else model.vocab_size
        walk.new("logits", batch * vocab * e)
        if keep_logits and e != 4:
            walk.new("first_logits", batch * vocab * 4)
    return walk.peak


# ---------------------------------------------------------------- offload


def swapped_layers(num_layers: int, count: int, encoder_layers: int = 0) -> list[int]:
    """Which layers live in host memory: spread evenly, so each load has the most compute before
    its turn to hide behind (the seed notes: 'choose the swapped layers far apart'). An
    encoder-decoder swaps its encoder first: the encoder runs once per prompt, the decoder once
    per token."""
    if count <= 0:
        return []
    if encoder_layers:
        decoder_count = max(0, count - encoder_layers)
        encoder = swapped_layers(encoder_layers, min(count, encoder_layers))
        decoder = swapped_layers(num_layers - encoder_layers, decoder_count)
        return encoder + [encoder_layers + i for i in decoder]
    return sorted({min(num_layers - 1, int((i + 0.5) * num_layers / count)) for i in range(count)})


def offload_pass_time(layer_s: list[float], swapped: list[bool], load_s: list[float], slots: int,
                      head_s: float = 0.0, passes: int = 6) -> float:
    """Steady-state time of one forward pass with layer offload, simulated event by event.

    Loads go over the host link one at a time, in execution order, wrapping into the next pass;
    a load needs a free slot (the layer that last used it has finished computing); a swapped layer
    computes once its load has arrived and the layer before it is done. The first ``slots`` loads
    are in place before the first pass (``LayerOffload`` prefetches them at set-up)."""
    order = [i for i, s in enumerate(swapped) if s]
    if not order:
        return sum(layer_s) + head_s
    link_free = 0.0
    slot_free = [0.0] * slots
    arrivals: list[float] = []
    load_index = 0

    def issue() -> None:
        nonlocal link_free, load_index
        slot = load_index % slots
        layer = order[load_index % len(order)]
        start = max(link_free, slot_free[slot]) if load_index >= slots else 0.0
        link_free = start + (load_s[layer] if load_index >= slots else 0.0)
        arrivals.append(link_free)
        load_index += 1

    for _ in range(slots):
        issue()
    clock, used = 0.0, 0
    starts = []
    for _ in range(passes):
        starts.append(clock)
        for i, seconds in enumerate(layer_s):
            if swapped[i]:
                clock = max(clock, arrivals[used]) + seconds
                slot_free[used % slots] = clock
                used += 1
                issue()
            else:
                clock += seconds
        clock += head_s
    starts.append(clock)
    return starts[-1] - starts[-2]


# ---------------------------------------------------------------- estimate


class InferenceMemory(BaseModel):
    weights: int
    kv_cache: int
    activations: int
    swap_buffers: int
    overhead: int
    peak: int
    prefill_activations: int
    decode_activations: int
    host_bytes: int = Field(description="pinned host memory of the swapped layers")
    all_weights: int = Field(description="every weight of the GPU's share as stored, resident or swapped")
    weights_16bit: int = Field(description="the same weights in 16 bits, for comparison")
    peak_without_offload: int


class OffloadPlan(BaseModel):
    resident_layers: int
    swapped_layers: int
    swapped: list[int]
    slots: int
    layer_load_s: float = Field(description="one swapped layer over the host link")
    host_link_gb_s: float = Field(description="achieved: nominal x host_link_efficiency")
    exposed_load_s_per_token: float = Field(description="decode step time the loads add")
    exposed_load_s_prefill: float


class InferenceTime(BaseModel):
    prefill_s: float
    time_to_first_token_s: float
    decode_step_s: float = Field(description="one new token for every sequence of the batch")
    decode_tokens_per_s: float = Field(description="generated tokens per second over the batch")
    decode_compute_s: float
    decode_memory_s: float
    decode_bound: str = Field(description="memory (HBM), compute, or host link (offload)")
    total_s: float = Field(description="prefill + all decode steps")
    hbm_efficiency: float
    compute_efficiency: float


class InferenceEstimate(BaseModel):
    model: str
    gpu: str
    config: InferenceConfig
    compute_dtype: str
    memory: InferenceMemory
    capacity_bytes: int
    limits: list[Limit] = Field(default_factory=list, description="every capacity checked: the GPU's memory, and "
                                "the node's host memory for the pinned copies of swapped layers")
    does_not_fit: list[str] = Field(default_factory=list, description="the limits that fail (empty when it fits)")
    fits: bool
    time: InferenceTime
    offload: OffloadPlan | None = None
    calibration: str
    notes: list[str] = []


@dataclass(frozen=True)
class _Stage:
    weights: int
    layer_bytes: list[int]
    expert_bytes: list[int]  # of each layer's bytes, its routed experts' (0 in a dense layer)
    layer_kinds: list[str]
    generates: list[bool]  # per layer: runs once per generated token (a decoder's; planner/params.py LayerKind)
    kv: int
    has_embedding: bool
    has_head: bool


def _stage(model: ModelSpec, cfg: InferenceConfig, e: int, index: int) -> _Stage:
    stage = pipeline_stages(model, cfg.pp)[index]
    layer_units = [u for u in stage.units if u.is_layer]
    layer_bytes = [unit_bytes(u, cfg, e, cfg.tp) for u in layer_units]
    expert_bytes = [sum(stored_bytes(t, cfg, e, cfg.tp) for t in u.tensors if t.role == "expert") for u in layer_units]
    weights = sum(layer_bytes) + sum(unit_bytes(u, cfg, e, cfg.tp) for u in stage.units if not u.is_layer)
    kv = sum(kv_cache_bytes(model, cfg, e, u.kind, cfg.tp) for u in layer_units)
    return _Stage(weights, layer_bytes, expert_bytes, [u.kind for u in layer_units],
                  [layer_kind(model, u.kind).generates for u in layer_units], kv, stage.has_embedding, stage.has_head)


def _overhead(cal_overheads: Overheads, cfg: InferenceConfig, allocated: int) -> int:
    """CUDA context, communicators and the allocator's cache: a flat fraction of the allocated
    peak (the training cache rule of planner/allocator.py is fitted to training steps, not to
    prefill and decode)."""
    communicators = cal_overheads.communicator_bytes * ((cfg.tp > 1) + (cfg.pp > 1))
    fraction = (cal_overheads.fragmentation if cal_overheads.fragmentation is not None
                else cal_overheads.inference_fragmentation)
    return cal_overheads.cuda_context_bytes + communicators + int(fraction * allocated)


def _activations(model: ModelSpec, cfg: InferenceConfig, e: int, stage: _Stage) -> tuple[int, int]:
    kinds = stage.layer_kinds
    layers = len(kinds)
    chunk = cfg.prefill_chunk or cfg.prompt_len
    prefill = 0
    for pos in sorted({0, max(0, (ceil(cfg.prompt_len / chunk) - 1) * chunk)}):  # the first and the last chunk
        c = min(chunk, cfg.prompt_len - pos)
        prefill = max(prefill, forward_peak(model, cfg, e, cfg.batch, c, pos + c, layers, stage.has_embedding,
                                            stage.has_head, cfg.tp, keep_logits=True, kinds=tuple(kinds)))
    decode_layers = sum(stage.generates)
    decoders = tuple(kind for kind, generates in zip(kinds, stage.generates) if generates)
    decode = forward_peak(model, cfg, e, cfg.batch, 1, cfg.cache_len - 1, decode_layers, stage.has_embedding,
                          stage.has_head, cfg.tp, kinds=decoders)
    return prefill, decode


# ---------------------------------------------------------------- estimate: the worst stage's memory


class _WorstStage(NamedTuple):
    """The pipeline stage whose weights, cache and forward peak are largest: it decides memory."""

    index: int
    stage: _Stage
    prefill_activations: int
    decode_activations: int

    @property
    def activations(self) -> int:
        return max(self.prefill_activations, self.decode_activations)


def _worst_stage(model: ModelSpec, cfg: InferenceConfig, e: int, stages: list[_Stage]) -> _WorstStage:
    worst, worst_peak = None, -1
    for i, stage in enumerate(stages):
        prefill_act, decode_act = _activations(model, cfg, e, stage)
        total = stage.weights + stage.kv + max(prefill_act, decode_act)
        if total > worst_peak:
            worst, worst_peak = _WorstStage(i, stage, prefill_act, decode_act), total
    return worst


class _Residency(NamedTuple):
    """Where the worst stage's weights live: on the GPU, in offload's device slots, in host memory."""

    weights: int  # resident on the GPU
    swap_buffers: int  # the slots swapped layers pass through
    host: int  # the swapped layers' pinned host copy
    swapped: list[bool]  # per layer of the stage: kept in host memory


def _residency(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, worst: _WorstStage, overheads: Overheads
               ) -> _Residency:
    """Layer offload: the swapped layers (``--swapped-layers``, or the fewest that fit, spread by
    ``swapped_layers``) leave device memory for ``slots`` buffers of the largest one; without
    offload every weight is resident."""
    stage = worst.stage
    swapped_flags = [False] * len(stage.layer_bytes)
    if cfg.offload != "layers":
        return _Residency(stage.weights, 0, 0, swapped_flags)
    n = len(stage.layer_bytes)
    encoders = sum(not generates for generates in stage.generates)  # swapped first: they run once per prompt

    def resident(count: int) -> tuple[int, int, int, list[int]]:
        ids = swapped_layers(n, count, encoders)
        swapped_bytes = sum(stage.layer_bytes[i] for i in ids)
        buffers = cfg.slots * max(stage.layer_bytes[i] for i in ids)
        return stage.weights - swapped_bytes, buffers, swapped_bytes, ids

    count = cfg.swapped_layers
    if not count:  # the fewest swapped layers that fit
        count = n
        for m in range(cfg.slots + 1, n + 1):
            w, buffers, _, _ = resident(m)
            allocated = w + buffers + stage.kv + worst.activations
            if allocated + _overhead(overheads, cfg, allocated) <= gpu.memory_bytes:
                count = m
                break
    if count <= cfg.slots:
        raise LayoutError(f"layer offload needs more than {cfg.slots} layers to swap; {model.name} has {n}")
    weights, swap_buffers, host, ids = resident(count)
    for i in ids:
        swapped_flags[i] = True
    return _Residency(weights, swap_buffers, host, swapped_flags)


def _inference_memory(model: ModelSpec, cfg: InferenceConfig, worst: _WorstStage, residency: _Residency,
                      overheads: Overheads) -> InferenceMemory:
    stage, activations = worst.stage, worst.activations
    allocated = residency.weights + stage.kv + activations + residency.swap_buffers
    overhead = _overhead(overheads, cfg, allocated)
    peak = allocated + overhead
    resident_all = stage.weights + stage.kv + activations
    sixteen = cfg.model_copy(update={"weights": "bf16", "dtype": "auto"})
    stage_units = pipeline_stages(model, cfg.pp)[worst.index].units
    return InferenceMemory(weights=residency.weights, kv_cache=stage.kv, activations=activations,
                           swap_buffers=residency.swap_buffers, overhead=overhead, peak=peak,
                           prefill_activations=worst.prefill_activations,
                           decode_activations=worst.decode_activations, host_bytes=residency.host,
                           all_weights=stage.weights,
                           weights_16bit=sum(unit_bytes(u, sixteen, 2, cfg.tp) for u in stage_units),
                           peak_without_offload=resident_all + _overhead(overheads, cfg, resident_all))


# ---------------------------------------------------------------- estimate: the time of prefill and decode


def _peak_for(gpu: GPUSpec, dtype: str) -> float:
    return gpu.peak_tflops.for_dtype(dtype) * 1e12


class _Rates(NamedTuple):
    hbm_efficiency: float  # decode_hbm_efficiency
    hbm: float  # achieved HBM bandwidth, bytes/s
    compute_efficiency: float
    flops_rate: float  # the matmul dtype's peak x compute efficiency


def _rates(gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration, dtype: str) -> _Rates:
    hbm_eff = cal.throughput.decode_hbm_efficiency
    hbm = gpu.hbm_bandwidth_gb_s * 1e9 * hbm_eff
    matmul_dtype = "int8" if cfg.weights == "w8a8" else dtype
    if matmul_dtype == "int8" and gpu.peak_tflops.int8 is None:
        raise ConfigError(f"{gpu.name} has no int8 math: W8A8 needs int8 GEMMs; use --weights int8 (weight-only)")
    compute_eff = cal.throughput.efficiency(gpu.name, "bf16" if matmul_dtype == "int8" else matmul_dtype)
    flops_rate = _peak_for(gpu, matmul_dtype) * compute_eff
    return _Rates(hbm_eff, hbm, compute_eff, flops_rate)


def _weight_traffic(cfg: InferenceConfig, e: int, stored: int, numel: int) -> int:
    """HBM bytes a matmul reads for its weight: the stored bytes once (fused kernels, W8A8)."""
    # weight-only kernels of the executor: read the codes, write the dequantised weight, read it
    unfused = cfg.quantised and cfg.weights != "w8a8" and cfg.kernels == "dequant"
    return stored + (2 * numel * e if unfused else 0)


class _LayerTimes(NamedTuple):
    prefill: list[float]  # every layer of every stage in execution order: the whole prompt, seconds
    decode: list[tuple[float, float]]  # every decoder layer: (compute, memory) seconds of one step


def _layer_times(model: ModelSpec, cfg: InferenceConfig, e: int, stages: list[_Stage], rates: _Rates,
                 chunks: int) -> _LayerTimes:
    """Roofline per layer (Williams et al. 2009): prefill's FLOPs over the compute rate or its
    weight reads (once per chunk) over HBM, whichever is longer; a decode step's FLOPs, and its
    weights plus the KV cache so far over HBM."""
    flops_rate, hbm = rates.flops_rate, rates.hbm
    layer_numel = {kind: layer_matmul_params(model, kind) // cfg.tp for kind, _ in layer_stack(model)}
    prefill_layer_s, decode_layer_s = [], []
    touched = experts_touched(model, cfg.batch)
    for stage in stages:
        for kind, nbytes, experts in zip(stage.layer_kinds, stage.layer_bytes, stage.expert_bytes):
            params = layer_numel[kind]
            traffic = _weight_traffic(cfg, e, nbytes, params)
            # a decode step reads the experts its batch's tokens chose, not all of them
            step_traffic = traffic - (experts - int(experts * touched / model.num_experts) if experts else 0)
            flops = 2 * params * cfg.batch * cfg.prompt_len + cfg.batch * _counted_attention(
                model, cfg.prompt_len, kind, True) / cfg.tp
            prefill_layer_s.append(max(flops / flops_rate, chunks * traffic / hbm))
            if layer_kind(model, kind).generates:
                kv_read = kv_cache_bytes(model, cfg, e, kind, cfg.tp) * (cfg.cache_len - 1) // cfg.cache_len
                if cfg.kv_cache == "int8":
                    kv_read += 2 * 2 * cfg.batch * (model.num_kv_heads // cfg.tp) * cfg.cache_len * model.head_dim * e
                step_flops = 2 * params * cfg.batch + 4 * cfg.batch * cfg.cache_len * model.num_heads // cfg.tp * \
                    model.head_dim * len(layer_kind(model, kind).attentions)
                if model.mla:
                    expand_flops, expand_bytes = _latent_expansion(model, cfg, e)
                    step_flops += expand_flops
                    kv_read += expand_bytes
                decode_layer_s.append((step_flops / flops_rate, (step_traffic + kv_read) / hbm))
    return _LayerTimes(prefill_layer_s, decode_layer_s)


def _latent_expansion(model: ModelSpec, cfg: InferenceConfig, e: int) -> tuple[int, int]:
    """What a decode step of latent attention served over its compressed cache adds per layer
    (strategies/inference._latent_attention, as transformers 5.25 serves it): kv_b expands every
    cached position's latent, not the new token's alone -- its FLOPs over the other cache_len - 1
    positions -- and the expanded keys and values cross HBM: kv_b's output written and read, the
    concatenated k and padded v [b, len, heads, qk] written and read by the kernel. (vLLM and
    SGLang absorb kv_b into the query and output instead: not modelled.)"""
    nope, v_dim, qk = model.head_dim - model.qk_rope_head_dim, model.v_head_dim, model.head_dim
    rows = cfg.batch * cfg.cache_len * model.num_heads
    flops = 2 * model.kv_lora_rank * model.num_heads * (nope + v_dim) * cfg.batch * (cfg.cache_len - 1)
    return flops, e * rows * (2 * (nope + v_dim) + 4 * qk)


def experts_touched(model: ModelSpec, tokens: int) -> float:
    """Distinct routed experts one MoE layer runs for ``tokens`` tokens each choosing top-k of E,
    expected under uniform routing: E x (1 - (1 - k/E)^tokens) -- a decode step of batch B reads
    that many experts' weights, not E (each expert is unchosen by a token with probability
    1 - k/E, independently across tokens)."""
    if not model.is_moe:
        return 0.0
    e, k = model.num_experts, model.experts_per_token
    return e * (1 - (1 - k / e) ** tokens)


class _HeadTimes(NamedTuple):
    """The output head (one position per sequence per chunk or step)."""

    params: int  # this GPU's share
    bytes: int
    decode_s: float
    prefill_s: float


def _head_times(model: ModelSpec, cfg: InferenceConfig, e: int, rates: _Rates, chunks: int) -> _HeadTimes:
    flops_rate, hbm = rates.flops_rate, rates.hbm
    head_params = head_matmul_params(model) // cfg.tp
    head_bytes = head_params * e
    head_s_decode = max(2 * head_params * cfg.batch / flops_rate, head_bytes / hbm)
    head_s_prefill = max(2 * head_params * cfg.batch * chunks / flops_rate, chunks * head_bytes / hbm)
    return _HeadTimes(head_params, head_bytes, head_s_decode, head_s_prefill)


def _communication(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration, e: int, chunk: int,
                   chunks: int) -> tuple[float, float]:
    """(decode step, prefill) seconds of tensor-parallel all-reduces and pipeline sends."""
    bandwidth = gpu.intra_node_bandwidth_gb_s * 1e9 * cal.throughput.collective_bandwidth_efficiency

    def all_reduce_s(nbytes: float) -> float:
        """A ring all-reduce inside the node; decode's few kilobytes are latency-bound (NCCL's LL protocol)."""
        return (cal.throughput.small_collective_base_latency_s + 2 * (cfg.tp - 1) *
                cal.throughput.small_collective_step_latency_s + 2 * (cfg.tp - 1) / cfg.tp * nbytes / bandwidth)

    decode_comm = prefill_comm = 0.0
    if cfg.tp > 1:  # two all-reduces of the layer's [tokens, hidden] output per layer (Megatron's f and g)
        decode_comm = model.total_layers * 2 * all_reduce_s(cfg.batch * model.hidden_size * e)
        prefill_comm = chunks * model.total_layers * 2 * all_reduce_s(cfg.batch * chunk * model.hidden_size * e)
    if cfg.pp > 1:  # one activation send between consecutive stages
        hop = cal.throughput.small_collective_base_latency_s
        decode_comm += (cfg.pp - 1) * (hop + cfg.batch * model.hidden_size * e / bandwidth)
        prefill_comm += chunks * (cfg.pp - 1) * (hop + cfg.batch * chunk * model.hidden_size * e / bandwidth)
    return decode_comm, prefill_comm


class _Phases(NamedTuple):
    """Prefill and one decode step over every stage (seconds), and the parts offload reschedules."""

    prefill_layers: list[float]
    decode_layers: list[float]  # each decoder layer's roofline time
    head: _HeadTimes
    chunks: int  # prefill forwards
    prefill: float
    decode_step: float
    decode_compute: float
    decode_memory: float
    bound: str


def _phases(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration, e: int, stages: list[_Stage],
            rates: _Rates) -> _Phases:
    """Every stage's layers add up for one token (no micro-batching), plus the head and the
    communication; decode is memory- or compute-bound by which sum is larger."""
    chunk = cfg.prefill_chunk or cfg.prompt_len
    chunks = ceil(cfg.prompt_len / chunk)
    layers = _layer_times(model, cfg, e, stages, rates, chunks)
    head = _head_times(model, cfg, e, rates, chunks)
    decode_comm, prefill_comm = _communication(model, gpu, cfg, cal, e, chunk, chunks)
    decode_compute = sum(c for c, _ in layers.decode) + 2 * head.params * cfg.batch / rates.flops_rate
    decode_memory = sum(m for _, m in layers.decode) + head.bytes / rates.hbm
    decode_layers = [max(c, m) for c, m in layers.decode]
    decode_step = sum(decode_layers) + head.decode_s + decode_comm
    prefill = sum(layers.prefill) + head.prefill_s + prefill_comm
    bound = "memory" if decode_memory >= decode_compute else "compute"
    return _Phases(layers.prefill, decode_layers, head, chunks, prefill, decode_step, decode_compute, decode_memory,
                   bound)


# ---------------------------------------------------------------- estimate: the offload schedule


def _offload_schedule(gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration, stage: _Stage, residency: _Residency,
                      phases: _Phases) -> tuple[_Phases, OffloadPlan]:
    """Prefill and decode with the swapped layers' loads that the scheduler cannot hide
    (``offload_pass_time``, one GPU: the stage is the model); host-link-bound when the loads
    add more than half of a decode step."""
    swapped_flags, chunks, head = residency.swapped, phases.chunks, phases.head
    link = gpu.host_link_bandwidth_gb_s * 1e9 * cal.throughput.host_link_efficiency
    load_s = [b / link for b in stage.layer_bytes]
    decoder_ids = [i for i, generates in enumerate(stage.generates) if generates]
    plain_decode = phases.decode_step
    decode_step = offload_pass_time(phases.decode_layers, [swapped_flags[i] for i in decoder_ids],
                                    [load_s[i] for i in decoder_ids], cfg.slots, head.decode_s)
    plain_prefill = phases.prefill
    prefill = offload_pass_time(phases.prefill_layers, swapped_flags, load_s, cfg.slots, head.prefill_s, passes=1) \
        if chunks == 1 else chunks * offload_pass_time([s / chunks for s in phases.prefill_layers], swapped_flags,
                                                        load_s, cfg.slots, head.prefill_s / chunks)
    bound = phases.bound
    if decode_step - plain_decode > 0.5 * decode_step:
        bound = "host link"
    ids = [i for i, s in enumerate(swapped_flags) if s]
    plan = OffloadPlan(
        resident_layers=len(swapped_flags) - len(ids), swapped_layers=len(ids), swapped=ids, slots=cfg.slots,
        layer_load_s=max(load_s[i] for i in ids), host_link_gb_s=link / 1e9,
        exposed_load_s_per_token=decode_step - plain_decode, exposed_load_s_prefill=max(0.0, prefill - plain_prefill))
    return phases._replace(prefill=prefill, decode_step=decode_step, bound=bound), plan


def _inference_time(gpu: GPUSpec, cfg: InferenceConfig, phases: _Phases, rates: _Rates) -> InferenceTime:
    prefill, decode_step = phases.prefill, phases.decode_step
    decode_tokens = cfg.new_tokens - 1
    time = InferenceTime(
        prefill_s=prefill, time_to_first_token_s=prefill, decode_step_s=decode_step,
        decode_tokens_per_s=cfg.batch / decode_step, decode_compute_s=phases.decode_compute,
        decode_memory_s=phases.decode_memory, decode_bound=phases.bound, total_s=prefill + decode_tokens * decode_step,
        hbm_efficiency=rates.hbm_efficiency, compute_efficiency=rates.compute_efficiency)
    if not all(math.isfinite(v) for v in (time.prefill_s, time.decode_step_s, time.total_s)):
        raise ConfigError(f"{gpu.name}: its bandwidths or peak throughput are too small for finite times")
    return time


# ---------------------------------------------------------------- estimate: the verdict and the notes


def _fit_verdict(gpu: GPUSpec, cfg: InferenceConfig, peak: int, host: int) -> tuple[list[Limit], list[str]]:
    """Every capacity checked (the GPU's memory, the node's host memory) and the ones that fail."""
    # the swapped layers' pinned host copies, one set per GPU of the node
    limits = memory_limits(gpu, peak, host * min(gpu.gpus_per_node, cfg.gpus))
    limits[0] = limits[0].model_copy(update={"available_bytes": gpu.memory_bytes})
    return limits, [limit.name for limit in limits if not limit.fits]


def _notes(model: ModelSpec, cfg: InferenceConfig) -> list[str]:
    notes: list[str] = list(model.unmodelled)
    if cfg.tp > 1:
        notes.append("tensor parallel: two all-reduces per layer per step (latency-bound when decoding)")
    if cfg.pp > 1:
        notes.append("pipeline: stages run one after another for each token (no micro-batching across requests)")
    if cfg.quantised and cfg.weights != "w8a8":
        notes.append("weight-only matmuls dequantise each weight to the compute dtype and drop it (trainplan's "
                     "executor)" if cfg.kernels == "dequant" else "weight-only matmuls by fused kernels: the stored "
                     "bytes are read once, no dequantised copy (--kernels dequant: trainplan's executor)")
    return notes


def estimate_inference(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration,
                       overheads: Overheads | None = None) -> InferenceEstimate:
    """Memory of the worst pipeline stage (weights as stored or swapped, KV cache, the forward's
    activation peak, offload's slots, overhead), the time of prefill and of each decode step
    over every stage, with layer offload's schedule, and the fit verdict against every limit."""
    check_inference(model, cfg)
    dtype = compute_dtype_name(cfg, gpu)
    e = DTYPE_BYTES[dtype]
    overheads = overheads or cal.overheads
    # the worst stage decides memory; every stage's time adds up for one token (no micro-batching)
    stages = [_stage(model, cfg, e, i) for i in range(cfg.pp)]
    worst = _worst_stage(model, cfg, e, stages)
    residency = _residency(model, gpu, cfg, worst, overheads)
    memory = _inference_memory(model, cfg, worst, residency, overheads)
    rates = _rates(gpu, cfg, cal, dtype)
    phases, offload_plan = _phases(model, gpu, cfg, cal, e, stages, rates), None
    if cfg.offload == "layers":
        phases, offload_plan = _offload_schedule(gpu, cfg, cal, worst.stage, residency, phases)
    time = _inference_time(gpu, cfg, phases, rates)
    limits, failing = _fit_verdict(gpu, cfg, memory.peak, residency.host)
    return InferenceEstimate(model=model.name, gpu=gpu.name, config=cfg, compute_dtype=dtype, memory=memory,
                             capacity_bytes=gpu.memory_bytes, limits=limits, does_not_fit=failing, fits=not failing,
                             time=time, offload=offload_plan, calibration=cal.label, notes=_notes(model, cfg))


# ---------------------------------------------------------------- search


class InferenceCandidate(BaseModel):
    tp: int
    pp: int
    fits: bool
    peak_bytes: int
    decode_tokens_per_s: float
    time_to_first_token_s: float
    max_batch: int = Field(description="the largest batch that fits at this prompt and new-token count (0: none)")
    max_context: int = Field(description="the longest prompt + new tokens that fits at this batch (0: none)")


class InferencePlan(BaseModel):
    model: str
    gpu: str
    gpus: int
    candidates: list[InferenceCandidate]
    recommended: InferenceEstimate | None
    reason: str
    advice: list[str] = []


def _fits(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration, overheads: Overheads | None) -> bool:
    try:
        return estimate_inference(model, gpu, cfg, cal, overheads).fits
    except LayoutError:
        return False


def _largest(fits, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with fits(n), for a monotone fits; lo - 1 when none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_batch(model, gpu, cfg, cal, overheads=None, limit: int = MAX_MICRO_BATCH) -> int:
    return _largest(lambda b: _fits(model, gpu, cfg.model_copy(update={"batch": b}), cal, overheads), 1, limit)


def max_context(model, gpu, cfg, cal, overheads=None) -> int:
    """The longest prompt (with ``new_tokens`` after it) that fits, as prompt + new tokens."""
    limit = MAX_SEQ_LEN - cfg.new_tokens
    if model.position_embedding == "learned":
        limit = min(limit, model.max_position_embeddings - cfg.new_tokens)
    if limit < 1:
        return 0

    def fits(prompt: int) -> bool:
        return _fits(model, gpu, cfg.model_copy(update={"prompt_len": prompt, "prefill_chunk": min(
            cfg.prefill_chunk, prompt)}), cal, overheads)
    best = _largest(fits, 1, limit)
    return best + cfg.new_tokens if best >= 1 else 0


def layouts(model: ModelSpec, gpus: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """(tp, pp) with tp x pp = gpus, tensor parallelism inside a node and dividing the heads."""
    found = []
    for tp in range(1, gpus + 1):
        if gpus % tp or tp > gpus_per_node:
            continue
        if model.num_heads % tp or model.num_kv_heads % tp or model.ffn_hidden_size % tp:
            continue
        if model.mla and tp > 1:  # latent attention is served on one GPU per stage (MLA_INFERENCE_RULES)
            continue
        pp = gpus // tp
        if pp <= model.total_layers:
            found.append((tp, pp))
    return found


def search_inference(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration,
                     gpus_per_node: int, overheads: Overheads | None = None) -> InferencePlan:
    """Every (tp, pp) layout of ``cfg.gpus``: memory, decode speed, the largest batch and context
    that fit; recommends the fastest decode that fits."""
    candidates, best, best_speed = [], None, -1.0
    for tp, pp in layouts(model, cfg.gpus, gpus_per_node):
        layout = cfg.model_copy(update={"tp": tp, "pp": pp})
        est = estimate_inference(model, gpu, layout, cal, overheads)
        candidates.append(InferenceCandidate(
            tp=tp, pp=pp, fits=est.fits, peak_bytes=est.memory.peak,
            decode_tokens_per_s=est.time.decode_tokens_per_s, time_to_first_token_s=est.time.time_to_first_token_s,
            max_batch=max_batch(model, gpu, layout, cal, overheads), max_context=max_context(model, gpu, layout, cal,
                                                                                             overheads)))
        if est.fits and est.time.decode_tokens_per_s > best_speed:
            best, best_speed = est, est.time.decode_tokens_per_s
    candidates.sort(key=lambda c: (not c.fits, -c.decode_tokens_per_s))
    if best is not None:
        reason = (f"tp={best.config.tp}, pp={best.config.pp}: the fastest decode that fits "
                  f"({best.time.decode_tokens_per_s:,.1f} tokens/s at batch {cfg.batch})")
        return InferencePlan(model=model.name, gpu=gpu.name, gpus=cfg.gpus, candidates=candidates, recommended=best,
                             reason=reason)
    return InferencePlan(model=model.name, gpu=gpu.name, gpus=cfg.gpus, candidates=candidates, recommended=None,
                         reason=f"no layout of {cfg.gpus} GPUs fits batch {cfg.batch} x {cfg.cache_len} positions",
                         advice=inference_advice(cfg, model))


def inference_advice(cfg: InferenceConfig, model: ModelSpec | None = None) -> list[str]:
    if model is not None and model.mla:  # quantised weights, int8 caches and offload are not modelled for it
        return ["more GPUs (pipeline stages)", "a smaller --batch or shorter --prompt-len / --new-tokens"]
    advice = []
    if cfg.weights in ("bf16", "fp16", "fp32"):
        advice.append("--weights int8 (half the 16-bit bytes) or int4 / nf4 (about a quarter)" if not (
            model is not None and model.is_moe) else "--weights int8 / int4 / nf4 for the attention and dense "
            "projections (the routed experts, most of the bytes, stay 16-bit in the reference inference)")
    if cfg.offload == "none" and cfg.gpus == 1:
        advice.append("--offload layers (keep some layers in host memory and swap them through 2 slots)")
    if cfg.kv_cache == "auto":
        advice.append("--kv-cache int8")
    advice.append("a smaller --batch or shorter --prompt-len / --new-tokens")
    return advice
