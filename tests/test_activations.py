"""Activation memory against Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (arXiv 2205.05198): Table 2, Eq. 1-6, sec. 4.2.3 and 4.3.

Their assumptions: GPT layers with 16-bit activations and 1-byte dropout masks, attention
without flash (the 5as^2b term), Megatron-LM's sequence parallelism (which keeps the
sequence-sharded input of column-parallel layers and re-gathers it in backward). Their 175B
model (Table 3): a = 96, h = 12288, L = 96, s = 2048, v = 51200, t = 8, p = 8, micro-batch 1,
global batch 64, interleaved with m = 3 chunks. Our itemisation also counts the fp32 norm
statistics (8 bytes per token per norm), which they omit; that stays far inside 1%.
"""

from __future__ import annotations

import pytest

from planner import activations as act
from planner.calibration import Overheads
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.memory import estimate_memory

GPT3 = load_model("gpt3-175b").model_copy(update={"vocab_size": 51200})
S, B, H, A, L, T, P = 2048, 1, 12288, 96, 96, 8, 8


def _train(**kw):
    base = dict(gpus=T * P, tp=T, pp=P, seq_len=S, micro_batch=B, global_batch=64, precision="bf16-mixed",
                attention="eager", engine="megatron")
    base.update(kw)
    return TrainConfig(**base)


def _close(ours, theirs, rel=0.01):
    assert ours == pytest.approx(theirs, rel=rel)


def test_no_parallelism_eq1():
    """Eq. 1: sbh(34 + 5as/h)."""
    train = _train(tp=1, pp=1, gpus=1, global_batch=1)
    _close(act.layer_bytes(GPT3, train), S * B * H * (34 + 5 * A * S / H))


def test_tensor_parallel_eq2():
    """Eq. 2: sbh(10 + 24/t + 5as/(ht))."""
    _close(act.layer_bytes(GPT3, _train()), S * B * H * (10 + 24 / T + 5 * A * S / (H * T)))


def test_tensor_sequence_parallel_eq4():
    """Eq. 4: sbh(34/t + 5as/(ht))."""
    _close(act.layer_bytes(GPT3, _train(sequence_parallel=True)), S * B * H * (34 / T + 5 * A * S / (H * T)))


def test_selective_recompute_table2():
    """Table 2: tensor parallel + selective sbh(10 + 24/t); + sequence parallel sbh(34/t)."""
    _close(act.layer_bytes(GPT3, _train(activation_checkpointing="selective")), S * B * H * (10 + 24 / T))
    _close(act.layer_bytes(GPT3, _train(activation_checkpointing="selective", sequence_parallel=True)),
           S * B * H * 34 / T)


def test_full_recompute_table2():
    """Table 2: full activation recomputation keeps 2sbh per layer (its input)."""
    assert act.layer_bytes(GPT3, _train(activation_checkpointing="full")) == 2 * S * B * H


def test_selective_saves_70_percent_for_gpt3():
    """Sec. 5: for GPT-3 5as/h = 80 and selective recompute saves 70% of activation memory."""
    assert 5 * A * S / H == 80
    full = act.layer_bytes(GPT3, _train(sequence_parallel=True))
    selective = act.layer_bytes(GPT3, _train(sequence_parallel=True, activation_checkpointing="selective"))
    assert 1 - selective / full == pytest.approx(0.70, abs=0.005)


def _first_stage_activations(**kw):
    est = estimate_memory(GPT3, load_gpu("a100-80gb"), _train(**kw), Overheads.none(), search_micro_batch=False)
    return est.stages[0].phases["forward"].activations


def test_first_stage_1f1b_eq5():
    """Sec. 4.2.3 / Eq. 5: under 1F1B the first stage holds p micro-batches x L/p layers = L
    layers' worth, (sbhL/t)(34 + 5as/h) with sequence parallelism, regardless of p. Sec. 4.3
    adds the embedding dropout mask sbhp/t (GPT-3 trains with dropout) and token ids, which
    their Eq. 5 neglects; we keep them and stay within 1%."""
    per_layer = S * B * H / T * (34 + 5 * A * S / H)
    _close(_first_stage_activations(sequence_parallel=True), per_layer * L)


def test_first_stage_interleaved():
    """Sec. 4.2.3: the interleaved schedule with m chunks makes the first stage hold
    L(1 + (p - 1)/(pm)) layers' worth: 96 x (1 + 7/24) = 124 layers for the 175B run (m = 3)."""
    per_layer = S * B * H / T * (34 + 5 * A * S / H)
    ours = _first_stage_activations(sequence_parallel=True, schedule="interleaved", chunks=3)
    _close(ours, per_layer * L * (1 + (P - 1) / (P * 3)))


