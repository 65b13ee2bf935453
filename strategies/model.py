"""The reference decoder, built from the planner's ``ModelSpec``.

Llama-style (RMSNorm, RoPE, GQA, SwiGLU) or GPT-2-style (LayerNorm, GELU, learned positions,
biases, tied head) -- whatever the spec says. Parameter names and shapes are exactly those of
``planner.params`` (a test compares them), so the planner's per-tensor sharding arithmetic
and a measured run talk about the same tensors.

The model is built on the meta device and materialised per rank after sharding
(``materialize``): a 7B layout never holds the full model on one rank. Initial values are a
function of the parameter's name and global index only, so every layout starts from the same
weights and, fed the same samples, must reach the same loss.

Saved-for-backward tensors are kept to what the planner's activation model counts
(``planner/activations.py``): a fused RMSNorm (input + fp32 rstd), q/k/v kept in
[batch, seq, heads, head_dim] memory so that SDPA's output is the output projection's input
without a copy, GQA through SDPA's ``enable_gqa`` (k, v at kv width), and the loss computed in
one expression so the 16-bit logits die before the fp32 log-softmax is written.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from planner.configs import ModelSpec
from planner.params import describe, layer_kind_at
from planner.capabilities import reference_model_refusal
from planner.errors import ConfigError
from strategies.kernels.attention import core_attention
from strategies.kernels.norm import RMSNorm

ROPE_THETA = 10000.0
INIT_STD = 0.02


def _norm(spec: ModelSpec, device, dtype) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden_size, device=device, dtype=dtype)
    return nn.LayerNorm(spec.hidden_size, device=device, dtype=dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos, sin: [seq, 1, head_dim] (constants, so the
    multiplications save nothing the size of x)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        qkv_bias = spec.linear_bias or spec.qkv_bias
        kw = dict(device=device, dtype=dtype)
        self.head_dim = d
        self.q = nn.Linear(h, spec.num_heads * d, bias=qkv_bias, **kw)
        self.k = nn.Linear(h, spec.num_kv_heads * d, bias=qkv_bias, **kw)
        self.v = nn.Linear(h, spec.num_kv_heads * d, bias=qkv_bias, **kw)
        self.o = nn.Linear(spec.num_heads * d, h, bias=spec.linear_bias, **kw)
        # Qwen3's and OLMo 2's per-head RMSNorm on q and k, before RoPE (one head_dim weight each,
        # shared by the heads: transformers/models/qwen3/modeling_qwen3.py Qwen3Attention)
        self.q_norm = RMSNorm(d, eps=1e-6, **kw) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, eps=1e-6, **kw) if spec.qk_norm else None
        self.rope = spec.position_embedding == "rope"
        self.dropout = spec.dropout
        self.kernel = "flash"  # or "eager"; set by ``strategies.checkpointing`` / the run config
        self.recompute_core = False  # Megatron's selective recompute of the core attention
        self.cp_mesh = None  # context parallel: the ring's mesh (strategies.context_parallel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        # [b, s, heads, d]: with the local head count under tensor parallelism
        q, k, v = self.q(x).view(b, s, -1, d), self.k(x).view(b, s, -1, d), self.v(x).view(b, s, -1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos[:s], sin[:s]), apply_rope(k, cos[:s], sin[:s])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if self.cp_mesh is not None:
            from strategies.context_parallel import ring_attention

            out = ring_attention(q, k, v, self.cp_mesh)
        elif self.recompute_core:
            out = checkpoint(core_attention, q, k, v, self.kernel, dropout, use_reentrant=False)
        else:
            out = core_attention(q, k, v, self.kernel, dropout)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 Sec. 2.1; as torchtitan's and
    transformers' DeepSeek-V3 attention): queries through a ``q_lora_rank`` bottleneck with its
    RMSNorm (or one projection), one down-projection ``kv_a`` to the ``kv_lora_rank`` latent and a
    shared rotary key, the normalised latent up-projected by ``kv_b`` to every head's key (no-rope
    part) and value. Each head's query and key are its no-rope part and its rotary part; the
    values are zero-padded to the query/key head dim for the fused kernel and the output cut
    back (transformers' flash-attention path, modeling_deepseek_v3.py). Plain RoPE on the
    rotary part (YaRN's scaling changes values, not what is saved)."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        h, heads, qk = spec.hidden_size, spec.num_heads, spec.head_dim
        self.rope_dim, self.v_dim, self.qk_dim = spec.qk_rope_head_dim, spec.v_head_dim, qk
        if spec.q_lora_rank:
            self.q_a = nn.Linear(h, spec.q_lora_rank, bias=False, **kw)
            self.q_a_norm = RMSNorm(spec.q_lora_rank, **kw)
            self.q_b = nn.Linear(spec.q_lora_rank, heads * qk, bias=False, **kw)
        else:
            self.q = nn.Linear(h, heads * qk, bias=False, **kw)
        self.kv_a = nn.Linear(h, spec.kv_lora_rank + self.rope_dim, bias=False, **kw)
        self.kv_a_norm = RMSNorm(spec.kv_lora_rank, **kw)
        self.kv_b = nn.Linear(spec.kv_lora_rank, heads * (qk - self.rope_dim + self.v_dim), bias=False, **kw)
        self.o = nn.Linear(heads * self.v_dim, h, bias=spec.linear_bias, **kw)
        self.kernel = "flash"
        self.recompute_core = False
        self.cp_mesh = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        nope, rope = self.qk_dim - self.rope_dim, self.rope_dim
        q = self.q_b(self.q_a_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q(x)
        q = q.view(b, s, -1, self.qk_dim)
        heads = q.shape[2]  # local under tensor parallelism
        q_nope, q_rot = q.split([nope, rope], dim=-1)
        latent, k_rot = self.kv_a(x).split([self.kv_a_norm.weight.shape[0], rope], dim=-1)
        k_rot = apply_rope(k_rot.unsqueeze(2), cos[:s], sin[:s])
        k_nope, v = self.kv_b(self.kv_a_norm(latent)).view(b, s, heads, nope + self.v_dim).split(
            [nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rot, cos[:s], sin[:s])), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, -1, heads, -1)), dim=-1)
        v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.kernel)
        return self.o(out[..., :self.v_dim].transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, device=None, dtype=None, ffn: int = 0):
        super().__init__()
        h, f, bias = spec.hidden_size, ffn or spec.ffn_hidden_size, spec.linear_bias
        kw = dict(device=device, dtype=dtype)
        self.kind = spec.mlp
        if spec.mlp == "gelu":
            self.fc1 = nn.Linear(h, f, bias=bias, **kw)
            self.fc2 = nn.Linear(f, h, bias=bias, **kw)
        else:
            self.gate = nn.Linear(h, f, bias=bias, **kw)
            self.up = nn.Linear(h, f, bias=bias, **kw)
            self.down = nn.Linear(f, h, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        act = F.silu if self.kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        return self.down(act(self.gate(x)) * self.up(x))


class _Stacked(nn.Module):
    """One projection of every routed expert: ``weight`` (experts, out, in), ``bias`` (experts, out)."""

    def __init__(self, experts: int, out_features: int, in_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(experts, out_features, device=device, dtype=dtype)) if bias else None

    def grouped(self, rows: torch.Tensor, offsets: torch.Tensor, expert_of_row: torch.Tensor | None) -> torch.Tensor:
        """Each expert's linear on its consecutive group of ``rows`` (groups end at ``offsets``):
        one grouped GEMM, as torchtitan's GroupedExperts runs them (torch.nn.functional.grouped_mm)."""
        weight = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight  # expert parallel
        out = F.grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
        if self.bias is None:
            return out
        bias = self.bias.to_local() if hasattr(self.bias, "to_local") else self.bias
        return out + bias[expert_of_row]


