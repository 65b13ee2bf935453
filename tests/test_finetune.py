"""Planner: LoRA / QLoRA fine-tuning (issue 12), against published figures."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner.calibration import default_overheads
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.errors import ConfigError, LayoutError
from planner.estimate import estimate
from planner.finetune import quantised_bytes, trainable_params
from planner.memory import estimate_memory, model_states
from planner.precision import optimizer_state_bytes
from trainplan.cli import main, plan_command


def _train(**fields) -> TrainConfig:
    return TrainConfig(**({"gpus": 1, "seq_len": 512, "micro_batch": 1, "precision": "bf16-mixed"} | fields))


def test_adapter_counts_match_peft():
    """peft's print_trainable_parameters: Llama-2-7B with r=8 on q_proj, v_proj prints
    4,194,304 trainable parameters (the peft LoRA examples); Llama-3-8B with r=8 on all seven
    projections 20,971,520 = 32 layers x 8 x (2 x 4096 + 2 x (4096 + 1024) + 3 x (4096 + 14336))."""
    assert trainable_params(load_model("llama-2-7b"), _train(finetune="lora", lora_targets="q,v")) == 4_194_304
    assert trainable_params(load_model("llama-3-8b"), _train(finetune="lora")) == 20_971_520
    # embeddings and head train too: + 2 x 128256 x 4096
    both = _train(finetune="lora", train_embeddings=True)
    assert trainable_params(load_model("llama-3-8b"), both) == 20_971_520 + 2 * 128_256 * 4096


def test_nf4_and_int8_storage():
    """QLoRA (Dettmers et al. 2023, sec. 3): 4-bit codes, an absmax per 64 weights quantised to 8 bits
    with one fp32 constant per 256 of them: 4 + 8/64 + 32/(64 x 256) = 4.127 bits per weight. INT8 per
    row (the seed notes): 1 byte per weight plus one fp32 scale per output row."""
    shape = (4096, 14336)
    bits = 8 * quantised_bytes(shape, "nf4", 2) / (shape[0] * shape[1])
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-6)
    assert quantised_bytes(shape, "int8", 2) == 4096 * 14336 + 4 * 4096
    assert quantised_bytes(shape, "bf16", 2) == 2 * 4096 * 14336


def test_adam8bit_state_bytes():
    """8-bit AdamW (Dettmers et al. 2022): one byte per state element and an fp32 absmax per block
    of 256 (torchao AdamW8bit's block_size), two states."""
    assert optimizer_state_bytes("adamw8bit", 1024, 4) == 2 * (1024 + 4 * 4)
    assert optimizer_state_bytes("adamw", 1024, 4) == 2 * 4 * 1024


def test_qlora_65b_fits_one_48gb_gpu_where_full_finetuning_needs_780gb():
    """QLoRA's abstract: finetuning a 65B model goes from more than 780 GB of GPU memory (16-bit full
    fine-tune) to less than 48 GB (QLoRA: NF4 base, r=64 adapters on every linear layer, paged
    optimizer, gradient checkpointing)."""
    model = load_model("llama-65b")
    full = model_states(65_285_660_672, 1, 0, "bf16-mixed")
    assert full.total > 780e9
    train = _train(finetune="qlora", lora_rank=64, activation_checkpointing="full", paged_optimizer=True)
    est = estimate_memory(model, load_gpu("rtx-a6000"), train, default_overheads(), search_micro_batch=False)
    assert est.fits and est.memory.peak < 48e9
    lora16 = estimate_memory(model, load_gpu("rtx-a6000"), train.model_copy(update={"finetune": "lora"}),
                             default_overheads(), search_micro_batch=False)
    assert not lora16.fits  # a 16-bit base alone is 130 GB


def test_frozen_base_keeps_only_what_adapters_need():
    model = load_model("llama-3-8b")
    gpu = load_gpu("h100")
    full = estimate_memory(model, gpu, _train(), default_overheads(), search_micro_batch=False).stages[0]
    lora = estimate_memory(model, gpu, _train(finetune="lora"), default_overheads(), search_micro_batch=False).stages[0]
    q_only = estimate_memory(model, gpu, _train(finetune="lora", lora_targets="q"), default_overheads(),
                             search_micro_batch=False).stages[0]
    # the frozen head keeps no input; adapters add A's outputs (tokens x r): less than full
    assert lora.saved_activations < full.saved_activations
    # without MLP adapters, the MLP's input and the down projection's input are not kept:
    # 2 x 4096 + 14336 values per token and layer, less the other adapters' A outputs
    per_token_layer = (lora.saved_activations - q_only.saved_activations) / 512 / 32
    assert per_token_layer == pytest.approx(2 * (4096 + 14336) + 2 * 8 * 6, rel=1e-3)


def test_frozen_weights_skip_their_gradient_flops():
    """A frozen weight's backward computes the input's gradient only: matmul work per token goes
    from 2 + 4 to 2 + 2 FLOPs per weight."""
    model, gpu = load_model("llama-3-8b"), load_gpu("h100")
    full = estimate(model, gpu, _train(seq_len=256)).throughput.breakdown.compute_s
    lora = estimate(model, gpu, _train(seq_len=256, finetune="lora")).throughput.breakdown.compute_s
    assert lora / full == pytest.approx(4 / 6, abs=0.02)
    qlora = estimate(model, gpu, _train(seq_len=256, finetune="qlora")).throughput.breakdown.compute_s
    assert qlora > lora  # dequantising the base per matmul


def test_optimizer_in_backward_and_paged_state():
    model, gpu = load_model("llama-3-8b"), load_gpu("h100")
    base = estimate_memory(model, gpu, _train(finetune="lora"), default_overheads(), search_micro_batch=False)
    inbw = estimate_memory(model, gpu, _train(finetune="lora", optimizer_in_backward=True), default_overheads(),
                           search_micro_batch=False)
    paged = estimate_memory(model, gpu, _train(finetune="lora", paged_optimizer=True), default_overheads(),
                            search_micro_batch=False)
    assert inbw.stages[0].phases["optimizer"].grads == 0 < base.stages[0].phases["optimizer"].grads
    assert paged.stages[0].phases["optimizer"].optimizer == 0 < base.stages[0].phases["optimizer"].optimizer
    assert paged.host.optimizer == base.stages[0].phases["optimizer"].optimizer


@pytest.mark.parametrize(("fields", "error"), [
    (dict(finetune="lora", tp=2, gpus=2), LayoutError),
    (dict(finetune="lora", activation_checkpointing="op"), LayoutError),
    (dict(finetune="qlora", base_precision="int8"), ConfigError),
    (dict(base_precision="nf4"), ConfigError),
    (dict(finetune="lora", lora_targets="q,q"), ConfigError),
    (dict(optimizer_in_backward=True, global_batch=2), LayoutError),
])
def test_refused_layouts(fields, error):
    with pytest.raises(error):
        _train(**fields)


def test_plan_qlora_on_a_24gb_card():
    """Issue 12's acceptance command: an 8B QLoRA fits an RTX 4090 with memory per component and tokens/s."""
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpu", "rtx-4090", "--finetune", "qlora", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    best = out["recommended"]
    assert best["fits"] and best["train"]["finetune"] == "qlora"
    assert set(best["memory"]) >= {"params", "grads", "optimizer", "activations", "temporaries", "peak"}
    assert best["throughput"]["tokens_per_s"] > 0


def test_plan_70b_lora_searches_sharded_layouts():
    result = CliRunner().invoke(plan_command, ["--model", "70b", "--gpus", "8", "--gpu", "a100-80gb", "--finetune", "lora",
                                            "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert any(c["fits"] for c in out["candidates"])
    assert out["recommended"]["train"]["zero_stage"] == 3  # a 16-bit 70B base (138 GB) fits 8 x 80 GB sharded only


def test_run_refuses_what_the_strategy_layer_does_not_execute():
    result = CliRunner().invoke(main, ["run", "--model", "tiny-llama", "--paged-optimizer"])
    assert result.exit_code == 2 and "does not execute it yet" in result.output


def test_distillation_adds_the_teachers_weights_logprobs_and_forward():
    """--teacher: the teacher's weights in the compute dtype on every rank, its fp32 log-probs
    [tokens, vocab] kept through the student's backward, its forward's FLOPs every micro-batch."""
    student, gpu = load_model("llama-3.2-1b"), load_gpu("h100")
    plain = estimate(student, gpu, _train(seq_len=1024))
    distilled = estimate(student, gpu, _train(seq_len=1024, teacher="llama-3-8b"))
    teacher_params = load_model("llama-3-8b")
    from planner.params import total_params
    assert distilled.stages[0].phases["optimizer"].params - plain.stages[0].phases["optimizer"].params == \
        2 * total_params(teacher_params)
    assert distilled.stages[0].saved_activations - plain.stages[0].saved_activations == 4 * 1024 * 128_256
    assert distilled.throughput.step_time_s > 2 * plain.throughput.step_time_s  # an 8B forward per 1B step
    with pytest.raises(ConfigError, match="vocabulary"):
        estimate(load_model("llama-2-7b"), gpu, _train(teacher="llama-3-8b"))