def test_first_stage_selective_and_interleaved_eq6():
    """Eq. 6: with sequence parallelism and selective recompute, 34 sbhL/t, times the
    interleaving factor (1 + (p - 1)/(pm))."""
    ours = _first_stage_activations(sequence_parallel=True, activation_checkpointing="selective",
                                    schedule="interleaved", chunks=3)
    _close(ours, 34 * S * B * H * L / T * (1 + (P - 1) / (P * 3)))


def test_last_stage_output_terms_sec_4_3():
    """Sec. 4.3: the output layer norm 2sbh/t, output projection input 2sbh/t and fp32 cross
    entropy logits 4sbv/t together are 4sbh/t (1 + v/h)."""
    terms = act.head_terms(GPT3, _train(sequence_parallel=True))
    ours = terms["final_norm_input"] + terms["head_input"] + terms["log_softmax"]
    assert ours == 4 * S * B * H / T * (1 + 51200 / H)


def test_flash_attention_drops_the_s_squared_term():
    """Flash attention saves q, k, v, the output and an fp32 log-sum-exp per head and token
    instead of 5as^2b of scores, softmax, dropout mask and dropout output."""
    eager = act.layer_terms(GPT3, _train(attention="eager"))
    flash = act.layer_terms(GPT3, _train(attention="flash"))
    s2 = A // T * S * S * B
    assert eager["attn_softmax"] + eager["attn_softmax_dropout_mask"] + eager["attn_softmax_dropout_out"] == 5 * s2
    assert "attn_softmax" not in flash
    assert flash["attn_logsumexp"] == 4 * S * B * A // T
    assert sum(eager.values()) - sum(flash.values()) == 5 * s2 - 4 * S * B * A // T


def test_swiglu_and_gqa_terms():
    """A Llama-3-8B layer (GQA 32/8 heads, SwiGLU ffn 14336), bf16, flash, no dropout: saved
    tensors are 8 h-sized (norm inputs and outputs, q, out; k, v at kv width) and four
    ffn-sized tensors per token."""
    model = load_model("llama-3-8b")
    train = TrainConfig(gpus=1, seq_len=1024, micro_batch=2)
    tokens = 1024 * 2
    h, kv, f = 4096, 1024, 14336
    expected = 2 * tokens * (6 * h + 2 * kv + 4 * f) + 2 * 4 * tokens + 4 * tokens * 32
    assert act.layer_bytes(model, train) == expected


def test_pytorch_sequence_parallel_saves_gathered_linear_inputs():
    """DTensor's ColwiseParallel after SequenceParallel saves the all-gathered (full-sequence)
    input; Megatron saves the shard. Two h-sized tensors per layer (q/k/v input and MLP input)
    differ by a factor t."""
    megatron = act.layer_terms(GPT3, _train(sequence_parallel=True))
    pytorch = act.layer_terms(GPT3, _train(sequence_parallel=True, engine="pytorch"))
    assert pytorch["attn_qkv_input"] == T * megatron["attn_qkv_input"]
    assert pytorch["mlp_input"] == T * megatron["mlp_input"]


def test_inflight_microbatches():
    """GPipe holds all m micro-batches; 1F1B stage r holds min(p - r, m)."""
    t = _train(schedule="gpipe")
    assert act.inflight(t, 0)[0] == 64
    t = _train()
    assert [act.inflight(t, r)[0] for r in range(P)] == [8, 7, 6, 5, 4, 3, 2, 1]
    t = _train(global_batch=4)
    assert act.inflight(t, 0)[0] == 4


def test_rope_tables_cast_once_per_forward():
    """The reference model casts its fp32 RoPE tables ([positions, 1, head_dim], cos and sin)
    to the compute dtype once per forward, and q * cos saves the cast: llama-3.2-1b supports
    131,072 positions, 2 x 131072 x 64 x 2 B = 32 MiB -- the 0.4% by which the H100 1B bf16 runs'
    activations exceeded the prediction (validation/gpu_h100.json). fp32 casts nothing."""
    from planner.activations import rope_table_bytes

    model = load_model("llama-3.2-1b")
    assert rope_table_bytes(model, _train(precision="bf16-mixed", seq_len=2048)) == 32 * 2**20
    assert rope_table_bytes(model, _train(precision="fp32", seq_len=2048)) == 0
    assert rope_table_bytes(load_model("gpt2"), _train(precision="bf16-mixed", seq_len=1024)) == 0


