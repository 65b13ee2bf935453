"""What trainplan does with a layout, in one place: whether ``plan`` models it, whether ``run``
(the strategy layer in strategies/) executes it, and when not, why -- one line that names the
flag or field to change.

A rule is data: the layouts it refuses (a small predicate) and its reason, a ``str.format``
template over ``model`` and ``train`` (``{train.precision}``). The comment above each rule says
why it holds: the source that decides it, or the measured fact. Arithmetic is not here:
``TrainConfig`` checks dp x tp x pp x cp = GPUs, batch sizes and the flags that need each
other by definition (--chunks needs --schedule interleaved), ``check_layout`` that tp divides
the heads and pp the layers; the memory model says whether it fits.

Who asks:

- ``plan``: ``TrainConfig``'s validator asks ``layout_refusal`` and ``check_layout`` asks
  ``model_refusal`` (together: ``plan_refusal``); a refusal is a ``LayoutError``.
- ``run`` and ``profile``: ``build_run_config`` (trainplan/cli.py) before launching, and the
  strategy layer at start-up (``strategies.train.check_runnable``: the launcher before any rank
  starts, each rank before it builds anything) ask ``run_refusal``; ``profile --recommend``
  runs only candidates it accepts. ``strategies.model`` asks ``reference_model_refusal``.

A run is compared with its plan, so ``run`` executes a subset of what ``plan`` models:
``run_refusal`` asks ``plan_refusal`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from planner.precision import FLOAT8_RECIPES, TE_RECIPES

# ``model`` is a planner.configs.ModelSpec and ``train`` a TrainConfig throughout; they are not
# imported: TrainConfig's validator asks this module (no import cycle, tests/test_layering.py).


@dataclass(frozen=True)
class Host:
    """Where a run would execute: on CUDA GPUs (else gloo on CPU), and whether as one simulated
    rank of a larger world (``profile --simulate-world``: a fake process group)."""

    cuda: bool = False
    simulated: bool = False


@dataclass(frozen=True)
class Rule:
    """Refuses the layouts ``when`` picks, saying ``reason`` (formatted with ``model`` and
    ``train``). ``when`` takes the train config (layout rules), the model and the train config
    (model rules), or those and the ``Host`` (run rules)."""

    when: Callable[..., bool]
    reason: str


def _first(rules: tuple[Rule, ...], model, train, *args) -> str | None:
    """The reason of the first rule that refuses, else None."""
    for rule in rules:
        if rule.when(*args):
            return rule.reason.format(model=model, train=train)
    return None


def _policy(train) -> str:
    """The checkpointing policy without its period (``layer:2`` -> ``layer``)."""
    return train.activation_checkpointing.partition(":")[0]


def _lora(train) -> bool:
    return train.finetune != "full"


def _torchao_float8(train) -> bool:
    """torchao's Float8 linears (planner/float8.py)."""
    return train.precision in FLOAT8_RECIPES


def _te_fp8(train) -> bool:
    """Transformer Engine's FP8 recipes (planner/te_fp8.py)."""
    return train.precision in TE_RECIPES


# ---------------------------------------------------------------- plan: the layout alone

