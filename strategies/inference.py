"""Inference on the reference model: quantised weights, a static KV cache, greedy generation, and
BMInf's layer offload (``run --mode inference``).

Weights (``planner/inference.py`` counts the same bytes): every block projection stored as
``InferenceConfig.weights`` says -- 16-bit or fp32 as is; INT8 per output row (weight-only, the
seed notes' absmax scheme: ``strategies/kernels/int8.py``; W8A8: int8 x int8 GEMM with per-token
activation scales); INT4 group-wise (``strategies/kernels/int4.py``); NF4
(``strategies/kernels/nf4.py``) -- while the embedding, the norms and the head stay in the compute
dtype (LLM.int8() keeps the head in 16-bit too). A quantised weight-only projection dequantises its
weight to the compute dtype for each matmul and drops it: one weight at a time.

The KV cache is allocated once for prompt + new tokens (Hugging Face's ``StaticCache``, vLLM's
preallocated blocks): [batch, kv_heads, length, head_dim] per layer for k and v, in the compute
dtype or as int8 with one absmax scale per token and head (KIVI-style per-token quantisation,
Liu et al. 2024, without its per-channel keys). Prefill runs the prompt in chunks of
``prefill_chunk`` tokens (0: at once), each attending to the cache so far; decoding feeds one token
per sequence and keeps only the last position's logits (``logits_to_keep=1`` in transformers).

Layer offload (``offload="layers"``; the seed notes' BMInf scheduler): the layers the planner
chooses (``planner.inference.swapped_layers``: evenly spaced) live in host memory -- pinned on CUDA
-- and run from ``slots`` device buffers shaped like one layer. Before a swapped layer computes, its
slot must hold it; when it is done, that slot starts loading the next swapped layer in execution
order, wrapping into the next forward pass, so every load overlaps the compute of the layers
before its turn. On CUDA the copies run on a side stream ordered by events (a load waits for the
slot's previous layer to finish; a layer waits for its load); on a CPU the same scheduler makes
plain copies, so tests check its logic.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from planner.configs import ModelSpec
from planner.errors import ConfigError
from planner.finetune import PROJECTIONS
from planner.inference import InferenceConfig, compute_dtype_name, swapped_layers
from strategies.kernels.int8 import W8A8Linear, quantize_rows
from strategies.lora import FrozenProjection
from strategies.model import Block, Transformer, apply_rope, build_model, materialize

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _projections(model: Transformer):
    for block in model.layers.values():
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in PROJECTIONS:
                    yield parent, name, child


def build_inference_model(spec: ModelSpec, cfg: InferenceConfig, device: torch.device | str = "cpu",
                          seed: int = 0, fake=None) -> Transformer:
    """The reference model with its weights as ``cfg.weights`` stores them, in host memory
    (``device``): materialised in fp32 (the layout-independent initial values of
    ``strategies.model``), each projection quantised from those, the rest cast to the compute dtype.
    ``fake``: a FakeTensorMode to materialise under (built on the meta device outside it)."""
    model = build_model(spec, "meta", torch.float32, max_seq_len=cfg.cache_len)
    with fake if fake is not None else nullcontext():
        return _quantised(materialize(model, device, seed), cfg)


def _quantised(model: Transformer, cfg: InferenceConfig) -> Transformer:
    dtype = TORCH_DTYPES[compute_dtype_name(cfg)]
    model.eval()
    quantised = cfg.weights not in TORCH_DTYPES
    for parent, name, child in list(_projections(model)):
        if cfg.weights == "w8a8":
            setattr(parent, name, W8A8Linear(child))
        elif quantised:
            frozen = FrozenProjection(child, allow_bias=True)
            frozen.quantize(cfg.weights)
            setattr(parent, name, frozen)
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and not _is_quantisation_piece(module, pname):
                setattr(module, pname, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _is_quantisation_piece(module: nn.Module, name: str) -> bool:
    """Scales of a quantised weight keep the dtype their kernel stores them in."""
    return isinstance(module, FrozenProjection) and name not in ("weight", "bias")


# ---------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Per layer k and v [batch, kv_heads, length, head_dim]; int8 codes with per-token, per-head
    scales [batch, kv_heads, length, 1] in the compute dtype when ``quantised``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    k_scale: list[torch.Tensor] = field(default_factory=list)
    v_scale: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def allocate(cls, spec: ModelSpec, cfg: InferenceConfig, device) -> KVCache:
        dtype = TORCH_DTYPES[compute_dtype_name(cfg)]
        shape = (cfg.batch, spec.num_kv_heads, cfg.cache_len, spec.head_dim)
        layers = spec.num_layers
        if spec.mla:
            # latent attention caches what it expands keys and values from, as one "head": the
            # normed latent and the rotated key (transformers 5.25 DeepseekV3Attention); no v
            latent = (cfg.batch, 1, cfg.cache_len, spec.kv_lora_rank + spec.qk_rope_head_dim)
            return cls([torch.zeros(latent, dtype=dtype, device=device) for _ in range(layers)],
                       [torch.zeros(0, dtype=dtype, device=device) for _ in range(layers)])
        if cfg.kv_cache == "int8":
            scale_shape = shape[:-1] + (1,)
            return cls([torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(layers)],
                       [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(layers)],
                       [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(layers)],
                       [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in range(layers)])
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])

    @property
    def quantised(self) -> bool:
        return bool(self.k_scale)

    def tensors(self) -> list[torch.Tensor]:
        return self.k + self.v + self.k_scale + self.v_scale

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [batch, tokens, kv_heads, head_dim] for positions pos, pos + 1, ..."""
        stop = pos + k.shape[1]
        if not self.quantised:
            self.k[layer][:, :, pos:stop] = k.transpose(1, 2)
            self.v[layer][:, :, pos:stop] = v.transpose(1, 2)
            return
        for new, codes, scales in ((k, self.k[layer], self.k_scale[layer]), (v, self.v[layer], self.v_scale[layer])):
            q, scale = quantize_rows(new)
            codes[:, :, pos:stop] = q.transpose(1, 2)
            scales[:, :, pos:stop, 0] = scale.transpose(1, 2)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quantised:
            return self.k[layer][:, :, :length], self.v[layer][:, :, :length]
        k = self.k[layer][:, :, :length] * self.k_scale[layer][:, :, :length]
        v = self.v[layer][:, :, :length] * self.v_scale[layer][:, :, :length]
        return k, v


