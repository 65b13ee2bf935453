"""Real client: torchtitan 0.3.0's own Llama3 model, checkpointed by torchtitan's own policies,
trained with the loop of its trainer (``Trainer._forward_backward_body``: logits out of the model,
``cross_entropy_loss`` on them, ``del pred``, backward), measured by ``trainplan.track`` and
compared with the planner's ``--impl torchtitan-cpu`` prediction.

On a CPU torchtitan runs other kernels than on CUDA: ``torch.rms_norm`` decomposes into
fp32 ops (no fused CPU kernel in torch 2.13) and SelectiveAC's save list names only the CUDA
attention kernels, so the CPU attention is recomputed. ``planner/implementations.py`` records
both, with their source lines; ``--impl torchtitan`` is the CUDA variant.

torchtitan 0.3.0 ships flex and varlen attention for its Llama3 registry, neither of which
trains on CPU (flex has no CPU backward, varlen calls the CUDA flash kernel); its
``ScaledDotProductAttention`` inner attention does, and is swapped in as the trainer supports
(positions passed, no mask). torchtitan 0.3.0 has no layer-level selective checkpointing; its
older releases' ``selective_ac_option="2"`` (every second block fully checkpointed) is applied
with its own FullAC wrapper.
"""

from __future__ import annotations

import sys

import pytest

if sys.version_info < (3, 11):  # torchtitan 0.3.0 requires Python 3.11; CI runs 3.11 and imports it
    pytest.skip("torchtitan 0.3.0 needs Python >= 3.11", allow_module_level=True)

import torch
from torchtitan.components.loss import cross_entropy_loss  # a test dependency (.[test])
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import _EMBEDDING_INIT, _NORM_INIT, _build_llama3_layers, _output_linear_init
from torchtitan.models.llama3.model import Llama3Model
from torchtitan.tools.utils import set_default_dtype

import trainplan
from planner.catalog import load_gpu, model_from_hf_dict
from planner.configs import TrainConfig
from planner.estimate import estimate
from planner.implementations import implementation
from planner.params import total_params

DIM, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, BATCH = 256, 4, 8, 2, 1024, 256, 2
FFN = compute_ffn_hidden_dim(DIM, multiple_of=256)


def _build(config, dtype: torch.dtype, ac: str):
    """Built as torchtitan's trainer builds it (trainer.py: meta device under the training
    dtype, to_empty, init_weights), with its activation checkpointing applied."""
    torch.manual_seed(0)
    with torch.device("meta"), set_default_dtype(dtype):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    if ac == "op":
        SelectiveAC(SelectiveAC.Config()).apply(model)
    elif ac == "full":
        FullAC(FullAC.Config()).apply(model)
    elif ac.startswith("layer:"):
        every, policy = int(ac.split(":")[1]), FullAC(FullAC.Config())
        blocks = model.get_submodule("layers")
        for name, block in list(blocks.named_children()):
            if (int(name) + 1) % every == 0:
                blocks.register_module(name, policy._wrap_block(block))
    return model


def _model(dtype: torch.dtype, ac: str) -> Llama3Model:
    layers = _build_llama3_layers(
        fuse_qkv=True, n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, hidden_dim=FFN,
        rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=SEQ, theta=500000, scaling="llama"),
        attn_backend="flex")
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_output_linear_init(DIM)))
    return _build(config, dtype, ac)


# torchtitan's Qwen3-MoE registry at test size: per-head q/k norms, cos/sin RoPE, every layer an
# MoE of EXPERTS experts (softmax router, route_norm, load_balance_coeff 1e-3) of which TOP_K
EXPERTS, TOP_K, MOE_FFN, QWEN_HEAD = 8, 2, 128, 32


def _qwen3_moe_model(dtype: torch.dtype, ac: str):
    from torchtitan.models.qwen3 import _build_qwen3_moe_layers, _qwen3_norm
    from torchtitan.models.qwen3 import _EMBEDDING_INIT as QWEN_EMBEDDING_INIT
    from torchtitan.models.qwen3 import _LINEAR_INIT as QWEN_LINEAR_INIT
    from torchtitan.models.qwen3.model import Qwen3Model

    layers = _build_qwen3_moe_layers(
        n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=QWEN_HEAD, moe_hidden_dim=MOE_FFN,
        num_experts=EXPERTS, top_k=TOP_K, attn_backend="flex", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=QWEN_HEAD, max_seq_len=SEQ, theta=1e6))
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = Qwen3Model.Config(
        vocab_size=VOCAB, dim=DIM, norm=_qwen3_norm(DIM), layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=QWEN_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=QWEN_LINEAR_INIT))
    return _build(config, dtype, ac)


