"""The shared vocabulary: frozen, validated descriptions of a model, a GPU, a cluster and a run.

Everything downstream (the planner's arithmetic, the strategy layer's real execution, the
profiler's measurements) reads these objects, so a 7B plan and a 7B run are built from the
very same ``ModelSpec``. Sizes are plain integers (elements, bytes); bandwidths are decimal
GB/s per direction; peak throughput is dense (no 2:4 sparsity) TFLOP/s or TOPS.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.capabilities import architecture_refusal, layout_refusal, model_refusal
from planner.errors import ConfigError, LayoutError

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-mixed-fp32-grads", "amp-bf16", "bf16", "fp8-tensorwise",
                    "fp8-rowwise", "fp8-delayed", "fp8-current", "fp8-blockwise", "mxfp8"]
Offload = Literal["none", "optimizer", "params"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
OptimizerImpl = Literal["fused", "foreach", "for-loop"]
MomentDtype = Literal["fp32", "bf16", "fp16", "fp8"]
Attention = Literal["flash", "eager"]
Schedule = Literal["gpipe", "1f1b", "interleaved"]
Engine = Literal["pytorch", "megatron", "deepspeed"]
Impl = Literal["trainplan", "hf", "torchtitan", "torchtitan-cpu", "megatron"]
IMPL_HELP = ("whose model code runs the layers: trainplan (the reference model, fused norms), hf (Hugging Face "
             "transformers), torchtitan (on CUDA; torchtitan-cpu: as it runs on a CPU), megatron (Megatron-Core with Transformer Engine); what a layer saves "
             "depends on it (planner/implementations.py)")

Finetune = Literal["full", "lora", "qlora"]
BasePrecision = Literal["auto", "bf16", "int8", "nf4"]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
FINETUNE_HELP = ("full: every parameter trains; lora: a frozen base with trainable low-rank adapters (Hu et al. "
                 "2021); qlora: lora over a 4-bit NF4 base (Dettmers et al. 2023)")

STRATEGIES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
"""CLI strategy names and the ZeRO stage each one is."""


# Sizes beyond these are refused up front: they are larger than anything trained today by a
# wide margin, and they keep every loop of the planner bounded (README: "Limits").
MAX_GPUS = 2**20
MAX_GPUS_PER_NODE = 1024
MAX_LAYERS = 10_000
MAX_HIDDEN = 2**20
MAX_HEADS = 2**16
MAX_FFN = 2**22
MAX_VOCAB = 2**24
MAX_EXPERTS = 2**16
MAX_POSITIONS = 2**24
MAX_SEQ_LEN = 2**24
MAX_MICRO_BATCH = 2**16
MAX_GLOBAL_BATCH = 2**30
MAX_DEVICE_BYTES = 2**50
MAX_HOST_BYTES = 2**60
MAX_TFLOPS = 10**6
MAX_BANDWIDTH_GB_S = 10**6
MIN_BANDWIDTH_GB_S = 1e-3  # 1 MB/s: below it step times overflow to infinity
MIN_TFLOPS = 1e-6  # 1 MFLOP/s


CHECKPOINTING_HELP = ("none, selective (Megatron's core-attention recompute), full, op (torchtitan's op-level "
                      "selective checkpointing) or layer:N (every N-th block fully checkpointed)")


def parse_checkpointing(value: str) -> tuple[str, int]:
    """``(policy, every)`` of an activation checkpointing setting: ``"layer:2"`` is ("layer", 2),
    the others (policy, 1). Raises ConfigError for anything else."""
    if value in ("none", "selective", "full", "op"):
        return value, 1
    policy, _, every = value.partition(":")
    if policy == "layer" and every.isdigit() and every == str(int(every)) and 1 <= int(every) <= MAX_LAYERS:
        return "layer", int(every)
    raise ConfigError(f"activation checkpointing {value!r} is none of {CHECKPOINTING_HELP}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelSpec(_Frozen):
    """A decoder-only (or T5-style encoder-decoder) transformer, as the planner and the
    reference model in ``strategies/model.py`` both understand it."""

    name: str
    num_layers: int = Field(gt=0, le=MAX_LAYERS, description="decoder layers")
    hidden_size: int = Field(gt=0, le=MAX_HIDDEN)
    num_heads: int = Field(gt=0, le=MAX_HEADS)
    num_kv_heads: int = Field(default=0, ge=0, le=MAX_HEADS, description="0 means = num_heads (no GQA)")
    head_dim: int = Field(default=0, ge=0, le=MAX_HIDDEN, description="0 means hidden_size / num_heads")
    ffn_hidden_size: int = Field(gt=0, le=MAX_FFN)
    vocab_size: int = Field(gt=0, le=MAX_VOCAB)
    mlp: Literal["gelu", "swiglu", "geglu"] = "swiglu"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    position_embedding: Literal["rope", "learned", "alibi", "relative"] = "rope"
    max_position_embeddings: int = Field(default=4096, gt=0, le=MAX_POSITIONS)
    tied_embeddings: bool = False
    linear_bias: bool = Field(default=False, description="every linear layer has a bias (GPT-2, NeoX, BLOOM)")
    qkv_bias: bool = Field(default=False, description="only the q, k, v projections have a bias (Qwen2)")
    embedding_norm: bool = Field(default=False, description="a norm right after the embedding (BLOOM)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="hidden and attention dropout")
    fused_qkv: bool = Field(default=False, description="q, k and v come out of one projection (GPT-2's c_attn, "
                                                       "GPT-NeoX's query_key_value, Phi-3's qkv_proj)")
    qk_norm: bool = Field(default=False, description="an RMSNorm on every head's q and k (Qwen3, OLMo 2)")
    activation: str = Field(default="", max_length=32,
                            description="the MLP activation's Hugging Face name (hidden_act), e.g. gelu_new; "
                                        "empty: the fused one the mlp type implies")
    encoder_layers: int = Field(default=0, ge=0, le=MAX_LAYERS, description="T5-style encoder layers (0: decoder-only)")
    relative_attention_buckets: int = Field(default=32, gt=0, le=2**16)
    # Mixture of experts (all zero: a dense model). An MoE layer replaces the MLP by a router and
    # ``num_experts`` routed experts (each a gated MLP of ``moe_ffn_hidden_size``), of which each token
    # uses ``experts_per_token``, plus shared experts every token uses (Shazeer et al. 2017; Mixtral,
    # Qwen-MoE, DeepSeekMoE, gpt-oss as transformers builds them).
    num_experts: int = Field(default=0, ge=0, le=MAX_EXPERTS, description="routed experts per MoE layer (0: dense)")
    experts_per_token: int = Field(default=0, ge=0, le=MAX_EXPERTS, description="top-k: routed experts per token")
    moe_ffn_hidden_size: int = Field(default=0, ge=0, le=MAX_FFN, description="each routed expert's intermediate size")
    shared_expert_ffn_hidden_size: int = Field(
        default=0, ge=0, le=MAX_FFN, description="the shared experts' intermediate size together (DeepSeek: "
        "n_shared_experts x moe_intermediate_size; Qwen2-MoE: shared_expert_intermediate_size); 0: none")
    shared_expert_gate: bool = Field(default=False, description="a sigmoid gate (hidden -> 1) scales the shared "
                                                                "expert's output (Qwen2-MoE)")
    router_bias: bool = Field(default=False, description="the router's linear has a bias (gpt-oss)")
    dense_layers: tuple[int, ...] = Field(default=(), max_length=MAX_LAYERS, description="decoder layers of an MoE "
                                          "model whose MLP is dense (ffn_hidden_size): DeepSeek's first_k_dense_replace, "
                                          "Qwen-MoE's mlp_only_layers and decoder_sparse_step")
    # Multi-head latent attention (DeepSeek-V2/V3, arXiv 2405.04434): queries (optionally through a
    # q_lora_rank bottleneck) and a kv_lora_rank latent from which keys and values are expanded;
    # ``head_dim`` is the query/key head dim (qk_nope_head_dim + qk_rope_head_dim).
    q_lora_rank: int = Field(default=0, ge=0, le=MAX_HIDDEN, description="MLA query bottleneck (0: none)")
    kv_lora_rank: int = Field(default=0, ge=0, le=MAX_HIDDEN, description="MLA key/value latent (0: not MLA)")
    qk_rope_head_dim: int = Field(default=0, ge=0, le=MAX_HIDDEN, description="MLA: the rotary part of head_dim")
    v_head_dim: int = Field(default=0, ge=0, le=MAX_HIDDEN, description="MLA: the value head dim")
    attention_sinks: bool = Field(default=False, description="a learned sink logit per head (gpt-oss)")
    source: str = ""
    unmodelled: tuple[str, ...] = Field(default=(), max_length=16, description="config fields that change memory "
                                        "but are not modelled yet (a sliding window): named in every report's notes")

    @model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            ints = all(isinstance(data.get(k, 0), int) and not isinstance(data.get(k, 0), bool)
                       for k in ("num_heads", "num_kv_heads", "head_dim", "hidden_size"))
            if not ints:
                return data  # field validation names the wrong one
            if not data.get("num_kv_heads"):
                data["num_kv_heads"] = data.get("num_heads", 0)
            if not data.get("head_dim") and data.get("num_heads"):
                hidden, heads = data.get("hidden_size", 0), data["num_heads"]
                if hidden % heads:
                    raise ConfigError(
                        f"hidden_size {hidden} is not divisible by num_heads {heads}; give head_dim explicitly"
                    )
                data["head_dim"] = hidden // heads
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ConfigError(f"experts_per_token (top-k) {self.experts_per_token} must be 1 to num_experts "
                                  f"{self.num_experts}")
            if not self.moe_ffn_hidden_size:
                raise ConfigError("an MoE model needs moe_ffn_hidden_size (each expert's intermediate size)")
            if list(self.dense_layers) != sorted(set(self.dense_layers)) or any(
                    not 0 <= i < self.num_layers for i in self.dense_layers):
                raise ConfigError(f"dense_layers must be distinct, ascending layer indices below num_layers "
                                  f"{self.num_layers}")
            if len(self.dense_layers) == self.num_layers:
                raise ConfigError("every layer is dense: give num_experts 0 for a dense model")
        elif (self.experts_per_token or self.moe_ffn_hidden_size or self.shared_expert_ffn_hidden_size
              or self.shared_expert_gate or self.router_bias or self.dense_layers):
            raise ConfigError("experts_per_token, moe_ffn_hidden_size, shared experts, router_bias and dense_layers "
                              "describe an MoE: give num_experts too")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise ConfigError("shared_expert_gate needs a shared expert (shared_expert_ffn_hidden_size)")
        if self.kv_lora_rank:
            if not 0 < self.qk_rope_head_dim < self.head_dim or not self.v_head_dim:
                raise ConfigError(f"multi-head latent attention needs 0 < qk_rope_head_dim < head_dim {self.head_dim} "
                                  f"and v_head_dim")
            if self.num_kv_heads != self.num_heads:
                raise ConfigError("multi-head latent attention expands keys and values per head: num_kv_heads must "
                                  "equal num_heads")
        elif self.q_lora_rank or self.qk_rope_head_dim or self.v_head_dim:
            raise ConfigError("q_lora_rank, qk_rope_head_dim and v_head_dim describe multi-head latent attention: "
                              "give kv_lora_rank too")
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3)."""
        return self.kv_lora_rank > 0

    @property
    def total_layers(self) -> int:
        """Encoder plus decoder layers: what a pipeline splits over its stages."""
        return self.encoder_layers + self.num_layers