# ---------------------------------------------------------------- layer offload


class LayerOffload:
    """BMInf's scheduler: swapped layers in host memory, ``slots`` device buffers, loads issued in
    execution order as slots free up (see the module docstring)."""

    def __init__(self, model: Transformer, swapped: list[int], slots: int, device: torch.device):
        if len(swapped) <= slots:
            raise ConfigError(f"{len(swapped)} swapped layers need more than {slots} slots to be worth swapping")
        self.order = list(swapped)
        self.device = device
        cuda = device.type == "cuda"
        self.host: dict[int, list[torch.Tensor]] = {}
        for index in swapped:
            layer = model.layers[str(index)]
            tensors = _layer_tensors(layer)
            self.host[index] = [t.pin_memory() if cuda else t for t in tensors]
        template = model.layers[str(swapped[0])]
        self.slots = [_to(copy.deepcopy(template), device) for _ in range(slots)]
        self.slot_tensors = [_layer_tensors(slot) for slot in self.slots]
        for index in swapped:  # the model keeps no weights of its own for a swapped layer
            model.layers[str(index)] = _Placeholder(index)
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.loaded = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.freed = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.slot_of: dict[int, int] = {}
        self.next = 0
        self.loads = 0
        for slot in range(slots):
            self._load(slot)

    def _load(self, slot: int) -> None:
        index = self.order[self.next]
        self.next = (self.next + 1) % len(self.order)
        for stale in [k for k, v in self.slot_of.items() if v == slot]:
            del self.slot_of[stale]
        self.slot_of[index] = slot
        self.loads += 1
        targets, sources = self.slot_tensors[slot], self.host[index]
        if self.stream is None:
            for target, source in zip(targets, sources):
                target.copy_(source)
            return
        self.stream.wait_event(self.freed[slot])  # the slot's previous layer has finished computing
        with torch.cuda.stream(self.stream):
            for target, source in zip(targets, sources):
                target.copy_(source, non_blocking=True)
            self.loaded[slot].record(self.stream)

    def acquire(self, index: int) -> Block:
        slot = self.slot_of[index]
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[slot])
        return self.slots[slot]

    def release(self, index: int) -> None:
        slot = self.slot_of[index]
        if self.stream is not None:
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        self._load(slot)

    def nbytes(self) -> tuple[int, int]:
        """(device bytes of the slots, host bytes of the swapped layers)."""
        device = sum(t.numel() * t.element_size() for tensors in self.slot_tensors for t in tensors)
        host = sum(t.numel() * t.element_size() for tensors in self.host.values() for t in tensors)
        return device, host