def _spec(family: str = "llama3"):
    if family == "qwen3-moe":
        return model_from_hf_dict(
            dict(model_type="qwen3_moe", hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=QWEN_HEAD, vocab_size=VOCAB,
                 max_position_embeddings=SEQ, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=MOE_FFN, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[]),
            "torchtitan", "torchtitan 0.3.0 Qwen3Model, MoE (test)")
    return model_from_hf_dict(
        dict(model_type="llama", hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=SEQ,
             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "torchtitan", "torchtitan 0.3.0 Llama3Model (test)")


def _measure(precision: str, ac: str, family: str = "llama3"):
    build = _qwen3_moe_model if family == "qwen3-moe" else _model
    model = build(torch.float32 if precision == "fp32" else torch.bfloat16, ac)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ).contiguous()  # the trainer passes them
    losses = []
    with trainplan.track(model, optimizer) as tracker:
        for _ in range(3):
            pred = model(tokens, positions=positions)
            loss = cross_entropy_loss(pred, labels) / labels.numel()
            del pred
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    train = TrainConfig(gpus=1, precision=precision, micro_batch=BATCH, global_batch=BATCH, seq_len=SEQ,
                        attention="flash", optimizer_impl="for-loop", impl="torchtitan-cpu",
                        activation_checkpointing=ac)
    return tracker, train, losses, model


def _compare(precision: str, ac: str, family: str = "llama3"):
    tracker, train, losses, model = _measure(precision, ac, family)
    report = tracker.compare(estimate(_spec(family), load_gpu("h100"), train))
    return {row.quantity.split(" (")[0]: row for row in report.rows}, losses, model


# The acceptance's policies; every policy in fp32 and bf16 is in validation/clients.json,
# re-predicted in CI by the README check (bf16 matmuls are slow on a CPU)
@pytest.mark.parametrize("precision,ac", [("fp32", "op"), ("fp32", "layer:2"), ("bf16", "op")])
def test_torchtitan_llama3_measured_against_the_plan(precision, ac):
    """Issue 11's goal: activations within 3%, peak within 2% (measured: within 0.8%)."""
    rows, losses, model = _compare(precision, ac)
    assert sum(p.numel() for p in model.parameters()) == total_params(_spec())
    for key in ("params", "grads", "optimizer"):
        assert rows[key].predicted == rows[key].measured, key
    assert abs(rows["activations"].error_pct) < 3, rows["activations"]
    assert abs(rows["peak"].error_pct) < 2, rows["peak"]
    assert losses[-1] < losses[0]


def test_cpu_variant_differs_from_cuda_only_where_the_kernels_do():
    cuda, cpu = implementation("torchtitan"), implementation("torchtitan-cpu")
    assert (cuda.rmsnorm, cpu.rmsnorm) == ("fused", "composite")
    assert cuda.sac_saves_attention and not cpu.sac_saves_attention
    assert not cuda.loss_in_forward and cuda.returns_logits
    # and the MoE gate: CUDA autocast runs it in fp32, CPU autocast refuses float32
    assert cuda.fp32_router_autocast and not cpu.fp32_router_autocast
    assert {f for f in cuda.__dataclass_fields__ if getattr(cuda, f) != getattr(cpu, f)} == {
        "name", "title", "rmsnorm", "sac_saves_attention", "fp32_router_autocast", "sources", "validated"}


@pytest.mark.parametrize("precision,ac", [("fp32", "none"), ("fp32", "full"), ("bf16", "layer:2"), ("bf16", "op")])
def test_torchtitan_qwen3_moe_measured_against_the_plan(precision, ac):
    """Issue 24's real client: torchtitan 0.3.0's own Qwen3-MoE model (its registry's layers: fused
    qkv, per-head q/k norms, cos/sin RoPE, softmax router with route_norm, LocalTokenDispatcher,
    GroupedExperts), checkpointed by torchtitan's own wrappers (SelectiveAC keeps the top-k and
    every other matmul, the router's gate among them) and trained with its trainer's loop,
    against ``--impl torchtitan-cpu``: parameters, gradients and optimizer state exact, activations
    within 3%, peak within 2%. (The trainer's load-balancing pre-step hook, which updates an
    [experts] buffer per layer, is not installed: it needs its optimizer container.)"""
    rows, losses, model = _compare(precision, ac, "qwen3-moe")
    assert sum(p.numel() for p in model.parameters()) == total_params(_spec("qwen3-moe"))
    for key in ("params", "grads", "optimizer"):
        assert rows[key].predicted == rows[key].measured, key
    assert abs(rows["activations"].error_pct) < 3, rows["activations"]
    assert abs(rows["peak"].error_pct) < 2, rows["peak"]
    assert losses[-1] < losses[0]