class MoE(nn.Module):
    """Token-choice top-k mixture of experts (Shazeer et al. 2017; Mixtral, Qwen-MoE, DeepSeekMoE
    as transformers builds them): an fp32 softmax router over the experts, each token's top
    ``experts_per_token`` weights renormalised to sum to one, tokens grouped by expert (a stable
    sort, as torchtitan's dispatcher permutes them) and every expert's gated MLP run on its group
    as grouped GEMMs, the outputs weighted and added back per token; shared experts (and
    Qwen2-MoE's sigmoid gate on them) run on every token. Parameter names and shapes are
    planner/params.py ``_moe``'s; what it saves is planner/activations.py ``_moe_terms``.

    With expert parallelism (``parallelize``: ``ep_group`` set, the stacked experts holding this
    rank's ``num_experts / ep`` of them) the grouped rows go to the rank owning their experts in
    one ``all_to_all_single`` and come back in another (torchtitan's AllToAllTokenDispatcher)."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        h, e, f, bias = spec.hidden_size, spec.num_experts, spec.moe_ffn_hidden_size, spec.linear_bias
        self.top_k, self.kind, self.num_experts = spec.experts_per_token, spec.mlp, e
        self.router = nn.Linear(h, e, bias=spec.router_bias, **kw)
        self.experts = nn.ModuleDict({"gate": _Stacked(e, f, h, bias, **kw), "up": _Stacked(e, f, h, bias, **kw),
                                      "down": _Stacked(e, h, f, bias, **kw)})
        self.shared = MLP(spec, device, dtype, spec.shared_expert_ffn_hidden_size) if (
            spec.shared_expert_ffn_hidden_size) else None
        self.shared_gate = nn.Linear(h, 1, bias=False, **kw) if spec.shared_expert_gate else None
        self.ep_group = None  # expert parallelism: the process group the experts are split over

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts' gated MLPs on ``rows`` grouped by expert (``counts`` rows each)."""
        offsets = counts.cumsum(0).to(torch.int32)
        expert_of_row = (torch.repeat_interleave(torch.arange(len(counts), device=rows.device), counts)
                         if self.experts["gate"].bias is not None else None)
        act = F.silu if self.kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        gate, up, down = self.experts["gate"], self.experts["up"], self.experts["down"]
        hidden = act(gate.grouped(rows, offsets, expert_of_row)) * up.grouped(rows, offsets, expert_of_row)
        return down.grouped(hidden, offsets, expert_of_row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(tokens).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(tokens.dtype)
        order = chosen.flatten().argsort(stable=True)
        token_of = order // self.top_k
        # rows per expert (a fixed shape: a simulated rank's fake tensors carry no values)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).index_add_(
            0, chosen.flatten(), torch.ones_like(chosen.flatten()))
        rows = tokens[token_of]
        if self.ep_group is None:
            routed = self._experts(rows, counts)
        else:
            from strategies.expert_parallel import dispatch_and_combine

            routed = dispatch_and_combine(rows, counts, self._experts, self.ep_group)
        routed = routed * weights.flatten()[order, None]
        out = torch.zeros_like(tokens).index_add(0, token_of, routed)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared
        return out.view(shape)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)) -- a mixture of experts
    where the model's layer is ``moe`` (planner/params.py layer_stack)."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None, experts: bool = False):
        super().__init__()
        self.attn_norm = _norm(spec, device, dtype)
        self.attn = LatentAttention(spec, device, dtype) if spec.mla else Attention(spec, device, dtype)
        self.mlp_norm = _norm(spec, device, dtype)
        self.mlp = MoE(spec, device, dtype) if experts else MLP(spec, device, dtype)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.dropout(self.attn(self.attn_norm(x), cos, sin))
        return h + self.dropout(self.mlp(self.mlp_norm(h)))


