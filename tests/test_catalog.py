"""Presets, aliases and Hugging Face config.json files."""

from __future__ import annotations

import json

import pytest

from planner import catalog
from planner.errors import ConfigFileError, UnknownPresetError
from planner.params import total_params


@pytest.mark.parametrize(("alias", "preset"), [("7b", "llama-2-7b"), ("8b", "llama-3-8b"), ("70b", "llama-2-70b"),
                                               ("13b", "llama-2-13b"), ("405b", "llama-3.1-405b"),
                                               ("175b", "gpt3-175b"), ("11b", "cpm-2"), ("LLAMA-2-7B", "llama-2-7b")])
def test_size_aliases(alias, preset):
    assert catalog.load_model(alias).name == preset


def test_required_presets_exist():
    models = {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-405b",
              "qwen1.5-7b", "mistral-7b", "gpt2", "gpt2-xl", "gpt3-175b", "bloom-176b", "cpm-2"}
    gpus = {"a100-40gb", "a100-80gb", "h100-sxm-80gb", "h100-pcie", "h200", "v100-16gb", "v100-32gb", "a10", "l40s",
            "rtx-3090", "rtx-4090", "gtx-1060-6gb"}
    assert models <= set(catalog.model_ids())
    assert gpus <= set(catalog.gpu_ids())
    for name in catalog.model_ids() + catalog.gpu_ids():
        assert name == name.lower() and " " not in name and "_" not in name


def test_unknown_model_suggests():
    with pytest.raises(UnknownPresetError, match=r"unknown model 'lama-2-7b'; did you mean 'llama-2-7b'") as info:
        catalog.load_model("lama-2-7b")
    assert "trainplan presets" in str(info.value)
    with pytest.raises(UnknownPresetError, match=r"^unknown model 'zzzz' \(see"):
        catalog.load_model("zzzz")


def test_gpu_aliases():
    assert catalog.load_gpu("h100").memory_bytes == 81559 * 2**20
    assert catalog.load_gpu("a10").peak_tflops.int8 == 250  # seed: A10 INT8 250 TOPS
    assert catalog.load_gpu("a10").peak_tflops.fp32 == pytest.approx(31, abs=0.5)  # seed: FP32 31 TFLOPS


def _write(tmp_path, cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_hf_llama_config(tmp_path):
    """Llama-2-7b-hf config.json keys; 6,738,415,616 parameters."""
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "hidden_act": "silu",
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    assert total_params(catalog.load_model(_write(tmp_path, cfg))) == 6_738_415_616


def test_hf_mistral_config(tmp_path):
    """mistralai/Mistral-7B-v0.1 config.json: 7,241,732,096 parameters."""
    cfg = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000, "hidden_act": "silu",
           "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False}
    assert total_params(catalog.load_model(_write(tmp_path, cfg))) == 7_241_732_096


def test_hf_qwen2_config_has_qkv_bias(tmp_path):
    """Qwen/Qwen2-7B config.json (q, k, v biases are hard-coded in modeling_qwen2.py):
    7,615,616,512 parameters."""
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064, "hidden_act": "silu",
           "max_position_embeddings": 131072, "tie_word_embeddings": False}
    assert total_params(catalog.load_model(_write(tmp_path, cfg))) == 7_615_616_512


def test_hf_gpt2_config(tmp_path):
    """openai-community/gpt2 config.json (n_inner null = 4 x n_embd, tied): 124,439,808."""
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
           "n_inner": None, "vocab_size": 50257, "activation_function": "gelu_new"}
    assert total_params(catalog.load_model(_write(tmp_path, cfg))) == 124_439_808


def test_hf_gpt_neox_config(tmp_path):
    """EleutherAI/pythia-160m config.json (GPT-NeoX, untied, biases): 162,322,944 parameters --
    its blocks run attention and MLP in parallel with a quarter of each head rotary, which the
    planner does not model and refuses by name; the sequential, fully rotary variant is read."""
    cfg = {"model_type": "gpt_neox", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
           "num_hidden_layers": 12, "vocab_size": 50304, "rotary_pct": 0.25, "use_parallel_residual": True,
           "max_position_embeddings": 2048, "tie_word_embeddings": False}
    with pytest.raises(ConfigFileError, match="use_parallel_residual"):
        catalog.load_model(_write(tmp_path, cfg))
    with pytest.raises(ConfigFileError, match="rotary_pct"):
        catalog.load_model(_write(tmp_path, cfg | {"use_parallel_residual": False}))
    sequential = cfg | {"use_parallel_residual": False, "rotary_pct": 1.0}
    assert total_params(catalog.load_model(_write(tmp_path, sequential))) == 162_322_944


def test_malformed_config_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigFileError, match="not valid JSON"):
        catalog.load_model(str(bad))
    with pytest.raises(ConfigFileError, match="lacks 'num_attention_heads'"):
        catalog.load_model(_write(tmp_path, {"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigFileError, match="does not exist"):
        catalog.load_model(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigFileError, match="num_layers: Input should be greater than 0"):
        catalog.load_model(_write(tmp_path, {"model_type": "llama", "hidden_size": 64, "intermediate_size": 1,
                                             "num_attention_heads": 4, "num_hidden_layers": -2, "vocab_size": 10}))


def test_gpus_people_run_on_have_presets_with_sources_and_chips():
    """Issue 9, item 6: each preset names its source and its chip (for calibration by chip)."""
    wanted = ["h100-nvl", "h100-sxm-96gb", "h20", "gh200", "b200", "mi300x", "l40s", "rtx-a6000", "rtx-6000-ada",
              "a10g", "l4", "t4", "v100-16gb", "v100-32gb", "gtx-1060-6gb"]
    assert set(wanted) <= set(catalog.gpu_ids())
    names = [catalog.load_gpu(g).name for g in catalog.gpu_ids()]
    assert len(names) == len(set(names)), "two presets claim the same device name"
    for gpu_id in catalog.gpu_ids():
        gpu = catalog.load_gpu(gpu_id)
        assert gpu.chip and "Peaks are dense" in gpu.source and "Host memory" in gpu.source, gpu_id
    # Hopper parts share one die, so one calibration serves them all
    assert {catalog.load_gpu(g).chip for g in ("h100-sxm-80gb", "h100-nvl", "h200", "gh200", "h20")} == {"GH100"}