LAYOUT_RULES: tuple[Rule, ...] = (
    # planner/memory.py models offload as ZeRO-Offload (DeepSpeed) and FSDP2's CPUOffloadPolicy
    # run it; Megatron-LM's optimizer offload is not modelled
    Rule(lambda t: t.engine == "megatron" and t.offload != "none",
         "this planner models offload for the deepspeed and pytorch engines, not megatron"),
    # planner/float8.py models torchtitan's Float8 recipe: torchao's Float8Linear under FSDP2
    # with amp-bf16 states (torchtitan/components/quantization/float8.py)
    Rule(lambda t: _torchao_float8(t) and (t.engine != "pytorch" or t.zero_stage < 2),
         "{train.precision} is planned as torchtitan runs torchao's Float8 linears: under FSDP2 (--strategy zero2 "
         "or zero3, --engine pytorch)"),
    # planner/te_fp8.py models Transformer Engine's recipes as Megatron-Core runs them
    Rule(lambda t: _te_fp8(t) and t.engine != "megatron",
         "{train.precision} is Transformer Engine's FP8 recipe as Megatron-Core runs it: plan it with --engine megatron "
         "(torchao's Float8 under FSDP2 is --precision fp8-tensorwise or fp8-rowwise)"),
    Rule(lambda t: t.fp8_param_gather and (not _te_fp8(t) or t.precision == "mxfp8"),
         "--fp8-param-gather is Megatron's FP8 primary weights under a per-tensor or blockwise Transformer Engine "
         "recipe (fp8-delayed, fp8-current, fp8-blockwise; MXFP8 parameters are gathered in bf16)"),
    # Megatron's precision-aware optimizer (megatron/core/optimizer/optimizer_config.py:433-467): Adam
    # under the distributed optimizer
    Rule(lambda t: (t.exp_avg_dtype, t.exp_avg_sq_dtype) != ("fp32", "fp32")
         and (t.engine != "megatron" or t.optimizer != "adamw" or t.offload != "none"),
         "--exp-avg-dtype / --exp-avg-sq-dtype are Megatron's precision-aware optimizer: plan them with "
         "--engine megatron, --optimizer adamw and no offload"),
    Rule(lambda t: (_torchao_float8(t) or _te_fp8(t)) and (_lora(t) or bool(t.teacher)),
         "{train.precision} is planned for full training (not lora, qlora or distillation)"),
    Rule(lambda t: (_torchao_float8(t) or _te_fp8(t)) and t.offload != "none",
         "{train.precision} with --offload is not modelled"),
    # hybrid sharding is FSDP2's HSDP (fully_shard over a 2-D dp_replicate x dp_shard mesh, as
    # torchtitan builds it: torchtitan/distributed/parallel_dims.py)
    Rule(lambda t: t.dp_shard > 0 and (t.engine != "pytorch" or t.zero_stage < 2),
         "--dp-shard / --dp-replicate (hybrid sharding, HSDP) is FSDP2's: plan it with --engine pytorch and "
         "--strategy zero2 or zero3"),
    Rule(lambda t: t.dp_shard > 0 and (_lora(t) or bool(t.teacher) or t.offload != "none"),
         "--dp-shard / --dp-replicate (hybrid sharding) is planned for full training without offload"),
    # PyTorch's context parallel dispatches only SDPA's fused kernels to the ring
    # (torch.distributed.tensor.experimental._attention: flash, efficient, cudnn)
    Rule(lambda t: t.cp > 1 and t.attention != "flash",
         "context parallelism runs ring attention over SDPA's fused kernels: use --attention flash"),
    # DeepSpeed's sequence parallelism is Ulysses' all-to-all (deepspeed/sequence/layer.py)
    Rule(lambda t: t.cp > 1 and t.engine == "deepspeed",
         "DeepSpeed splits sequences with Ulysses (all-to-all), not ring attention: use --engine pytorch or "
         "megatron with --cp"),
    # planner/activations.py models ring attention for full training's saved tensors only
    Rule(lambda t: t.cp > 1 and (_lora(t) or bool(t.teacher)),
         "context parallelism is planned for full training (not lora, qlora or distillation)"),
    Rule(lambda t: t.cp > 1 and _policy(t) in ("selective", "op"),
         "with --cp, plan --ac none, full or layer:N (recomputing the ring attention's saved tensors is not "
         "modelled)"),
    # planner/finetune.py counts a frozen base and adapters per data-parallel replica
    Rule(lambda t: _lora(t) and (t.tp > 1 or t.pp > 1),
         "fine-tuning (lora, qlora) is planned for data-parallel layouts (DDP, ZeRO-1/2/3) and one GPU; tensor and "
         "pipeline parallelism are not modelled for it yet"),
    Rule(lambda t: _lora(t) and t.engine != "pytorch", "fine-tuning (lora, qlora) is modelled for the pytorch engine"),
    Rule(lambda t: _lora(t) and t.offload != "none",
         "--offload with lora/qlora is not modelled; --paged-optimizer puts the optimizer state in host memory"),
    # autocast re-casts the frozen base every forward: a transient copy per projection
    Rule(lambda t: _lora(t) and t.precision == "amp-bf16",
         "lora/qlora with amp-bf16 is not modelled (autocast re-casts the frozen base every forward); use "
         "bf16-mixed or bf16"),
    Rule(lambda t: _lora(t) and _policy(t) in ("op", "selective"),
         "with lora/qlora, plan --ac none, full or layer:N (op-level and selective checkpointing of adapted layers "
         "are not modelled yet)"),
    # planner/memory.py adds the teacher's weights and log-probabilities to a data-parallel rank
    Rule(lambda t: bool(t.teacher) and (t.tp > 1 or t.pp > 1 or t.engine != "pytorch"),
         "distillation (--teacher) is planned for data-parallel layouts with the pytorch engine"),
)
"""What ``plan`` does not model, decided by the layout alone (``TrainConfig`` refuses these)."""


