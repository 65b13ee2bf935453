"""Transformer Engine's FP8 recipes under Megatron-Core (planner/te_fp8.py, issue 23 item 2):
memory derived from TE's source (TransformerEngine d0067d0, lines cited there; TE needs CUDA, so
nothing here is measured) and time on the fp8 tensor cores."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner import te_fp8
from planner.activations import ActivationInputs, layer_terms
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.errors import ConfigError
from planner.memory import estimate_memory
from planner.step_time import estimate_step
from trainplan.cli import main

H100, B200 = load_gpu("h100-sxm-80gb"), load_gpu("b200")
LLAMA_8B = load_model("llama-3-8b")
RECIPES = ("fp8-delayed", "fp8-current", "fp8-blockwise", "mxfp8")


def _train(precision: str, **kw) -> TrainConfig:
    base = dict(gpus=8, tp=2, sequence_parallel=True, engine="megatron", impl="megatron", zero_stage=1,
                seq_len=8192, micro_batch=1, global_batch=64)
    return TrainConfig(**(base | kw), precision=precision)


@pytest.mark.parametrize("precision", ["fp8-delayed", "fp8-current", "fp8-blockwise"])
def test_cached_fp8_weights_are_two_bytes_per_projection_weight(precision):
    """Megatron passes is_first_microbatch, so each TE linear keeps its FP8 weight, rowwise and
    transposed (2 B per element on Hopper; blockwise adds its 128x128 fp32 scales), for the step
    (transformer_engine/pytorch/module/base.py:792-887; csrc/quantizer.cpp:361-375). Everything
    else of the states is Megatron's bf16 default (bf16-mixed-fp32-grads)."""
    bf16 = estimate_memory(LLAMA_8B, H100, _train("bf16-mixed-fp32-grads"), search_micro_batch=False)
    fp8 = estimate_memory(LLAMA_8B, H100, _train(precision), search_micro_batch=False)
    projections = sum(t.numel for t in te_fp8._projections(LLAMA_8B, "decoder")) / 2  # tp 2
    cache = LLAMA_8B.num_layers * projections * te_fp8.WEIGHT_CACHE_BYTES[te_fp8.te_recipe(precision)]
    assert fp8.memory.params - bf16.memory.params == int(cache)
    assert fp8.memory.grads == bf16.memory.grads and fp8.memory.optimizer == bf16.memory.optimizer


def test_saved_inputs_are_fp8():
    """LayerNormLinear (qkv, fc1) keeps its normalised output in FP8, the rank's sequence shard
    with sequence parallelism for per-tensor recipes (layernorm_linear.py:477-487, linear.py:
    979-999); fc2 keeps its FP8 input (linear.py:600-616); under delayed scaling the output
    projection also keeps an FP8 copy of the attention output (Megatron sets save_original_input
    for the other recipes: megatron/core/transformer/attention.py:428-444); block-scaled copies
    carry 1/32 B of scales per element."""
    tokens, h, ffn, q = 8192, 4096, 14336 // 2, 4096 // 2

    def terms(precision):
        return layer_terms(LLAMA_8B, ActivationInputs.of(_train(precision)), "decoder")

    bf16, current, delayed, block = (terms(p) for p in ("bf16-mixed-fp32-grads", "fp8-current", "fp8-delayed",
                                                        "fp8-blockwise"))
    assert bf16["attn_qkv_input"] == 2 * tokens * h // 2 and current["attn_qkv_input"] == tokens * h // 2
    assert current["mlp_input"] == tokens * h // 2
    assert current["mlp_down_input"] == tokens * ffn and bf16["mlp_down_input"] == 2 * tokens * ffn
    assert "attn_out_fp8" not in current and delayed["attn_out_fp8"] == tokens * q
    assert block["attn_qkv_input"] == int((1 + 1 / 32) * tokens * h)  # the gathered columnwise copy


