"""FLOP counts against published formulas."""

from __future__ import annotations

import pytest

from planner.catalog import load_model
from planner.configs import ModelSpec, TrainConfig
from planner.flops import (
    hardware_flops_per_step,
    model_flops_per_step,
    model_flops_per_token,
    stage_flops,
)
from planner.params import total_params


def _gpt(h, a, layers, vocab=51200):
    return ModelSpec(name="gpt", num_layers=layers, hidden_size=h, num_heads=a, ffn_hidden_size=4 * h,
                     vocab_size=vocab, mlp="gelu", norm="layernorm", position_embedding="learned",
                     max_position_embeddings=2048, linear_bias=True)


def test_nanogpt_mfu_accounting_for_gpt2():
    """nanoGPT ``estimate_mfu`` (model.py): flops per token = 6N + 12 L H Q T with N the
    parameters less the position embedding, here 6 x 123,653,376 + 12 x 12 x 12 x 64 x 1024 =
    855,166,464. We count matmul weights only (nanoGPT also counts each bias and norm weight as
    6 FLOPs, 121,344 parameters), so we are lower by 6 x 121,344: 0.085%."""
    ours = model_flops_per_token(load_model("gpt2"), 1024, causal=False)
    nanogpt = 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024
    assert nanogpt == 855_166_464
    assert ours == nanogpt - 6 * 121_344
    assert ours == pytest.approx(nanogpt, rel=1e-3)


def test_kaplan_six_n_for_large_models():
    """Kaplan et al. 2020 (sec. 2.1): C ~ 6N per token, the attention term 12 L h s being a
    fraction s/(6h) of it. Llama-2-70B: 6N + 12 L h s within 1% at seq 4096 (the rest: the
    untied input embedding is a lookup, not a matmul), and 6N alone within 3% at seq 1024."""
    model = load_model("llama-2-70b")
    six_n = 6 * total_params(model)
    attention = 12 * model.num_layers * model.hidden_size * 4096
    assert model_flops_per_token(model, 4096, causal=False) == pytest.approx(six_n + attention, rel=0.01)
    assert model_flops_per_token(model, 1024, causal=False) == pytest.approx(six_n, rel=0.03)
    # the causal count charges half the attention term
    causal = model_flops_per_token(model, 4096)
    assert causal == pytest.approx(model_flops_per_token(model, 4096, causal=False) - attention / 2, rel=1e-9)


def test_korthikanti_eq7_model_flops():
    """Korthikanti et al. 2022 Eq. 7: model FLOPs = 72 B L s h^2 (1 + s/(6h) + v/(12hL)), GPT-3
    175B (h 12288, L 96, s 2048, v 51200), B = 64: equal up to the QKV/MLP biases, which Eq. 7
    omits too (exact match)."""
    model = _gpt(12288, 96, 96)
    train = TrainConfig(gpus=64, tp=8, pp=8, seq_len=2048, global_batch=64)
    B, L, s, h, v = 64, 96, 2048, 12288, 51200
    eq7 = 72 * B * L * s * h * h * (1 + s / (6 * h) + v / (12 * h * L))
    assert model_flops_per_step(model, train, causal=False) == pytest.approx(eq7, rel=1e-9)


def test_narayanan_eq3_hardware_flops_with_full_recompute():
    """Narayanan et al. 2021 Eq. 3: with activation recomputation F = 96 B s l h^2 (1 + s/(6h) +
    V/(16 l h)) -- four forward passes of the layers, three of the logits."""
    model = _gpt(25600, 160, 128)
    train = TrainConfig(gpus=512, tp=8, pp=64, seq_len=2048, global_batch=3072, activation_checkpointing="full")
    B, s, l, h, V = 3072, 2048, 128, 25600, 51200
    eq3 = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert hardware_flops_per_step(model, train, causal=False) == pytest.approx(eq3, rel=1e-9)


def test_executed_flops_skip_the_causal_half_with_flash():
    model = load_model("llama-2-7b")
    flash = stage_flops(model, TrainConfig(gpus=1, seq_len=4096, attention="flash"), 0)
    eager = stage_flops(model, TrainConfig(gpus=1, seq_len=4096, attention="eager"), 0)
    square = 4 * 4096 * 4096 * 4096 * model.num_layers  # 4 s^2 a d per layer
    assert eager.forward - flash.forward == pytest.approx(square / 2)


def test_recompute_flops():
    model = load_model("llama-2-7b")
    base = TrainConfig(gpus=1, seq_len=2048)
    assert stage_flops(model, base, 0).recompute == 0
    full = stage_flops(model, base.model_copy(update={"activation_checkpointing": "full"}), 0)
    head = 2 * 2048 * 32000 * 4096
    assert full.recompute == pytest.approx(full.forward - head)


@pytest.mark.parametrize("attention", ["flash", "eager"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_model_flops_never_exceed_executed(attention, checkpointing):
    """Issue 10: MFU above 100% is impossible. tiny-llama at seq 4096 is all attention; causal
    model FLOPs stay at or below what the kernels execute (flash: half the square forward,
    2.5x that backward; eager: the whole square), hardware FLOPs likewise."""
    model = load_model("tiny-llama")
    train = TrainConfig(gpus=1, seq_len=4096, attention=attention, activation_checkpointing=checkpointing)
    executed = stage_flops(model, train, 0)
    assert model_flops_per_step(model, train) <= executed.forward + executed.backward
    assert hardware_flops_per_step(model, train) <= executed.total