# ---------------------------------------------------------------- plan: the model alone

# Mixtures of experts are planned for training as the reference model's MoE block runs them
# (strategies/model.py MoE; planner/activations.py _moe_terms), sharded and exchanged as
# torchtitan 0.3.0 does (planner/params.py expert_local_shape); what else would change what an
# MoE layer saves or how its experts shard is refused below (MOE_RULES). Serving them is planned as
# the reference model's inference runs them: every expert resident (or swapped with its layer),
# a decode step reading the experts its tokens chose (planner/inference.py experts_touched).
# DeepSeek's latent attention saves other tensors than q, k, v per head: planned for training
# as the reference model's LatentAttention runs it (MLA_RULES), served over its compressed cache
# (MLA_INFERENCE_RULES below)
# gpt-oss's sinks add a column to every softmax: FlashAttention kernels without sink support fall back
_SINKS_RULE = Rule(lambda m: m.attention_sinks,
                   "{model.name} has attention sinks: its attention kernels and what they save are not modelled yet")
ARCHITECTURE_RULES: tuple[Rule, ...] = (_SINKS_RULE,)
"""Architectures whose parameters are read but whose memory and time are not planned."""


def architecture_refusal(model) -> str | None:
    """Why neither ``plan`` nor ``run`` models this model at all, or None."""
    return _first(ARCHITECTURE_RULES, model, None, model)


# latent attention is served by strategies/inference.py _latent_attention and walked by
# planner/inference.py _latent_attention on one GPU in 16-bit (or fp32) weights; the executor
# quantises the block projections by name (q, k, v, o, gate, up, down), not MLA's own, and its
# tensor-parallel plan and layer swapping know only q, k, v
MLA_INFERENCE_RULES: tuple[Rule, ...] = (
    Rule(lambda m, c: c.quantised, "serving {model.name}'s latent attention is planned with 16-bit or fp32 weights; "
         "--weights {cfg.weights} is not modelled for it yet"),
    Rule(lambda m, c: c.tp > 1, "serving {model.name}'s latent attention is planned on one GPU per pipeline stage; "
         "--tp {cfg.tp} is not modelled for it yet"),
    Rule(lambda m, c: c.offload != "none", "serving {model.name}'s latent attention with --offload {cfg.offload} is not "
         "modelled yet"),
)


def inference_architecture_refusal(model) -> str | None:
    """Why ``plan --mode inference`` does not model this model, or None."""
    return architecture_refusal(model)


def inference_refusal(model, cfg) -> str | None:
    """Why ``plan --mode inference`` does not model this model under this config, or None."""
    if not model.mla:
        return None
    for rule in MLA_INFERENCE_RULES:
        if rule.when(model, cfg):
            return rule.reason.format(model=model, cfg=cfg)
    return None


_MOE_PLANNED = ("an MoE layer is planned as the reference model's MoE block (--impl trainplan), transformers' "
                "grouped_mm experts (--impl hf) or torchtitan's Qwen3 MoE model (--impl torchtitan) run it, on "
                "--engine pytorch")