class PeakTflops(_Frozen):
    """Dense peak throughput per data type, TFLOP/s (int8: TOPS). ``None``: not supported."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    fp32: float = Field(ge=MIN_TFLOPS, le=MAX_TFLOPS)
    tf32: float | None = Field(default=None, ge=MIN_TFLOPS, le=MAX_TFLOPS)
    bf16: float | None = Field(default=None, ge=MIN_TFLOPS, le=MAX_TFLOPS)
    fp16: float | None = Field(default=None, ge=MIN_TFLOPS, le=MAX_TFLOPS)
    fp8: float | None = Field(default=None, gt=0, le=MAX_TFLOPS)
    int8: float | None = Field(default=None, gt=0, le=MAX_TFLOPS)

    def for_dtype(self, dtype: str) -> float:
        value = getattr(self, dtype, None)
        if value is None:
            raise ConfigError(f"this GPU has no {dtype} peak (it does not support {dtype} math)")
        return value


class GPUSpec(_Frozen):
    # strict: a GPU file's "80" or true is a mistake to name, not a number to guess
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$",
                      description="as the driver names it (no control characters)")
    memory_bytes: int = Field(gt=0, le=MAX_DEVICE_BYTES, description="total device memory as the driver reports it")
    peak_tflops: PeakTflops
    hbm_bandwidth_gb_s: float = Field(ge=MIN_BANDWIDTH_GB_S, le=MAX_BANDWIDTH_GB_S)
    intra_node_bandwidth_gb_s: float = Field(ge=MIN_BANDWIDTH_GB_S, le=MAX_BANDWIDTH_GB_S,
                                             description="GPU-to-GPU inside a node, per direction")
    inter_node_bandwidth_gb_s: float = Field(ge=MIN_BANDWIDTH_GB_S, le=MAX_BANDWIDTH_GB_S,
                                             description="per GPU, per direction, across nodes")
    host_link_bandwidth_gb_s: float = Field(ge=MIN_BANDWIDTH_GB_S, le=MAX_BANDWIDTH_GB_S,
                                            description="GPU-to-host (PCIe / C2C), per direction")
    gpus_per_node: int = Field(default=8, gt=0, le=MAX_GPUS_PER_NODE)
    host_memory_per_node_bytes: int = Field(default=2**40, gt=0, le=MAX_HOST_BYTES,
                                            description="CPU memory per node (offload)")
    compute_derate: float = Field(default=1.0, gt=0, le=1, description="share of the datasheet's tensor-core "
                                  "rate this board sustains at its power limit (a power-capped deployment clocks "
                                  "lower); MFU stays measured against the datasheet peak")
    interconnect: str = ""
    chip: str = Field(default="", description="the GPU die (GH100, GA100, AD102, ...): a GPU without a "
                      "calibration of its own uses one measured on the same chip")
    source: str = ""


class ClusterSpec(_Frozen):
    gpu: GPUSpec
    num_nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(gt=0)

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


class TrainConfig(_Frozen):
    """One fully specified training layout. The planner's search enumerates these."""

    gpus: int = Field(gt=0, le=MAX_GPUS)
    dp: int = Field(default=0, ge=0, le=MAX_GPUS, description="0 means gpus / (tp x pp)")
    tp: int = Field(default=1, gt=0, le=MAX_GPUS)
    pp: int = Field(default=1, gt=0, le=MAX_GPUS)
    cp: int = Field(default=1, gt=0, le=MAX_GPUS, description="context parallel: each sequence split over cp ranks "
                    "(ring attention); FSDP/ZeRO shard over dp x cp")
    dp_shard: int = Field(default=0, ge=0, le=MAX_GPUS, description="hybrid sharding (HSDP, FSDP2's dp_shard): the "
                          "data-parallel ranks each shard group spans; the dp / dp_shard groups replicate it and "
                          "all-reduce its gradients. 0: every data-parallel rank shards (FSDP)")
    dp_replicate: int = Field(default=0, ge=0, le=MAX_GPUS, description="hybrid sharding (HSDP): replicas of each "
                              "shard group (torchtitan's data_parallel_replicate_degree); dp = dp_replicate x dp_shard. "
                              "0: derived from --dp-shard, or no hybrid sharding")
    ep: int = Field(default=1, gt=0, le=MAX_GPUS, description="expert parallel: each MoE layer's routed experts "
                    "split over ep ranks, which it borrows from the FSDP shard group x cp x tp (torchtitan's "
                    "expert_parallel_degree); the experts' FSDP group is the rest (efsdp = dp_shard x cp x tp / ep)")
    etp: int = Field(default=0, ge=0, le=MAX_GPUS, description="expert tensor parallel: ranks splitting each routed "
                     "expert's FFN (Megatron's --expert-tensor-parallel-size). torchtitan 0.3.0 fixes it: tp without "
                     "expert parallelism, 1 with it; 0 means that value")
    expert_load: float = Field(default=1.0, ge=1.0, le=1024.0, description="with expert parallelism, the routed "
                               "rows the busiest rank receives as a multiple of the balanced share (dropless "
                               "routing; 1: balanced). Without it a rank holds the rows its own tokens chose "
                               "whatever the routing: no effect")
    sequence_parallel: bool = False
    zero_stage: int = Field(default=0, ge=0, le=3)
    offload: Offload = "none"
    precision: Precision = "bf16-mixed"
    optimizer: Optimizer = "adamw"
    optimizer_impl: OptimizerImpl = "fused"
    exp_avg_dtype: MomentDtype = Field(default="fp32", description="Adam's first moment under Megatron's "
                                       "precision-aware optimizer (--use-precision-aware-optimizer --exp-avg-dtype)")
    exp_avg_sq_dtype: MomentDtype = Field(default="fp32", description="Adam's second moment likewise "
                                          "(--exp-avg-sq-dtype)")
    fp8_param_gather: bool = Field(default=False, description="Megatron's --fp8-param-gather with a Transformer "
                                   "Engine recipe: the projections' weights are FP8 primary parameters, all-gathered "
                                   "in FP8, with no separate FP8 weight cache (an fp32 master stays)")
    activation_checkpointing: str = Field(default="none", max_length=16, description=CHECKPOINTING_HELP)
    attention: Attention = "flash"
    micro_batch: int = Field(default=1, gt=0, le=MAX_MICRO_BATCH)
    global_batch: int = Field(default=0, ge=0, le=MAX_GLOBAL_BATCH, description="0 means micro_batch x dp x grad_accum")
    grad_accum: int = Field(default=0, ge=0, le=MAX_GLOBAL_BATCH,
                            description="0 means global_batch / (micro_batch x dp)")
    seq_len: int = Field(default=4096, gt=0, le=MAX_SEQ_LEN)
    schedule: Schedule = "1f1b"
    chunks: int = Field(default=1, gt=0, le=MAX_LAYERS, description="model chunks per pipeline stage (interleaved)")
    engine: Engine = "pytorch"
    impl: Impl = Field(default="trainplan", description=IMPL_HELP)
    compile: bool = Field(default=False, description="torch.compile on each block (inductor): what is saved for "
                          "backward and the step time change")
    finetune: Finetune = Field(default="full", description=FINETUNE_HELP)
    lora_rank: int = Field(default=8, gt=0, le=65536, description="LoRA rank r (peft's and torchtune's default 8)")
    lora_targets: str = Field(default=",".join(LORA_TARGETS), max_length=64,
                              description="adapted projections, comma-separated among q,k,v,o,gate,up,down "
                                          "(GELU MLPs: gate or up = fc1, down = fc2)")
    base_precision: BasePrecision = Field(default="auto", description="the frozen base's storage: bf16 (the "
                                          "compute dtype), int8 (per-row absmax), nf4 (block-64, double-quantised "
                                          "absmax); auto: nf4 for qlora, the compute dtype for lora")
    train_embeddings: bool = Field(default=False, description="fine-tune the embedding and output head too")
    lora_dtype: Literal["auto", "fp32"] = Field(default="auto", description="the adapters' dtype: auto (the "
                                                "recipe's parameters) or fp32 (peft's default over a 16-bit base: "
                                                "fp32 adapters, no master copy, each adapter casts its input)")
    teacher: str = Field(default="", max_length=4096, description="distillation: a frozen teacher model (preset "
                         "or config.json) whose forward runs in every step; empty: none")
    optimizer_in_backward: bool = Field(default=False, description="each gradient applied and freed as it "
                                        "arrives (register_post_accumulate_grad_hook)")
    paged_optimizer: bool = Field(default=False, description="optimizer state paged out to host memory")
    fp8_all_gather: bool = Field(default=True, description="fp8-tensorwise under FSDP: all-gather the projections' "
                                 "weights in fp8 (torchao's enable_fsdp_float8_all_gather, on in torchtitan's Float8 "
                                 "command)")
    async_tp: bool = Field(default=False, description="asynchronous tensor parallelism: each sequence-parallel "
                           "all-gather and reduce-scatter pipelined with the matmul it feeds (torch.compile's "
                           "micro-pipeline TP over symmetric memory, torchtitan's enable_async_tensor_parallel)")
    ddp_bucket_mb: float = Field(default=25.0, gt=0, le=2**20, description="DDP bucket_cap_mb (MiB)")
    alloc_conf: Literal["default", "expandable_segments"] = Field(
        default="default", description="PyTorch's CUDA caching allocator settings (PYTORCH_CUDA_ALLOC_CONF): default, "
        "or expandable_segments:True (torchtitan's launcher sets it)")

    @model_validator(mode="before")
    @classmethod
    def _fill_derived(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        gpus, tp, pp, cp = data.get("gpus"), data.get("tp", 1), data.get("pp", 1), data.get("cp", 1)
        if not data.get("dp") and all(isinstance(v, int) and not isinstance(v, bool) for v in (gpus, tp, pp, cp)):
            if gpus > 0 and tp > 0 and pp > 0 and cp > 0:
                if gpus % (tp * pp * cp):
                    what = "tp x pp" if cp == 1 else "tp x pp x cp"
                    raise LayoutError(
                        f"{what} = {tp * pp * cp} does not divide {gpus} GPUs; "
                        f"choose sizes whose product divides {gpus}"
                    )
                data["dp"] = gpus // (tp * pp * cp)
        dp, mb = data.get("dp", 0), data.get("micro_batch", 1)
        shard, replicate = data.get("dp_shard", 0), data.get("dp_replicate", 0)
        if isinstance(dp, int) and dp > 0 and all(isinstance(v, int) and v >= 0 for v in (shard, replicate)):
            # hybrid sharding: one of dp_shard, dp_replicate gives the other (dp = their product)
            if shard and not replicate and dp % shard == 0:
                data["dp_replicate"] = dp // shard
            elif replicate and not shard:
                if dp % replicate:
                    raise LayoutError(f"--dp-replicate {replicate} does not divide dp = {dp}: the shard groups must "
                                      f"be equal (dp = dp_replicate x dp_shard)")
                data["dp_shard"] = dp // replicate
        ep, etp = data.get("ep", 1), data.get("etp", 0)
        if not etp and isinstance(ep, int) and isinstance(tp, int):  # torchtitan 0.3.0's only choice
            data["etp"] = tp if ep == 1 else 1
        gb, ga = data.get("global_batch", 0), data.get("grad_accum", 0)
        if isinstance(dp, int) and isinstance(mb, int) and dp > 0 and mb > 0:
            if not gb and isinstance(ga, int):
                data["grad_accum"] = ga or 1
                data["global_batch"] = mb * dp * (ga or 1)
            elif isinstance(gb, int) and gb > 0 and not ga:
                if gb % (mb * dp):
                    raise ConfigError(
                        f"global batch {gb} is not divisible by micro-batch x dp = {mb} x {dp} = {mb * dp}; "
                        f"use a global batch that is a multiple of {mb * dp}"
                    )
                data["grad_accum"] = gb // (mb * dp)
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        parse_checkpointing(self.activation_checkpointing)
        model_parallel = self.tp * self.pp * self.cp
        if self.dp * model_parallel != self.gpus:
            hint = (
                (f"; with tp={self.tp}, pp={self.pp} and cp={self.cp} use dp = {self.gpus // model_parallel}" if self.cp > 1
                 else f"; with tp={self.tp} and pp={self.pp} use dp = {self.gpus // model_parallel}")
                if self.gpus % model_parallel == 0
                else f"; tp x pp x cp = {model_parallel} does not divide {self.gpus} GPUs"
            )
            cp = f" x cp {self.cp}" if self.cp > 1 else ""
            raise LayoutError(
                f"dp x tp x pp{' x cp' if cp else ''} = {self.dp} x {self.tp} x {self.pp}{cp.replace(' x cp', ' x')} = "
                f"{self.dp * model_parallel} != {self.gpus} GPUs{hint}"
            )
        if self.global_batch != self.micro_batch * self.dp * self.grad_accum:
            raise ConfigError(
                f"global batch {self.global_batch} != micro-batch {self.micro_batch} x dp {self.dp} "
                f"x gradient accumulation {self.grad_accum}"
            )
        if self.dp_shard and self.dp % self.dp_shard:
            raise LayoutError(f"--dp-shard {self.dp_shard} does not divide dp = {self.dp}: the replicas must be "
                              f"equal (dp = dp_shard x dp_replicate)")
        if self.dp_shard * self.dp_replicate not in (0, self.dp):
            raise LayoutError(f"dp_replicate x dp_shard = {self.dp_replicate} x {self.dp_shard} != dp = {self.dp}")
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("sequence parallelism splits activations over the tensor-parallel group: it needs tp > 1")
        if self.schedule == "interleaved" and self.pp == 1:
            raise LayoutError("the interleaved schedule needs pipeline parallelism (pp > 1)")
        if self.chunks > 1 and self.schedule != "interleaved":
            raise LayoutError(f"--chunks {self.chunks} needs --schedule interleaved")
        if self.schedule == "interleaved" and self.chunks < 2:
            raise LayoutError("the interleaved schedule needs at least 2 model chunks per stage (--chunks 2)")
        if self.offload == "params" and self.zero_stage != 3:
            raise LayoutError("offloading parameters needs ZeRO-3 (--strategy zero3)")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise LayoutError("offloading the optimizer needs a ZeRO stage (zero1, zero2 or zero3), not plain DDP")
        if self.engine == "megatron":
            if self.zero_stage > 1:
                raise LayoutError(
                    "Megatron-LM shards only optimizer state (its distributed optimizer = ZeRO-1); "
                    "use --engine deepspeed or pytorch for ZeRO-2/3"
                )
        if self.precision == "amp-bf16" and self.engine != "pytorch":
            raise LayoutError("amp-bf16 (torch.autocast) is a PyTorch recipe: use --engine pytorch")
        if self.async_tp and not (self.tp > 1 and self.sequence_parallel and self.compile and self.engine == "pytorch"):
            raise LayoutError("asynchronous TP pipelines the sequence-parallel collectives inside torch.compile'd "
                              "graphs: it needs --tp > 1, --sequence-parallel, --compile and --engine pytorch")
        if self.cp > 1 and self.seq_len % (2 * self.cp):
            # PyTorch's context parallel (torch.distributed.tensor.experimental.context_parallel,
            # torchtitan's --parallelism.context_parallel_degree) balances causal attention round-robin:
            # each rank holds chunks r and 2cp - 1 - r of the sequence
            raise LayoutError(f"context parallelism with load balancing splits each sequence into 2 x cp = "
                              f"{2 * self.cp} chunks: --seq-len {self.seq_len} is not a multiple of {2 * self.cp}")
        self._check_expert_parallel()
        self._check_finetune()
        if reason := layout_refusal(self):  # what the planner does not model (planner/capabilities.py)
            raise LayoutError(reason)
        return self

    @property
    def shard_world(self) -> int:
        """Ranks that shard parameters, gradients and optimizer state and average gradients: the
        data-parallel ranks times the context-parallel ones (FSDP over the flattened dp x cp mesh,
        as torchtitan builds it; Megatron's distributed optimizer likewise spans DP x CP); with
        hybrid sharding the shard group only (dp_shard x cp)."""
        return (self.dp_shard or self.dp) * self.cp


    @property
    def expert_shard_world(self) -> int:
        """Ranks that shard a routed expert's parameters and reduce its gradients: with expert
        parallelism FSDP over ``efsdp`` = dp_shard x cp x tp / ep (torchtitan
        ``ParallelDims``: ``efsdp = fsdp * tp // ep``); without it the dense shard group."""
        if self.ep == 1:
            return self.shard_world
        return self.shard_world * self.tp // self.ep

    def _check_expert_parallel(self) -> None:
        if self.ep == 1:
            if self.etp != self.tp:
                raise LayoutError(f"--etp {self.etp} with tp {self.tp} and no expert parallelism: torchtitan splits "
                                  f"each expert's FFN over the tensor-parallel group (etp = tp); a separate expert "
                                  f"tensor-parallel size (Megatron's) is not modelled")
            return
        if self.etp != 1:
            raise LayoutError(f"--etp {self.etp} with --ep {self.ep}: with expert parallelism torchtitan runs every "
                              f"expert whole on its rank (etp 1); expert tensor parallelism beside it (Megatron's "
                              f"ETP x EP) is not modelled")
        if self.engine != "pytorch":
            raise LayoutError(f"--ep {self.ep} is modelled as torchtitan runs it (--engine pytorch); "
                              f"{self.engine}'s expert parallelism is not modelled")
        if self.zero_stage == 1:
            raise LayoutError("expert parallelism with ZeRO-1 is not modelled: use FSDP (zero2, zero3) or ddp")
        borrowable = (self.dp_shard or self.dp if self.zero_stage >= 2 else 1) * self.cp * self.tp
        if borrowable % self.ep:
            over = "dp_shard x cp x tp" if self.zero_stage >= 2 else "cp x tp (DDP's replicas are not among them)"
            raise LayoutError(f"--ep {self.ep} does not divide {over} = {borrowable}: expert parallelism borrows its "
                              f"ranks from FSDP's shard group, context and tensor parallelism (torchtitan "
                              f"ParallelDims: efsdp = dp_shard x cp x tp / ep)")

    @property
    def local_seq_len(self) -> int:
        """Tokens of each sequence one rank holds."""
        return self.seq_len // self.cp

    def _check_finetune(self) -> None:
        targets = self.lora_targets.split(",")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets or len(set(targets)) != len(targets):
            raise ConfigError(f"--lora-targets {self.lora_targets!r}: a comma-separated subset of "
                              f"{','.join(LORA_TARGETS)} without repeats")
        if self.finetune == "full":
            if self.base_precision not in ("auto", "bf16") or self.train_embeddings or self.lora_dtype != "auto":
                raise ConfigError("--base-precision, --train-embeddings and --lora-dtype describe a LoRA fine-tune: add "
                                  "--finetune lora or qlora")
        else:
            if self.finetune == "qlora" and self.base_precision not in ("auto", "nf4"):
                raise ConfigError(f"qlora is LoRA over an NF4 base; for a {self.base_precision} base use "
                                  f"--finetune lora --base-precision {self.base_precision}")
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise LayoutError("--optimizer-in-backward applies each gradient as it arrives: it cannot accumulate "
                              "gradients over micro-batches (use one micro-batch per step)")
        if self.paged_optimizer and self.optimizer == "sgd":
            raise ConfigError("--paged-optimizer pages AdamW state (adamw or adamw8bit)")

    @property
    def base(self) -> str:
        """The frozen base's storage (lora, qlora): bf16, int8 or nf4."""
        if self.base_precision != "auto":
            return self.base_precision
        return "nf4" if self.finetune == "qlora" else "bf16"

    @property
    def adapted(self) -> frozenset[str]:
        return frozenset(self.lora_targets.split(","))

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per optimizer step on one data-parallel replica (= pipeline m)."""
        return self.grad_accum

    @property
    def strategy(self) -> str:
        return {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[self.zero_stage]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def check_layout(model: ModelSpec, train: TrainConfig) -> None:
    """Checks what depends on both the model and the layout; raises ``LayoutError``: the
    arithmetic here, what is not modelled in ``planner.capabilities``."""
    if reason := architecture_refusal(model):  # first: nothing else about the layout matters
        raise LayoutError(reason)
    tp = train.tp
    for what, value in (
        ("attention heads", model.num_heads),
        ("key/value heads", model.num_kv_heads),
        ("FFN hidden size", model.ffn_hidden_size),
    ):
        if value % tp:
            divisors = [d for d in range(1, value + 1) if value % d == 0 and d <= train.gpus]
            raise LayoutError(
                f"tp={tp} does not divide the {value} {what} of {model.name}; "
                f"use a tp among {', '.join(map(str, divisors[-6:]))}"
            )
    _check_experts(model, train)
    layers = model.total_layers
    if train.pp > layers:
        raise LayoutError(f"pp={train.pp} is more pipeline stages than the {layers} layers of {model.name}")
    if train.pp * train.chunks > layers:
        raise LayoutError(
            f"pp x chunks = {train.pp} x {train.chunks} model chunks exceed the {layers} layers of {model.name}"
        )
    if train.engine == "megatron" and layers % (train.pp * train.chunks):
        raise LayoutError(
            f"Megatron-LM needs the {layers} layers divisible by pp x chunks = {train.pp * train.chunks}"
        )
    if train.sequence_parallel and train.local_seq_len % tp:
        raise LayoutError(f"sequence parallelism needs seq len {train.seq_len} divisible by tp={tp}")
    if model.position_embedding == "learned" and train.seq_len > model.max_position_embeddings:
        raise LayoutError(
            f"seq len {train.seq_len} exceeds the {model.max_position_embeddings} learned positions of "
            f"{model.name}; use --seq-len {model.max_position_embeddings} or less"
        )
    if reason := model_refusal(model, train):  # what the planner does not model (planner/capabilities.py)
        raise LayoutError(reason)


def _check_experts(model: ModelSpec, train: TrainConfig) -> None:
    """Expert parallelism against the model: it needs experts, and splits them evenly
    (torchtitan's dispatchers take ``num_experts // ep`` local experts); without it tensor
    parallelism splits each expert's FFN, and the shared experts' always."""
    if not model.is_moe:
        if train.ep > 1:
            raise LayoutError(f"--ep {train.ep}: {model.name} has no experts to split (expert parallelism needs a "
                              f"mixture of experts)")
        return
    if model.num_experts % train.ep:
        raise LayoutError(f"--ep {train.ep} does not divide the {model.num_experts} experts of {model.name}; use an "
                          f"ep among {', '.join(str(d) for d in _divisors(model.num_experts) if d <= train.gpus)}")
    for what, value, applies in (("expert FFN size", model.moe_ffn_hidden_size, train.ep == 1),
                                 ("shared-expert FFN size", model.shared_expert_ffn_hidden_size, True)):
        if applies and value % train.tp:
            raise LayoutError(f"tp={train.tp} does not divide the {value} {what} of {model.name}")
    if train.ep > 1 and train.tp > 1 and train.local_seq_len % train.tp:
        # inside the MoE the tensor-parallel ranks split the tokens (torchtitan models/common/moe.py)
        raise LayoutError(f"expert parallelism with tp={train.tp} splits each sequence's tokens over the "
                          f"tensor-parallel ranks: seq len {train.seq_len} must be divisible by cp x tp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