def test_fp8_is_faster_and_its_mfu_bound_counts_the_fp8_peak():
    bf16 = estimate_step(LLAMA_8B, H100, _train("bf16-mixed-fp32-grads"))
    fp8 = estimate_step(LLAMA_8B, H100, _train("fp8-current"))
    delayed = estimate_step(LLAMA_8B, H100, _train("fp8-delayed"))
    assert 1.15 < fp8.tokens_per_s_per_gpu / bf16.tokens_per_s_per_gpu < 1.6
    # current scaling reads every cast tensor once more for its amax
    assert delayed.tokens_per_s_per_gpu > fp8.tokens_per_s_per_gpu
    assert fp8.mfu_bound > bf16.mfu_bound and fp8.mfu_peak == "bf16"


def test_recipes_are_refused_where_they_do_not_run():
    """MXFP8 needs Blackwell; the TE recipes are Megatron-Core's (torchao's Float8 is
    fp8-tensorwise / fp8-rowwise under FSDP2)."""
    with pytest.raises(ConfigError, match="Blackwell"):
        estimate_step(LLAMA_8B, H100, _train("mxfp8"))
    assert estimate_step(LLAMA_8B, B200, _train("mxfp8")).tokens_per_s_per_gpu > 0
    runner = CliRunner()
    result = runner.invoke(main, ["plan", "--model", "llama-3-8b", "--gpus", "8", "--precision", "fp8-current",
                                  "--engine", "pytorch", "--strategy", "zero3"])
    assert result.exit_code == 2
    assert "--engine megatron" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("precision", RECIPES)
def test_plan_json_for_every_recipe(precision):
    gpu = "b200" if precision == "mxfp8" else "h100"
    result = CliRunner().invoke(main, ["plan", "--model", "llama-3-8b", "--gpu", gpu, "--gpus", "8", "--engine",
                                       "megatron", "--strategy", "zero1", "--precision", precision, "--tp", "2",
                                       "--json"])
    assert result.exit_code in (0, 1), result.output
    answer = json.loads(result.output)
    assert answer["recommended"]["train"]["precision"] == precision
    assert answer["recommended"]["throughput"]["mfu_bound"] > 0


def test_fp8_primary_weights_replace_the_cache():
    """--fp8-param-gather: the projections' parameters are FP8 (1 B) with a persistent Hopper
    transpose (1 B): as many bytes as the bf16 parameter, and no separate cached copy
    (transformer_engine/pytorch/tensor/utils.py:1404-1436; megatron param_and_grad_buffer.py:921-924)."""
    bf16 = estimate_memory(LLAMA_8B, H100, _train("bf16-mixed-fp32-grads"), search_micro_batch=False).memory
    primary = estimate_memory(LLAMA_8B, H100, _train("fp8-current", fp8_param_gather=True),
                              search_micro_batch=False).memory
    assert primary.params == bf16.params and primary.optimizer == bf16.optimizer
    with pytest.raises(ConfigError, match="gathered in bf16"):
        _train("mxfp8", fp8_param_gather=True)


def test_precision_aware_optimizer_moments():
    """--exp-avg-dtype / --exp-avg-sq-dtype bf16: Adam's moments take 2 + 2 bytes per parameter of
    the rank's optimizer share instead of 4 + 4 (megatron/training/arguments.py:3675-3684); the fp32
    master stays."""
    train = _train("bf16-mixed-fp32-grads")
    fp32 = estimate_memory(LLAMA_8B, H100, train, search_micro_batch=False).memory
    bf16 = estimate_memory(LLAMA_8B, H100, train.model_copy(update={"exp_avg_dtype": "bf16",
                                                                    "exp_avg_sq_dtype": "bf16"}),
                           search_micro_batch=False).memory
    fp8 = estimate_memory(LLAMA_8B, H100, train.model_copy(update={"exp_avg_dtype": "fp8",
                                                                   "exp_avg_sq_dtype": "bf16"}),
                          search_micro_batch=False).memory
    saved = fp32.optimizer - bf16.optimizer
    assert saved > 0 and saved % 4 == 0
    assert fp32.optimizer - fp8.optimizer == saved * 5 // 4  # (4 + 4) - (1 + 2) = 5 of bf16's 4
    with pytest.raises(ConfigError, match="precision-aware optimizer"):
        TrainConfig(gpus=8, zero_stage=3, exp_avg_dtype="bf16")