MOE_RULES: tuple[Rule, ...] = (
    # what each implementation's MoE saves differs (docs/moe-sources.md): the reference block's,
    # transformers' grouped_mm experts (measured through trainplan.track) and torchtitan's block are
    # itemised, Megatron's token dispatcher and grouped GEMM are not
    Rule(lambda m, t: t.impl == "megatron",
         "{model.name} is a mixture of experts: " + _MOE_PLANNED + "; --impl {train.impl}'s MoE layer is not "
         "modelled yet"),
    # torchtitan 0.3.0's Qwen3 MoE model is planned whole (its block, tests/test_moe.py; the model
    # trained as its trainer does, tests/test_torchtitan.py). Its other MoE models are not: its
    # DeepSeek-V3 attention (MLA) and gpt-oss (sinks, refused above for every implementation)
    # save other tensors, and it has no model with Mixtral's attention or shared experts beside
    # per-head norms (their backward moments are traced on the reference block only)
    Rule(lambda m, t: t.impl.startswith("torchtitan") and m.kv_lora_rank > 0,
         "{model.name} is a mixture of experts with latent attention: --impl {train.impl} plans torchtitan's Qwen3 "
         "MoE model; its DeepSeek-V3 attention (MLA) is not modelled yet (--impl trainplan plans it)"),
    Rule(lambda m, t: t.impl.startswith("torchtitan") and (not m.qk_norm or m.shared_expert_ffn_hidden_size > 0),
         "{model.name} is a mixture of experts torchtitan 0.3.0 does not ship: --impl {train.impl} plans its Qwen3 "
         "MoE model (per-head q/k norms, no shared experts); use --impl trainplan or hf"),
    # torchtitan's expert-parallel dispatcher (all-to-all with its own permutation buffers) is not
    # itemised: its single-rank LocalTokenDispatcher is
    Rule(lambda m, t: t.impl.startswith("torchtitan") and t.ep > 1,
         "--ep {train.ep} with --impl {train.impl}: torchtitan's expert-parallel token dispatcher is not modelled "
         "yet (its single-rank dispatcher is); use --impl trainplan for expert parallelism"),
    Rule(lambda m, t: t.engine != "pytorch",
         "{model.name} is a mixture of experts: " + _MOE_PLANNED + "; --engine {train.engine}'s expert sharding and "
         "token dispatcher are not modelled yet"),
    # the partitioner's choices inside the MoE block (data-dependent splits) are not traced
    Rule(lambda m, t: t.compile, "torch.compile of an MoE layer (data-dependent expert groups) is not modelled"),
    # torch.autocast's per-op casts inside the block (the router, the grouped GEMMs) are not traced
    Rule(lambda m, t: t.precision == "amp-bf16",
         "amp-bf16 (torch.autocast's casts inside the MoE block) is not modelled for an MoE; use bf16-mixed"),
    # torchao's MoE converters pad each expert's rows (pad_multiple 16/32) and swap the dispatcher
    Rule(lambda m, t: _torchao_float8(t) or _te_fp8(t) or t.precision == "mxfp8",
         "{train.precision} on an MoE (padded grouped GEMMs, torchao's MoE converters) is not modelled; use a 16-bit "
         "recipe"),
    # LoRA leaves an MoE block frozen, without adapters (the reference model's apply_lora adapts
    # block projections; stacked experts are parameters, not Linears): measured for the reference
    # block, with expert parallelism too; a frozen block rebuilt under EP holds other rows than
    # the traced moments (measured +8% on gloo ep2); peft's expert adapters (target_parameters)
    # are not modelled
    Rule(lambda m, t: _lora(t) and t.ep > 1 and t.activation_checkpointing not in ("none", "selective"),
         "LoRA with expert parallelism under --ac {train.activation_checkpointing} is not modelled (a frozen MoE "
         "block rebuilt with its rows exchanged); use --ac none or --ep 1"),
    Rule(lambda m, t: _lora(t) and t.impl != "trainplan",
         "LoRA on a mixture of experts is planned for the reference model (--impl trainplan: adapters on the "
         "attention and the dense layers, the MoE blocks frozen); --impl {train.impl}'s is not modelled yet"),
    Rule(lambda m, t: t.teacher != "", "distillation with an MoE student is not modelled"),
)
"""What ``plan`` does not model of a mixture of experts' training (``check_layout``)."""

_MLA_PLANNED = "latent attention is planned as the reference model's LatentAttention runs it"
MLA_RULES: tuple[Rule, ...] = (
    Rule(lambda m, t: t.impl != "trainplan" or t.engine != "pytorch",
         "{model.name} uses multi-head latent attention: " + _MLA_PLANNED + " (--impl trainplan, --engine pytorch); "
         "--impl {train.impl} --engine {train.engine} is not modelled yet"),
    # the padded fused kernel only: an eager or recomputed core attention, a ring over cp ranks,
    # autocast's per-linear casts and torch.compile are not traced for it
    Rule(lambda m, t: t.attention != "flash" or t.activation_checkpointing in ("selective", "op") or t.cp > 1
         or t.precision == "amp-bf16" or t.compile,
         "{model.name} uses multi-head latent attention: " + _MLA_PLANNED + " with flash attention, without cp, "
         "selective or op-level checkpointing, amp-bf16 or compile"),
)
"""What ``plan`` does not model of latent attention's training (``check_layout``)."""


