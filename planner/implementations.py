"""Whose model code runs the layers (``--impl``), and what that changes in what they save.

The same architecture saves different tensors for backward depending on the code that runs it:
a fused RMSNorm keeps its input and one fp32 statistic per token, Hugging Face's composite one
also keeps the normalised input; a model that returns its logits keeps them alive until the
caller drops its output; a GELU written as Python arithmetic saves every intermediate.
``planner/activations.py`` itemises each layer; this module says, per implementation, which
variant of each piece it runs, and which source line that follows. The numbers each variant
produces are checked against real runs of that code (tests/test_hf_clients.py for Hugging
Face, validation/ for the others).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

HF = "transformers 5.24.0"


@dataclass(frozen=True)
class Implementation:
    """One implementation's variants. The defaults are trainplan's reference model (fused
    kernels, nothing returned beside the loss): a record states only where it differs."""

    name: str
    title: str
    sources: tuple[tuple[str, str], ...]
    # RMSNorm: "fused" keeps (input, fp32 rstd); "hf" is transformers' composite
    # ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)``, which keeps the fp32 input (a
    # copy unless it is fp32 already), rstd and the normalised input in the input's dtype.
    # "composite" is torch's own rms_norm where no fused kernel runs (a CPU): it keeps the fp32
    # input, rstd and the fp32 normalised input (the weight multiplies it before the cast back).
    rmsnorm: Literal["fused", "hf", "composite"] = "fused"
    # RoPE's cos/sin: "cast-table" casts a [max positions, head_dim] fp32 table once per forward
    # (nothing to cast in fp32); "per-forward" builds [1, seq, head_dim] tables in the hidden
    # states' dtype every forward, which every layer's q * cos and k * sin keep.
    rope: Literal["cast-table", "per-forward"] = "cast-table"
    # eager attention's softmax: "compute" saves the probabilities in the compute dtype; "fp32"
    # runs it in fp32 (softmax(dtype=float32)) and keeps a compute-dtype copy for probs @ v.
    eager_softmax: Literal["compute", "fp32"] = "compute"
    # Python-composite activations are not fused: every intermediate is saved.
    composite_activations: tuple[str, ...] = ()
    # The model's forward returns logits (and a KV cache) that live until the caller drops the
    # output: counted at the end of forward, freed before backward in a plain training loop.
    returns_logits: bool = False
    kv_cache_in_training: bool = False
    # The loss runs inside the model's forward (trainplan's reference; transformers given
    # labels); False: the caller computes it from the returned logits after the forward ends
    loss_in_forward: bool = True
    # q, k and v come out of one projection (whatever the checkpoint's config says)
    fused_qkv: bool = False
    # RoPE's frequencies gathered by position per layer and forward (complex64, [b, s, 1, d/2]),
    # which q * freqs and k * freqs keep: 4 * head_dim bytes per token and layer
    rope_gathered_per_layer: bool = False
    # the gated MLP's activation fused into one op on the fc1 output (gate and up in one
    # tensor): it keeps that output and the product, not silu's output beside them
    fused_glu: bool = False
    # op-level checkpointing keeps the attention kernel's outputs (its save list names the
    # kernel the device runs)
    sac_saves_attention: bool = True
    # with pipeline parallelism, FSDP2 units are not resharded after forward: every unit stays
    # gathered from the step's first forward to its last backward (torchtitan's policy);
    # False: ZeRO-3 reshards after each forward, as fully_shard(reshard_after_forward=True) does
    keeps_units_gathered_with_pp: bool = False
    # whose MoE block: "reference" (strategies/model.py MoE) or "torchtitan" (0.3.0's MoE with
    # its LocalTokenDispatcher and GroupedExperts, planner/activations.py _torchtitan_moe_terms)
    moe: Literal["reference", "torchtitan", "hf"] = "reference"
    # the router's gate runs under torch.autocast(dtype=float32) (torchtitan on CUDA; CPU autocast
    # refuses float32 and runs the gate in the model's dtype)
    fp32_router_autocast: bool = False
    # what this implementation was checked against
    validated: str = ""


IMPLEMENTATIONS: dict[str, Implementation] = {
    "trainplan": Implementation(
        name="trainplan", title="trainplan's reference model (strategies/model.py)",
        sources=(
            ("RMSNorm saves (x, rstd)", "strategies/kernels/norm.py: _RMSNormFunction.forward"),
            ("RoPE tables cast once per forward", "strategies/model.py: Transformer.forward"),
        ),
        validated="validation/cpu.json and validation/gpu_h100.json (run, profile, simulated worlds)",
    ),
    "hf": Implementation(
        name="hf", title=f"Hugging Face transformers ({HF}), plain training loop",
        rmsnorm="hf", rope="per-forward", eager_softmax="fp32", composite_activations=("gelu_new", "gelu_fast"),
        returns_logits=True, kv_cache_in_training=True, moe="hf",
        sources=(
            ("RMSNorm upcasts to fp32 and keeps the normalised input",
             "transformers/models/llama/modeling_llama.py:62-67 (LlamaRMSNorm.forward)"),
            ("cos/sin built per forward, [1, seq, head_dim] in the hidden dtype",
             "transformers/models/llama/modeling_llama.py:110-116 (LlamaRotaryEmbedding.forward)"),
            ("eager softmax in fp32, cast back to the query's dtype; repeat_kv copies k and v",
             "transformers/models/llama/modeling_llama.py:190-202 (eager_attention_forward)"),
            ("SDPA with enable_gqa when there is no mask (no repeat_kv)",
             "transformers/integrations/sdpa_attention.py:42-51 (use_gqa_in_sdpa)"),
            ("a DynamicCache is built when use_cache (config default True), in training too",
             "transformers/models/llama/modeling_llama.py:374-375 (LlamaModel.forward)"),
            ("logits returned in the output; the loss upcasts them to fp32",
             "transformers/models/llama/modeling_llama.py:471-480; transformers/loss/loss_utils.py:61"),
            ("gelu_new is Python arithmetic (pow, tanh, add, mul)",
             "transformers/activations.py:65-66 (NewGELUActivation.forward)"),
        ),
        validated="tests/test_hf_clients.py: Llama, Qwen2, GPT-2 trained on CPU, measured by trainplan.track",
    ),
    "torchtitan": Implementation(
        name="torchtitan", title="torchtitan 0.3.0 Llama3Model / Qwen3Model (SDPA), trained by its Trainer",
        fused_qkv=True, rope_gathered_per_layer=True, returns_logits=True, loss_in_forward=False,
        keeps_units_gathered_with_pp=True, moe="torchtitan", fp32_router_autocast=True,
        sources=(
            ("with PP, FSDP does not reshard after forward ('to avoid per-microbatch all-gathers')",
             "torchtitan/distributed/fsdp.py get_fsdp_reshard_after_forward_policy, policy 'default' "
             "(torchtitan/parallelisms/parallelize_llama.py apply_fsdp at 9dec370, the Dec 2024 benchmarks)"),
            ("nn.RMSNorm runs aten._fused_rms_norm on CUDA: it keeps (input, fp32 rstd)",
             "torch/nn/functional.py rms_norm -> aten/src/ATen/native/layer_norm.cpp rms_norm_symint "
             "(on CPU it decomposes: fp32 input, rstd and x * rstd)"),
            ("one wqkv projection; q and k made new by RoPE, v by .contiguous()",
             "torchtitan/models/common/attention.py:830-852 (FusedQKVLinear, GQAttention.forward)"),
            ("RoPE's complex64 cache gathered by the trainer's positions, per layer",
             "torchtitan/models/common/rope.py:348-394 (_reshape_for_broadcast), :261-265 (apply_rotary_emb)"),
            ("Qwen3 (per-head q/k norms): the fp32 cos|sin cache [b, s, 1, 2 x head_dim] gathered per layer",
             "torchtitan/models/common/rope.py:268-346 (CosSinRoPE); models/qwen3/__init__.py:134-190"),
            ("SDPA with enable_gqa: k and v at kv width",
             "torchtitan/models/common/attention.py:414-447, :960"),
            ("the model returns the logits in the parameters' dtype; the trainer computes the loss from them "
             "after the forward and deletes them before backward",
             "torchtitan/models/common/decoder.py:224-248; torchtitan/trainer.py:814-828"),
            ("loss: cross_entropy on pred.float() (plain CrossEntropyLoss; the shipped configs' "
             "ChunkedLossWrapper is not modelled)", "torchtitan/components/loss.py:32-65"),
            ("op-level SAC: every second mm recomputed, counted per block from wqkv",
             "torchtitan/distributed/activation_checkpoint.py:210-278 (SelectiveAC)"),
            ("MoE: the gate under fp32 autocast, softmax/sigmoid scores, topk, gather, route_norm",
             "torchtitan/models/common/moe.py:284-342 (TokenChoiceTopKRouter.forward)"),
            ("MoE: argsort of the expert ids and the gathered rows (LocalTokenDispatcher, ep = 1)",
             "torchtitan/models/common/token_dispatcher.py:70-139"),
            ("MoE: grouped GEMMs on .bfloat16() casts of the rows and the weights",
             "torchtitan/models/common/moe.py:55-120 (GroupedExperts.forward)"),
            ("MoE: the experts' output up-cast to fp32 for the routing weights, scatter-added (indices kept)",
             "torchtitan/models/common/token_dispatcher.py:614-627; torchtitan/ops/scatter_add.py:10-48"),
        ),
        validated="per-block saved bytes of the source census (torchtitan 0.3.0 on CPU, fp32 and bf16) "
                  "with the CUDA RMSNorm, and its Qwen3-MoE model trained whole on CPU; not yet measured on a GPU",
    ),
    "megatron": Implementation(
        name="megatron", title="Megatron-Core with Transformer Engine (TE layers, fused RoPE and SwiGLU)",
        fused_qkv=True, fused_glu=True,
        sources=(
            ("LayerNormLinear keeps the norm input, its output and rsigma (the local shard with SP)",
             "transformer_engine/pytorch/module/layernorm_linear.py (_LayerNormLinear.forward, "
             "ctx.save_for_backward)"),
            ("fused RoPE keeps only the frequencies, shared by every layer",
             "megatron/core/models/common/embeddings/rope_utils.py (apply_rotary_pos_emb, fused)"),
            ("fused attention keeps q, k, v (kv width), the output and fp32 softmax statistics",
             "transformer_engine/pytorch/attention/dot_product_attention/backends.py (FusedAttnFunc)"),
            ("bias_swiglu keeps the fc1 output (gate and up) only; fc2 keeps its input",
             "megatron/core/fusions/fused_bias_swiglu.py (SwiGLUFunction.forward)"),
            ("Korthikanti et al. 2022 per-layer formula, GQA and SwiGLU terms",
             "arXiv:2205.05198, Section 4.1"),
        ),
        validated="source reading only: Transformer Engine needs CUDA, nothing measured",
    ),
}


# torchtitan's code on a CPU, where it runs other kernels than on CUDA (tests/test_torchtitan.py
# trains it on CPU and measures it with trainplan.track)
IMPLEMENTATIONS["torchtitan-cpu"] = replace(
    IMPLEMENTATIONS["torchtitan"], name="torchtitan-cpu", title="torchtitan 0.3.0 Llama3Model / Qwen3Model (SDPA) on a CPU",
    rmsnorm="composite", sac_saves_attention=False, fp32_router_autocast=False,
    sources=IMPLEMENTATIONS["torchtitan"].sources + (
        ("on CPU torch.rms_norm decomposes: _to_copy(fp32), pow, mean, add, rsqrt, mul, mul(weight), _to_copy",
         "aten/src/ATen/native/layer_norm.cpp rms_norm_symint (no CPU fused kernel in torch 2.13)"),
        ("SelectiveAC's save list has the CUDA attention kernels only: on CPU, "
         "_scaled_dot_product_flash_attention_for_cpu is recomputed",
         "torchtitan/distributed/activation_checkpoint.py:31-70 (_get_default_save_ops)"),
        ("CPU autocast refuses float32 ('the target dtype is not supported. Disabling autocast'): the MoE "
         "gate and its scores run in the model's dtype", "torch/amp/autocast_mode.py (CPU supported dtypes)"),
    ),
    validated="tests/test_torchtitan.py: torchtitan 0.3.0's own Llama3 and Qwen3-MoE models, SelectiveAC and FullAC, "
              "trained on CPU and measured by trainplan.track (fp32 and bf16)",
)


def implementation(name: str) -> Implementation:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"implementation {name!r} is not modelled yet") from None
