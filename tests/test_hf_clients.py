"""Real clients: Hugging Face ``transformers`` models trained with a plain loop, measured by
``trainplan.track`` and compared with the planner's ``--impl hf`` prediction of the run it saw.

Every saved tensor the prediction counts is itemised with the transformers source line it
follows in ``planner/implementations.py``. Dropout is 0: on CPU a dropout mask is a
compute-dtype tensor, not CUDA's 1-byte one, and SDPA with dropout leaves the fused kernel for
the math path, so a CPU measurement with dropout would not say what a GPU run saves.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import transformers  # a test dependency (.[test]): these tests run in CI, never skip

import trainplan
from planner.catalog import load_model
from planner.params import total_params

# Small enough for CI, big enough that the activations (not fixed costs) dominate the peak.
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 688, 2, 8, 2, 1024
BATCH, SEQ = 2, 256


def _model(arch: str, attn: str):
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                       max_position_embeddings=1024, attn_implementation=attn)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                       max_position_embeddings=1024, attn_implementation=attn)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=1024,
                                  attn_implementation=attn, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _train(model, precision: str, steps: int = 3):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "amp-bf16" else contextlib.nullcontext
    losses = []
    with trainplan.track(model, optimizer) as tracker:
        for _ in range(steps):
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return tracker, losses


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_hugging_face_model_matches_its_hf_prediction(arch, attn, precision):
    # Acceptance (issue 11): activations within 3%, peak within 2%. Measured when written:
    # every combination within 0.02% (transformers 5.24.0, torch 2.13 CPU).
    torch.manual_seed(0)
    model = _model(arch, attn)
    model.train()
    tracker, losses = _train(model, precision)
    spec, train = tracker.observed()
    assert (train.impl, train.micro_batch, train.seq_len, train.precision) == ("hf", BATCH, SEQ, precision)
    assert train.attention == ("flash" if attn == "sdpa" else "eager")
    assert train.optimizer_impl == "for-loop"  # torch's default on CPU
    assert total_params(spec) == sum(p.numel() for p in model.parameters())
    report = tracker.compare()
    rows = {row.quantity: row for row in report.rows}
    for quantity, tolerance in (("activations", 1.0), ("peak (allocated)", 1.0)):
        row = rows[quantity]
        assert abs(row.error_pct) < tolerance, (quantity, row.predicted, row.measured, row.error_pct)
    assert all(a == a for a in losses)  # it trained: finite losses


def test_tracker_refuses_to_guess_for_a_plain_module():
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    with trainplan.track(model, optimizer) as tracker:
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
    with pytest.raises(ValueError, match="Hugging Face model"):
        tracker.compare()


# Real config.json key styles, one per family (values from the models' published config.json
# on the Hugging Face Hub; only the keys the planner reads).
CONFIGS = {
    "llama-3-8b": ({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False},
                   8_030_261_248),
    "mistral-7b": ({"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": False},
                   7_241_732_096),
    "qwen2-7b": ({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                  "max_position_embeddings": 131072, "hidden_act": "silu", "tie_word_embeddings": False},
                 7_615_616_512),
    "qwen3-8b": ({"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                  "max_position_embeddings": 40960, "hidden_act": "silu", "tie_word_embeddings": False,
                  "attention_bias": False},
                 8_190_735_360),
    "gemma-2b": ({"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                  "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000,
                  "max_position_embeddings": 8192, "hidden_act": "gelu_pytorch_tanh"},
                 2_506_172_416),
    "phi-3-mini": ({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False},
                   3_821_079_552),
    "gpt2": ({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
              "n_positions": 1024, "activation_function": "gelu_new"},
             124_439_808),
    "pythia-1b": ({"model_type": "gpt_neox", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                   "num_attention_heads": 8, "vocab_size": 50304, "max_position_embeddings": 2048,
                   "hidden_act": "gelu", "rotary_pct": 1.0, "use_parallel_residual": False,
                   "tie_word_embeddings": False},
                  1_011_781_632),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_json_of_each_family_gives_the_published_parameter_count(name, tmp_path):
    # Parameter counts: the models' cards / safetensors metadata on the Hugging Face Hub
    # (Llama-3-8B 8.03B, Mistral-7B-v0.1 7.24B, Qwen2-7B 7.62B, Qwen3-8B 8.19B, Gemma-2B 2.51B,
    # Phi-3-mini 3.82B, GPT-2 124.4M, Pythia-1B 1.01B -- Pythia's own config runs attention and MLP in
    # parallel with a quarter of each head rotary, which the planner refuses; the sequential,
    # fully rotary variant has the same parameters).
    cfg, params = CONFIGS[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = load_model(str(path))
    assert total_params(spec) == params, (name, total_params(spec))
    # and transformers' own model of that config, built on the meta device, agrees
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in model.parameters()) == params


def test_family_specific_keys_are_read(tmp_path):
    def spec(name):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(CONFIGS[name][0]))
        return load_model(str(path))

    assert spec("qwen3-8b").qk_norm and not spec("llama-3-8b").qk_norm
    assert spec("phi-3-mini").fused_qkv and spec("gpt2").fused_qkv and not spec("mistral-7b").fused_qkv
    assert spec("qwen2-7b").qkv_bias and not spec("llama-3-8b").qkv_bias
    assert spec("gemma-2b").tied_embeddings and spec("gemma-2b").mlp == "geglu" and spec("gemma-2b").head_dim == 256
    assert spec("gpt2").activation == "gelu_new" and spec("gpt2").norm == "layernorm"


def test_a_mixture_of_experts_config_is_read_and_planned_with_its_experts(tmp_path):
    """A Mixtral config is read (its experts counted: tests/test_moe.py) and planned with its
    experts, as the reference MoE block and as transformers' grouped_mm experts run it -- never as
    a dense Mistral; as Megatron-Core runs it (--impl megatron) it is refused in one line."""
    from pathlib import Path

    from planner import activations as act
    from planner.configs import TrainConfig, check_layout
    from planner.errors import LayoutError

    model = load_model(str(Path(__file__).parent.parent / "validation" / "hf_configs" / "mixtral-8x7b.json"))
    assert model.num_experts == 8 and model.experts_per_token == 2
    train = TrainConfig(gpus=8)
    check_layout(model, train)
    assert "moe_router_probs" in act.layer_terms(model, train, "moe")
    hf = TrainConfig(gpus=8, impl="hf")
    check_layout(model, hf)
    assert "moe_gate_up_out" in act.layer_terms(model, hf, "moe")  # transformers' fused gate and up
    with pytest.raises(LayoutError, match="mixture of experts"):
        check_layout(model, TrainConfig(gpus=8, impl="megatron"))