# ---------------------------------------------------------------- plan: the model and the layout

MODEL_RULES: tuple[Rule, ...] = (
    # strategies/context_parallel.py shards RoPE's tables by position; a learned or relative
    # position embedding would need its own sharding
    Rule(lambda m, t: t.cp > 1 and m.position_embedding != "rope",
         "context parallelism shards RoPE's positions; {model.name}'s {model.position_embedding} positions are not "
         "sharded by the reference model (use --cp 1)"),
    # the ring's SDPA calls pass dropout_p=0.0 (torch.distributed.tensor.experimental._attention)
    Rule(lambda m, t: t.cp > 1 and m.dropout > 0,
         "PyTorch's ring attention runs without dropout; {model.name} has dropout {model.dropout} (use --cp 1)"),
)
"""What ``plan`` does not model for this model (``check_layout`` refuses these)."""


# ---------------------------------------------------------------- run

REFERENCE_MODEL_RULES: tuple[Rule, ...] = (
    # strategies/model.py builds decoder-only blocks; T5's encoder, cross-attention and
    # relative position buckets are planned (planner/params.py) but not built
    Rule(lambda m: m.encoder_layers > 0, "{model.name} is an encoder-decoder model: trainplan plans it but does not "
         "run it"),
    Rule(lambda m: m.position_embedding not in ("rope", "learned"),
         "{model.name} uses {model.position_embedding} positions, which the reference model does not implement "
         "(rope and learned are)"),
)
"""What strategies/model.py's reference model cannot build."""


def _biased_frozen(m, t) -> bool:
    """A LoRA run freezes the adapted projections, and every projection over a quantised base
    (strategies/lora.py apply_lora, quantize_base); the frozen projection has no bias."""
    if not _lora(t):
        return False
    biased = {"q", "k", "v", "o", "gate", "up", "down"} if m.linear_bias else {"q", "k", "v"} if m.qkv_bias else set()
    return bool(biased & t.adapted if t.base == "bf16" else biased)