class _Placeholder(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index


def _layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in sorted(list(layer.named_parameters()) + list(layer.named_buffers()))]


def place(model: Transformer, cfg: InferenceConfig, spec: ModelSpec, device: torch.device) -> LayerOffload | None:
    """Move the resident weights to ``device``; with layer offload, set up the scheduler for the
    planner's choice of swapped layers (``cfg.swapped_layers`` of them)."""
    offload = None
    if cfg.offload == "layers":
        offload = LayerOffload(model, swapped_layers(spec.num_layers, cfg.swapped_layers), cfg.slots, device)
    for module in model.children():
        if module is not model.layers:
            _to(module, device)
    for name, layer in model.layers.items():
        if not isinstance(layer, _Placeholder):
            _to(layer, device)
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    return offload


def _to(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)`` unless it is there already (a no-op ``to`` cannot swap fake parameters)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.device != device for t in tensors):
        module.to(device)
    return module


# ---------------------------------------------------------------- generation


def _attention(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
               pos: int) -> torch.Tensor:
    attn = block.attn
    b, c, _ = x.shape
    d = attn.head_dim
    n = block.attn_norm(x)
    q = attn.q(n).view(b, c, -1, d)
    q = attn.q_norm(q) if attn.q_norm is not None else q
    q = apply_rope(q, cos, sin) if attn.rope else q
    k = attn.k(n).view(b, c, -1, d)
    k = attn.k_norm(k) if attn.k_norm is not None else k
    k = apply_rope(k, cos, sin) if attn.rope else k
    v = attn.v(n).view(b, c, -1, d)
    del n
    cache.write(layer, pos, k, v)
    del k, v
    length = pos + c
    keys, values = cache.read(layer, length)
    # causal within the chunk; the cache before it is all visible
    mask = None if c == 1 or pos == 0 else torch.ones(c, length, dtype=torch.bool, device=x.device).tril(pos)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                         is_causal=pos == 0 and c > 1, enable_gqa=True)
    del q, keys, values, mask
    return attn.o(out.transpose(1, 2).reshape(b, c, -1))


def _latent_attention(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                      layer: int, pos: int) -> torch.Tensor:
    """Multi-head latent attention over a compressed cache, as transformers 5.25 serves
    DeepSeek-V3 (DeepseekV3Attention.forward): the normed latent and the rotated key are written
    to the cache, then every cached position's keys and values are expanded by kv_b for this
    chunk's attention (no weight absorption); v padded to the q/k head dim as in training."""
    attn = block.attn
    b, c, _ = x.shape
    qk, rope, v_dim = attn.qk_dim, attn.rope_dim, attn.v_dim
    nope, rank = qk - rope, attn.kv_a_norm.weight.shape[0]
    n = block.attn_norm(x)
    q = attn.q_b(attn.q_a_norm(attn.q_a(n))) if hasattr(attn, "q_a") else attn.q(n)
    compressed = attn.kv_a(n)
    del n
    latent, k_rot = compressed.split([rank, rope], dim=-1)
    latent = attn.kv_a_norm(latent)
    k_rot = apply_rope(k_rot.unsqueeze(2), cos, sin)
    stop = pos + c
    cache.k[layer][:, 0, pos:stop, :rank] = latent
    cache.k[layer][:, 0, pos:stop, rank:] = k_rot[:, :, 0]
    del compressed, latent, k_rot
    cached = cache.k[layer][:, 0, :stop]
    heads = q.shape[-1] // qk
    k_nope, v = attn.kv_b(cached[..., :rank]).view(b, stop, heads, nope + v_dim).split([nope, v_dim], dim=-1)
    q_nope, q_rot = q.view(b, c, heads, qk).split([nope, rope], dim=-1)
    q = torch.cat((q_nope, apply_rope(q_rot, cos, sin)), dim=-1)
    del q_nope, q_rot
    k = torch.cat((k_nope, cached[..., rank:].unsqueeze(2).expand(-1, -1, heads, -1)), dim=-1)
    v = F.pad(v, (0, qk - v_dim))
    del k_nope, cached
    mask = None if c == 1 or pos == 0 else torch.ones(c, stop, dtype=torch.bool, device=x.device).tril(pos)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=pos == 0 and c > 1)
    del q, k, v, mask
    return attn.o(out[..., :v_dim].transpose(1, 2).reshape(b, c, -1))


