"""Golden snapshot of the planner's answers (issue 22): the full `plan --json` output of layouts
that cover every strategy, engine, implementation, checkpointing policy, precision (Float8
included), fine-tuning mode, context and pipeline parallelism with each schedule, the allocator
setting, and inference. A refactor keeps every byte; a deliberate change of the model
regenerates the file in its own commit that says why:

    python tests/test_golden.py regenerate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

GOLDEN = Path(__file__).parent / "golden" / "plan.json"

FIXED_8B = ["--model", "8b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero3", "--micro-batch", "1"]

LAYOUTS: dict[str, list[str]] = {
    # searches (the ranking and the recommendation are part of the answer)
    "search 7b on 8": ["--model", "7b", "--gpus", "8"],
    "search 70b on 64 A100": ["--model", "70b", "--gpus", "64", "--gpu", "a100-80gb", "--top", "5"],
    "search cpm-2 on 8": ["--model", "cpm-2", "--gpus", "8", "--top", "3"],
    # strategies
    "ddp": ["--model", "1b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "ddp", "--micro-batch", "2"],
    "zero1": ["--model", "7b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero1", "--micro-batch", "1"],
    "zero2": ["--model", "7b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero2", "--micro-batch", "1"],
    "zero3": ["--model", "7b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero3", "--micro-batch", "2"],
    "zero2 + optimizer offload": ["--model", "7b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero2",
                                  "--offload", "optimizer", "--micro-batch", "1"],
    "zero3 + parameter offload": ["--model", "13b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero3",
                                  "--offload", "params", "--micro-batch", "1"],
    "tp4 sp zero1": ["--model", "13b", "--gpus", "16", "--tp", "4", "--pp", "1", "--strategy", "zero1",
                     "--sequence-parallel", "--micro-batch", "1"],
    # pipelines, each schedule
    "pp 1f1b": ["--model", "13b", "--gpus", "16", "--tp", "2", "--pp", "4", "--strategy", "zero1", "--schedule",
                "1f1b", "--micro-batch", "1", "--global-batch", "64"],
    "pp gpipe zero3": ["--model", "8b", "--gpus", "8", "--tp", "1", "--pp", "4", "--strategy", "zero3", "--schedule",
                       "gpipe", "--micro-batch", "1", "--global-batch", "16"],
    "pp interleaved": ["--model", "70b", "--gpus", "64", "--tp", "8", "--pp", "4", "--strategy", "zero1", "--schedule",
                       "interleaved", "--chunks", "2", "--micro-batch", "1", "--global-batch", "64"],
    "3d 405b": ["--model", "405b", "--gpus", "512", "--tp", "8", "--pp", "8", "--strategy", "zero3", "--impl",
                "torchtitan", "--micro-batch", "1", "--global-batch", "512", "--seq-len", "8192"],
    # engines and implementations
    "megatron engine": ["--model", "8b", "--gpus", "8", "--tp", "2", "--pp", "2", "--strategy", "zero1", "--engine",
                        "megatron", "--micro-batch", "1", "--precision", "bf16-mixed-fp32-grads"],
    "deepspeed engine": [*FIXED_8B, "--engine", "deepspeed"],
    "hf impl": [*FIXED_8B, "--impl", "hf"],
    "torchtitan impl compiled op AC": [*FIXED_8B, "--impl", "torchtitan", "--compile", "--ac", "op", "--precision",
                                       "amp-bf16", "--alloc-conf", "expandable_segments"],
    "megatron impl": ["--model", "8b", "--gpus", "8", "--tp", "4", "--pp", "1", "--strategy", "zero1", "--impl",
                      "megatron", "--micro-batch", "1"],
    # checkpointing
    "ac full": [*FIXED_8B, "--ac", "full"],
    "ac selective eager": [*FIXED_8B, "--ac", "selective", "--attention", "eager", "--seq-len", "2048"],
    "ac layer:2": [*FIXED_8B, "--ac", "layer:2"],
    "ac op compiled": [*FIXED_8B, "--ac", "op", "--compile"],
    # precisions
    "fp32": ["--model", "1b", "--gpus", "1", "--tp", "1", "--pp", "1", "--strategy", "ddp", "--precision", "fp32",
             "--micro-batch", "1", "--seq-len", "2048"],
    "fp16-mixed": [*FIXED_8B, "--precision", "fp16-mixed"],
    "amp-bf16": [*FIXED_8B, "--precision", "amp-bf16"],
    "pure bf16": [*FIXED_8B, "--precision", "bf16"],
    "fp8 tensorwise": [*FIXED_8B, "--precision", "fp8-tensorwise", "--compile"],
    "fp8 rowwise": [*FIXED_8B, "--precision", "fp8-rowwise", "--compile", "--no-fp8-all-gather"],
    "async tp": ["--model", "8b", "--gpus", "8", "--tp", "8", "--pp", "1", "--strategy", "zero1", "--async-tp",
                 "--compile", "--sequence-parallel", "--micro-batch", "1"],
    # context parallelism
    "cp4": ["--model", "8b", "--gpus", "8", "--tp", "1", "--pp", "1", "--cp", "4", "--strategy", "zero3",
            "--seq-len", "65536", "--micro-batch", "1", "--ac", "full"],
    # optimizers
    "adamw8bit": [*FIXED_8B, "--optimizer", "adamw8bit"],
    "sgd for-loop": [*FIXED_8B, "--optimizer", "sgd", "--optimizer-impl", "for-loop"],
    "optimizer in backward": ["--model", "1b", "--gpus", "1", "--tp", "1", "--pp", "1", "--strategy", "ddp",
                              "--optimizer-in-backward", "--micro-batch", "1"],
    "paged optimizer": ["--model", "1b", "--gpus", "1", "--tp", "1", "--pp", "1", "--strategy", "ddp",
                        "--paged-optimizer", "--micro-batch", "1", "--gpu", "rtx-4090"],
    # fine-tuning and distillation
    "lora": ["--model", "8b", "--gpus", "1", "--gpu", "a100-80gb", "--finetune", "lora", "--micro-batch", "1"],
    "qlora 4090": ["--model", "8b", "--gpu", "rtx-4090", "--finetune", "qlora"],
    "lora int8 rank 64": ["--model", "8b", "--gpus", "1", "--gpu", "a100-80gb", "--finetune", "lora",
                          "--base-precision", "int8", "--lora-rank", "64", "--lora-targets", "q,v",
                          "--micro-batch", "1"],
    "lora 70b on 8": ["--model", "70b", "--gpus", "8", "--gpu", "a100-80gb", "--finetune", "lora", "--tp", "1",
                      "--pp", "1", "--strategy", "zero3", "--micro-batch", "1"],
    "teacher": ["--model", "1b", "--gpus", "8", "--tp", "1", "--pp", "1", "--strategy", "zero2", "--teacher", "8b",
                "--micro-batch", "1"],
    # other families
    "gpt2-xl": ["--model", "gpt2-xl", "--gpus", "4", "--tp", "1", "--pp", "1", "--strategy", "zero2", "--micro-batch",
                "4", "--seq-len", "1024"],
    "bloom-176b": ["--model", "bloom-176b", "--gpus", "64", "--tp", "8", "--pp", "8", "--strategy", "zero1",
                   "--micro-batch", "1", "--seq-len", "2048", "--global-batch", "128"],
    "cpm-2 pp3 across the encoder/decoder boundary": ["--model", "cpm-2", "--gpus", "6", "--tp", "2", "--pp", "3",
                                                      "--strategy", "zero1", "--ac", "layer:2", "--micro-batch", "1",
                                                      "--global-batch", "12", "--attention", "eager", "--seq-len",
                                                      "1024"],
    "cpm-2 zero3 full recompute": ["--model", "cpm-2", "--gpus", "8", "--strategy", "zero3", "--tp", "1", "--pp", "1",
                                   "--ac", "full", "--micro-batch", "2"],
    "cpm-2 pipeline": ["--model", "cpm-2", "--gpus", "8", "--tp", "1", "--pp", "4", "--strategy", "zero1",
                       "--micro-batch", "1", "--seq-len", "1024", "--global-batch", "32"],
    # inference
    "inference 8b int4 4090": ["--mode", "inference", "--model", "8b", "--gpu", "rtx-4090", "--weights", "int4"],
    "inference 70b tp8": ["--mode", "inference", "--model", "70b", "--gpus", "8", "--tp", "8", "--batch", "16",
                          "--prompt-len", "4096", "--kv-cache", "int8"],
    "inference 70b layer offload": ["--mode", "inference", "--model", "70b", "--gpu", "rtx-4090", "--weights",
                                    "int8", "--offload", "layers", "--kernels", "dequant"],
    "inference pp2 chunked prefill": ["--mode", "inference", "--model", "13b", "--gpus", "2", "--pp", "2",
                                      "--prompt-len", "8192", "--prefill-chunk", "1024", "--weights", "w8a8"],
}


def answer(args: list[str]) -> dict:
    from trainplan.cli import main

    result = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert result.exit_code in (0, 1), (args, result.output[-400:])
    return {"exit": result.exit_code, "answer": json.loads(result.stdout)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_planner_answers_as_the_snapshot(name):
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(LAYOUTS), "the snapshot and LAYOUTS differ: regenerate in its own commit"
    assert answer(LAYOUTS[name]) == golden[name], f"{name}: the planner's answer changed"


if __name__ == "__main__" and sys.argv[1:] == ["regenerate"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from strategies.files import write_atomic

    write_atomic(GOLDEN, json.dumps({name: answer(args) for name, args in LAYOUTS.items()}, indent=1,
                                    sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(LAYOUTS)} layouts)")