RUN_RULES: tuple[Rule, ...] = (
    # strategies/ builds PyTorch's own engines (DDP, ZeroRedundancyOptimizer, FSDP2, DTensor)
    Rule(lambda m, t, on: t.engine != "pytorch", "run executes PyTorch's engines: --engine must be pytorch"),
    # strategies/model.py is trainplan's reference model; an implementation's saved tensors
    # (planner/implementations.py) are not what it saves
    Rule(lambda m, t, on: t.impl != "trainplan",
         "run executes trainplan's reference model: --impl {train.impl} is planned by `plan`; measure your own loop "
         "of that code with trainplan.track"),
    # strategies/ never reads paged_optimizer: a paged prediction would be compared with an unpaged run
    Rule(lambda m, t, on: t.paged_optimizer,
         "--paged-optimizer is planned by `plan`; the strategy layer does not execute it yet"),
    # strategies/precision.py precision_plan has no fp32 main-gradient buffers (Megatron's recipe)
    Rule(lambda m, t, on: t.precision == "bf16-mixed-fp32-grads",
         "precision {train.precision} is planned but not run by trainplan's strategy layer (use bf16-mixed, "
         "fp16-mixed, amp-bf16, bf16 or fp32)"),
    # inductor's micro-pipeline TP needs torch.distributed._symmetric_memory, which is CUDA only
    Rule(lambda m, t, on: t.async_tp and not on.cuda,
         "asynchronous TP runs over CUDA symmetric memory (torch.distributed._symmetric_memory): on this machine it "
         "is planned by `plan`, not run"),
    # strategies/context_parallel.py shards sequences over a dp x cp mesh without tp or pp meshes
    Rule(lambda m, t, on: t.cp > 1 and (t.tp > 1 or t.pp > 1),
         "run executes context parallelism with data parallelism only (--tp 1 --pp 1); cp with tp or pp is planned "
         "by `plan`"),
    # CUDA's ring flash kernel takes one head count: k, v repeated to every head would save and
    # send num_heads / num_kv_heads times what the planner counts (the CPU kernel attends grouped
    # heads itself; strategies/context_parallel.py ring_attention)
    Rule(lambda m, t, on: on.cuda and t.cp > 1 and m.num_kv_heads != m.num_heads,
         "context parallel with grouped-query attention is not run on CUDA yet (its ring flash kernel needs k, v "
         "repeated to every head, which the planner does not count)"),
    # DistributedDataParallel replicates whole modules over one process group: it composes with
    # neither DTensor's tensor parallelism nor a pipeline stage's partial model (torchtitan
    # likewise uses FSDP2 for dp x tp and pp x dp)
    Rule(lambda m, t, on: t.zero_stage <= 1 and t.shard_world > 1 and (t.tp > 1 or t.pp > 1),
         "DDP (ddp, zero1) combines with neither tensor nor pipeline parallelism in PyTorch when dp > 1; use "
         "--strategy zero2 or zero3 (FSDP2) for dp x tp and pp x dp"),
    # measured: torchao's Float8ColwiseParallel all-gathers float8 tensors, which gloo cannot;
    # pipelines and cp with Float8 are not built by strategies/parallelize.py
    Rule(lambda m, t, on: _torchao_float8(t) and (t.tp > 1 or t.pp > 1 or t.cp > 1),
         "{train.precision} is run under FSDP2 alone (--tp 1 --pp 1 --cp 1); Float8 with tensor, pipeline or "
         "context parallelism is planned by `plan` (torchao's Float8 TP all-gathers float8 tensors, which gloo "
         "cannot)"),
    # FSDP2's CPUOffloadPolicy with MixedPrecisionPolicy(param_dtype=bf16) is not built by
    # strategies/parallelize.py
    Rule(lambda m, t, on: t.offload == "params" and t.precision == "amp-bf16",
         "amp-bf16 with parameter offload is not supported; use bf16-mixed or fp32"),
    # FSDP2 all-gathers one dtype per unit: fp32 adapters beside a 16-bit base, or a quantised
    # base's int8/uint8 pieces beside 16-bit norms, would need two
    Rule(lambda m, t, on: _lora(t) and t.zero_stage >= 2 and t.lora_dtype == "fp32",
         "fp32 adapters over a 16-bit base under FSDP2 (ZeRO-2/3) are not run yet (one dtype per all-gather); use "
         "--lora-dtype auto, or DDP/ZeRO-1"),
    Rule(lambda m, t, on: _lora(t) and t.zero_stage >= 2 and t.base != "bf16",
         "a {train.base} base under FSDP2 (ZeRO-2/3) is not run yet: FSDP2 all-gathers one dtype per unit; use "
         "--base-precision bf16 with zero2/zero3, or DDP/ZeRO-1 with a quantised base"),
    # strategies/lora.py FrozenProjection has no bias
    Rule(lambda m, t, on: _biased_frozen(m, t),
         "frozen (LoRA or quantised) projections with a bias are not implemented in the reference model"),
    # strategies/kernels/optim.py InBackwardOptimizer steps each gradient as autograd produces
    # it: no reduction across ranks, no offloaded state
    Rule(lambda m, t, on: t.optimizer_in_backward and (t.shard_world > 1 or t.tp > 1 or t.pp > 1
                                                        or t.offload != "none"),
         "--optimizer-in-backward runs on one process here (a data-parallel gradient must be reduced before its "
         "step); use --gpus 1"),
    # strategies/pipeline.py cuts the model into stages; a tied head would need the embedding's
    # weight on the last stage and its gradient summed with the first's
    Rule(lambda m, t, on: m.tied_embeddings and t.pp * t.chunks > 1,
         "tied embeddings across pipeline stages are not supported by the reference model; use an untied model "
         "such as tiny-llama"),
    # strategies/tensor_parallel.py shards the embedding row-wise and the head column-wise:
    # one tied weight cannot be both
    Rule(lambda m, t, on: m.tied_embeddings and t.tp > 1,
         "tensor parallelism with tied embeddings is not supported by the reference model ({model.name}); use an "
         "untied model such as tiny-llama"),
    Rule(lambda m, t, on: t.tp > 1 and t.sequence_parallel and m.position_embedding == "learned",
         "sequence parallelism with learned position embeddings is not supported by the reference model"),
    # stages exchange DTensors whose layouts a fake process group cannot carry
    Rule(lambda m, t, on: on.simulated and t.pp > 1 and t.tp > 1,
         "a simulated rank of pipeline x tensor parallelism is not run (its stages exchange DTensors whose layouts "
         "a fake process group cannot carry); simulate pp with --tp 1"),
    # torch.distributed.pipelining's Schedule1F1B raises with fewer micro-batches than stages
    Rule(lambda m, t, on: t.pp > 1 and t.schedule == "1f1b" and t.num_microbatches < t.pp,
         "1F1B needs at least pp = {train.pp} micro-batches per step, got {train.num_microbatches}; raise the global "
         "batch or use --schedule gpipe"),
    # strategies/kernels/optim.py's loss scaler steps around autograd's backward, which the
    # pipeline schedule runs inside its step
    Rule(lambda m, t, on: t.pp > 1 and t.precision == "fp16-mixed",
         "fp16-mixed loss scaling is not supported with pipeline parallelism; use bf16-mixed"),
    # strategies/tensor_parallel.py has no plan for the MoE block (torchtitan's: experts split on
    # their FFN without EP, tokens split over tp with it)
    Rule(lambda m, t, on: m.is_moe and t.tp > 1,
         "tensor parallelism of an MoE layer is planned by `plan`; the reference model's MoE block runs with --tp 1"),
    # strategies/tensor_parallel.py's plan names q, k, v: latent attention's projections are others
    Rule(lambda m, t, on: m.mla and t.tp > 1,
         "tensor parallelism of latent attention is planned by `plan`; the reference model runs it with --tp 1"),
    # the per-head q/k norms' weights see only a rank's heads under tensor parallelism: their
    # gradients would need a sum over the tensor-parallel group that strategies/tensor_parallel.py
    # does not make
    Rule(lambda m, t, on: m.qk_norm and t.tp > 1,
         "tensor parallelism of per-head q/k norms (qk_norm) is planned by `plan`; the reference model runs them "
         "with --tp 1"),
    Rule(lambda m, t, on: t.dp_shard > 0, "hybrid sharding (--dp-shard / --dp-replicate) is planned by `plan`; "
         "the strategy layer does not build HSDP's 2-D mesh yet"),
)
"""What ``run`` does not execute among what ``plan`` models, on a model the reference model builds."""