def _block(block: Block, x: torch.Tensor, cos, sin, cache: KVCache, layer: int, pos: int) -> torch.Tensor:
    attention = _latent_attention if hasattr(block.attn, "kv_a") else _attention
    h = x + attention(block, x, cos, sin, cache, layer, pos)
    return h + block.mlp(block.mlp_norm(h))


@torch.no_grad()
def forward(model: Transformer, tokens: torch.Tensor, pos: int, cache: KVCache, tables,
            offload: LayerOffload | None = None) -> torch.Tensor:
    """Logits [batch, vocab] of the last position, after writing the tokens' keys and values at
    positions pos, pos + 1, ... of the cache."""
    c = tokens.shape[1]
    cos, sin = tables[0][pos:pos + c], tables[1][pos:pos + c]
    x = model.embed(tokens)
    if model.pos_embed is not None:
        x = x + model.pos_embed(torch.arange(pos, pos + c, device=tokens.device))
    for name, layer in model.layers.items():
        index = int(name)
        if isinstance(layer, _Placeholder):
            x = _block(offload.acquire(index), x, cos, sin, cache, index, pos)
            offload.release(index)
        else:
            x = _block(layer, x, cos, sin, cache, index, pos)
    last = model.final_norm(x[:, -1])
    del x
    return model.logits(last)


@dataclass
class Generation:
    tokens: torch.Tensor  # [batch, new_tokens]
    first_logits: torch.Tensor  # [batch, vocab]: the prompt's last position
    prefill_s: float
    decode_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, cfg: InferenceConfig, cache: KVCache,
             offload: LayerOffload | None = None, on_phase=None) -> Generation:
    """Greedy decoding of ``cfg.new_tokens`` tokens after ``prompt`` [batch, prompt_len].
    ``on_phase(name)`` is called as prefill and decoding start (memory trackers restart there)."""
    device = prompt.device
    dtype = TORCH_DTYPES[compute_dtype_name(cfg)]
    tables = (model.rope_cos.to(dtype), model.rope_sin.to(dtype))
    chunk = cfg.prefill_chunk or prompt.shape[1]
    if on_phase:
        on_phase("prefill")
    _sync(device)
    start = time.perf_counter()
    logits = None
    for pos in range(0, prompt.shape[1], chunk):
        logits = None  # the previous chunk's logits die before the next forward
        logits = forward(model, prompt[:, pos:pos + chunk], pos, cache, tables, offload)
    first_logits = logits.float()
    token = logits.argmax(dim=-1)
    del logits
    _sync(device)
    prefill_s = time.perf_counter() - start
    if on_phase:
        on_phase("decode")
    out = [token]
    pos = prompt.shape[1]
    start = time.perf_counter()
    for _ in range(cfg.new_tokens - 1):
        logits = forward(model, token[:, None], pos, cache, tables, offload)
        token = logits.argmax(dim=-1)
        del logits
        out.append(token)
        pos += 1
    _sync(device)
    return Generation(torch.stack(out, dim=1), first_logits, prefill_s, time.perf_counter() - start)