class Transformer(nn.Module):
    """A whole model, or one pipeline stage of it (``embed`` / ``head`` set to None)."""

    def __init__(self, spec: ModelSpec, device=None, dtype=None, max_seq_len: int = 0):
        super().__init__()
        if reason := reference_model_refusal(spec):
            raise ConfigError(reason)
        kw = dict(device=device, dtype=dtype)
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size, **kw)
        self.pos_embed = (nn.Embedding(spec.max_position_embeddings, spec.hidden_size, **kw)
                          if spec.position_embedding == "learned" else None)
        self.embed_norm = _norm(spec, device, dtype) if spec.embedding_norm else None
        self.embed_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        # A ModuleDict keeps the names "layers.<i>" when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(spec, device, dtype, layer_kind_at(spec, i) == "moe")
                                     for i in range(spec.num_layers)})
        self.final_norm = _norm(spec, device, dtype)
        self.head = (None if spec.tied_embeddings
                     else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, **kw))
        self.has_head = True  # False on pipeline stages before the last
        self.cp_shard = None  # context parallel: (rank, cp) -- which positions this rank's tokens are
        self.rope_length = max(spec.max_position_embeddings, max_seq_len)
        cos, sin = rope_tables(spec, device, self.rope_length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                teacher_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            h = self.embed(inputs)
            if self.pos_embed is not None:
                h = h + self.pos_embed(torch.arange(inputs.shape[1], device=inputs.device))
            if self.embed_norm is not None:
                h = self.embed_norm(h)
            h = self.embed_dropout(h)
        else:
            h = inputs
        # RoPE tables in the compute dtype, cast once per forward and shared by every layer
        # (q * cos then saves one small table, not a copy per layer).
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        cos, sin = self.rope_cos.to(dtype), self.rope_sin.to(dtype)
        if self.cp_shard is not None:  # this rank's positions: chunks r and 2cp - 1 - r of the sequence
            from strategies.context_parallel import load_balanced_shard

            rank, cp = self.cp_shard
            length = h.shape[1] * cp
            cos, sin = load_balanced_shard(cos[:length], 0, rank, cp), load_balanced_shard(sin[:length], 0, rank, cp)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if not self.has_head:
            return h
        h = self.final_norm(h)
        if targets is None:
            return self.logits(h)
        if teacher_logprobs is not None:  # the 16-bit logits die once cast, as below
            return distillation_loss(F.log_softmax(self.logits(h).float().flatten(0, 1), dim=-1), targets,
                                     teacher_logprobs)
        # One expression: the 16-bit logits are freed once cast, before log-softmax runs.
        return F.cross_entropy(self.logits(h).float().flatten(0, 1), targets.flatten(0, 1))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h) if self.head is not None else F.linear(h, self.embed.weight)