def layout_refusal(train) -> str | None:
    """Why ``plan`` does not model this layout whatever the model, or None."""
    return _first(LAYOUT_RULES, None, train, train)


def model_refusal(model, train) -> str | None:
    """Why ``plan`` does not model this layout of this model (the layout alone aside), or None."""
    return (architecture_refusal(model) or _first(MODEL_RULES, model, train, model, train)
            or (_first(MOE_RULES, model, train, model, train) if model.is_moe else None)
            or (_first(MLA_RULES, model, train, model, train) if model.mla else None))


def plan_refusal(model, train) -> str | None:
    """Why ``plan`` does not model this layout of this model, or None. A constructed
    ``TrainConfig`` already passed ``layout_refusal``."""
    return layout_refusal(train) or model_refusal(model, train)


def reference_model_refusal(model) -> str | None:
    """Why strategies/model.py's reference model cannot build this model, or None. It builds
    mixtures of experts (``MoE``), which ``run`` still refuses with ``plan`` (ARCHITECTURE_RULES);
    latent attention and attention sinks it does not build."""
    return _first((_SINKS_RULE, *REFERENCE_MODEL_RULES), model, None, model)


def run_refusal(model, train, *, cuda: bool = False, simulated: bool = False) -> str | None:
    """Why ``run`` (and ``profile``) does not execute this layout of this model, or None.
    ``cuda``: the ranks run on CUDA GPUs (else gloo on CPU); ``simulated``: one rank of a
    larger world on a fake process group (``profile --simulate-world``)."""
    return (plan_refusal(model, train) or reference_model_refusal(model)
            or _first(RUN_RULES, model, train, model, train, Host(cuda, simulated)))