@pytest.mark.parametrize("dtype, fp32_tensors", [("bfloat16", 6), ("float32", 4)])
def test_rmsnorm_backward_working_set_is_measured(dtype, fp32_tensors):
    """The fused RMSNorm's backward (strategies/kernels/norm.py) at its peak, traced with
    torch's MemTracker: its new allocations are ``_norm_backward_fp32`` hidden-sized fp32
    tensors (six from a bf16 residual stream, whose input and gradient it copies to fp32;
    four from an fp32 one), plus the few bytes of the weight's gradient."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from strategies.kernels.norm import rms_norm

    tokens, hidden = 64, 256
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(tokens, hidden, dtype=torch_dtype, requires_grad=True)
    weight = torch.ones(hidden, dtype=torch_dtype, requires_grad=True)
    y = rms_norm(x, weight)
    grad = torch.randn_like(y)
    tracker = MemTracker()
    with tracker:
        y.backward(grad)
        peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    model = load_model("tiny-llama")
    train = TrainConfig(gpus=1, precision="fp32" if dtype == "float32" else "bf16-mixed", zero_stage=3)
    assert act._norm_backward_fp32(model, act._dims(model, train)) == fp32_tensors
    fp32_tensor = 4 * tokens * hidden
    assert fp32_tensors * fp32_tensor <= peak < fp32_tensors * fp32_tensor + 8 * hidden


def _block_bytes_per_token(impl: str, ac: str = "none") -> tuple[float, object]:
    model = load_model("llama-3-8b")
    train = TrainConfig(gpus=8, zero_stage=3, precision="bf16-mixed", micro_batch=1, seq_len=8192, impl=impl,
                        activation_checkpointing=ac)
    return sum(act.layer_terms(model, train).values()) / 8192, model


def test_torchtitan_block_follows_its_source_census():
    # torchtitan 0.3.0 Llama3Model, bf16, traced tensor by tensor on CPU (docs/implementations.md):
    # 24D + 4*nkv*hd + 4*nh + 8 + 8H + 4hd bytes per token, of which two composite CPU RMSNorms
    # account for 2 x (8D + 4). On CUDA nn.RMSNorm runs aten._fused_rms_norm, which keeps the
    # bf16 input and an fp32 rstd (2D + 4 each): 12D + ... on the GPU the planner plans.
    per_token, m = _block_bytes_per_token("torchtitan")
    D, H, nh, nkv, hd = m.hidden_size, m.ffn_hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
    cpu_census = 24 * D + 4 * nkv * hd + 4 * nh + 8 + 8 * H + 4 * hd
    assert per_token == cpu_census - 2 * (8 * D + 4) + 2 * (2 * D + 4)
    # the RoPE gather (4 hd) is what it saves beyond trainplan's reference block
    assert per_token - _block_bytes_per_token("trainplan")[0] == 4 * hd


def test_torchtitan_op_level_policy_counts_matmuls_from_its_fused_wqkv():
    # torchtitan's SelectiveAC on a block with one wqkv projection: mm wqkv saved, wo recomputed,
    # w1 saved, w3 recomputed, w2 saved (census of its policy on CPU); on the GPU the flash
    # kernel's output and log-sum-exp are in its save list too. Plus the block's input.
    per_token, m = _block_bytes_per_token("torchtitan", "op")
    D, H, nh, nkv, hd = m.hidden_size, m.ffn_hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
    assert per_token == 2 * D + 2 * (nh + 2 * nkv) * hd + 2 * H + 2 * D + (2 * D + 4 * nh)


def test_megatron_block_is_korthikanti_with_te_and_fused_swiglu():
    # Megatron-Core + Transformer Engine, no sequence parallelism: norm input 2h and rsigma 4
    # and ln_out 2h per LayerNormLinear, q 2h, k and v 4 h_kv, output 2h, fp32 softmax stats
    # 4a; bias_swiglu keeps the fc1 output (4f) and fc2 its input (2f):
    # 12h + 4 h_kv + 6f + 4a + 8 bytes per token (Korthikanti et al. 2022, Sec. 4.1, with
    # GQA and SwiGLU; source lines in planner/implementations.py).
    per_token, m = _block_bytes_per_token("megatron")
    h, f, a, h_kv = m.hidden_size, m.ffn_hidden_size, m.num_heads, m.num_kv_heads * m.head_dim
    assert per_token == 12 * h + 4 * h_kv + 6 * f + 4 * a + 8