DISTILL_ALPHA = 0.5  # weight of the hard-label loss; the teacher's term gets 1 - alpha


def distillation_loss(logprobs: torch.Tensor, targets: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Knowledge distillation at temperature 1 (Hinton et al. 2015; the seed notes, 002):
    alpha * cross-entropy with the labels + (1 - alpha) * KL(teacher || student) per token, both
    from the student's fp32 log-probabilities [tokens, vocab]."""
    hard = F.nll_loss(logprobs, targets.flatten(0, 1))
    soft = F.kl_div(logprobs, teacher_logprobs.flatten(0, 1), reduction="batchmean", log_target=True)
    return DISTILL_ALPHA * hard + (1 - DISTILL_ALPHA) * soft


def rope_tables(spec: ModelSpec, device=None, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d = spec.qk_rope_head_dim or spec.head_dim  # latent attention rotates only the rotary part
    length = length or spec.max_position_embeddings
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(length, 1, d, device="meta"), torch.empty(length, 1, d, device="meta")
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def build_model(spec: ModelSpec, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
                max_seq_len: int = 0) -> Transformer:
    return Transformer(spec, device=device, dtype=dtype, max_seq_len=max_seq_len)


# ---------------------------------------------------------------- deterministic initialisation


def _init_value(name: str, shape: torch.Size, dtype: torch.dtype, device, num_layers: int, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of a parameter: a function of its name only."""
    role, sublayer, projection, bias = describe(name)  # the planner's inventory names the roles
    if bias or role == "lora_b":  # LoRA's B starts at zero (Hu et al. 2021)
        return torch.zeros(shape, dtype=dtype, device=device)
    if role == "norm":
        return torch.ones(shape, dtype=dtype, device=device)
    std = INIT_STD
    if role == "projection" and (sublayer, projection) in (("attn", "o"), ("mlp", "down"), ("mlp", "fc2")):
        std = INIT_STD / math.sqrt(2 * num_layers)  # GPT-2's residual-projection scaling
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    value = torch.empty(shape, dtype=torch.float32, device=device)
    value.normal_(0.0, std, generator=generator)
    return value.to(dtype)


def _local_slices(param: torch.Tensor) -> tuple[slice, ...] | None:
    """Where a DTensor's local shard sits in the global tensor (None for a plain tensor)."""
    if not hasattr(param, "device_mesh"):
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with unset_fake_temporarily():  # the mesh's coordinates are real, also on a simulated rank
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def materialize(model: nn.Module, device: str | torch.device, seed: int = 0,
                buffer_device: str | torch.device | None = None) -> nn.Module:
    """Allocate a meta-built (and possibly sharded) model on ``device`` and fill each local
    shard with its slice of the layout-independent initial value. One full tensor exists at a
    time, transiently. ``buffer_device``: where the RoPE tables live when the parameters are
    offloaded to the host."""
    spec = _find_spec(model)
    model.to_empty(device=device)
    # A simulated rank (fake tensors) initialises too: no values, but the same transient full
    # tensors, which leave their blocks in a GPU's caching allocator (profiler.alloc_trace).
    for name, param in model.named_parameters():
        canonical = canonical_name(name)
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.numel() == 0:
            continue
        full = _init_value(canonical, param.shape, param.dtype, local.device, spec.num_layers, seed)
        slices = _local_slices(param)
        local.copy_(full[slices] if slices is not None else full)
    for module in model.modules():
        if isinstance(module, Transformer):
            cos, sin = rope_tables(module.spec, buffer_device or device, module.rope_length)
            module.rope_cos, module.rope_sin = cos, sin
    return model


def canonical_name(name: str) -> str:
    """The planner's name of a parameter: without wrapper prefixes (DDP's ``module.``,
    checkpoint wrappers, torch.compile's ``_orig_mod.``)."""
    wrappers = {"module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}
    return ".".join(part for part in name.split(".") if part not in wrappers)


def _find_spec(model: nn.Module) -> ModelSpec:
    for module in model.modules():
        if isinstance(module, Transformer):
            return module.spec
    raise ConfigError("materialize() needs a model built by strategies.model.build_model")
