"""Run the validation matrix and write every ProfileReport (plus the environment) to one JSON file.

    python validation/run_matrix.py cpu  validation/cpu.json     # CI-sized, gloo and simulated worlds
    python validation/run_matrix.py gpu  validation/gpu_h100.json  # on one GPU: 1B real, 7B simulated

Each case is planned, run, measured and compared (profiler.run.profile_layout); an
out-of-memory run is kept as a result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from planner.calibration import calibration_for_gpu, default_calibration
from planner.catalog import gpu_preset_for_device, load_gpu, load_model
from planner.configs import TrainConfig
from profiler.run import environment, profile_layout
from strategies.files import write_atomic

CPU_CASES = [
    # (label, model, simulate_world, TrainConfig fields)
    ("DDP", "tiny-llama", None, dict(gpus=2, zero_stage=0)),
    ("ZeRO-1", "tiny-llama", None, dict(gpus=2, zero_stage=1)),
    ("ZeRO-2", "tiny-llama", None, dict(gpus=2, zero_stage=2)),
    ("ZeRO-3", "tiny-llama", None, dict(gpus=2, zero_stage=3)),
    ("TP+SP", "tiny-llama", None, dict(gpus=2, tp=2, sequence_parallel=True)),
    ("PP 1F1B", "tiny-llama", None, dict(gpus=2, pp=2, global_batch=8)),
    ("ZeRO-3, bf16-mixed", "tiny-llama", None, dict(gpus=2, zero_stage=3, precision="bf16-mixed")),
    ("DDP, 8 simulated", "tiny-llama", 8, dict(gpus=8, zero_stage=0)),
    ("ZeRO-1, 8 simulated", "tiny-llama", 8, dict(gpus=8, zero_stage=1)),
    ("ZeRO-3, 8 simulated", "tiny-llama", 8, dict(gpus=8, zero_stage=3)),
    ("ZeRO-2 dp4xtp2+SP, 8 simulated", "tiny-llama", 8, dict(gpus=8, tp=2, zero_stage=2, sequence_parallel=True)),
    ("7B ZeRO-3, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=3, seq_len=1024, micro_batch=1,
                                                      precision="bf16-mixed")),
    # Layouts found wrong by unseen runs (issue 9), at full scale under FakeTensorMode:
    ("8B ZeRO-3 amp-bf16, seq 8192 x 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=2, precision="amp-bf16")),
    ("8B ZeRO-3 amp-bf16, full AC, seq 8192 x 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=2, precision="amp-bf16", activation_checkpointing="full")),
    ("13B ZeRO-3, full AC, 16 simulated", "llama-2-13b", 16,
     dict(gpus=16, zero_stage=3, seq_len=4096, micro_batch=1, precision="bf16-mixed", activation_checkpointing="full")),
    ("7B ZeRO-1 fp16-mixed, 8 simulated", "llama-2-7b", 8,
     dict(gpus=8, zero_stage=1, seq_len=4096, micro_batch=1, precision="fp16-mixed")),
    # Checks of the FSDP2 phase model on layouts it was not derived from:
    ("70B ZeRO-3, full AC, 64 simulated", "llama-2-70b", 64,
     dict(gpus=64, zero_stage=3, seq_len=4096, micro_batch=1, precision="bf16-mixed", activation_checkpointing="full")),
    ("8B ZeRO-2, full AC, seq 8192, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=2, seq_len=8192, micro_batch=1, precision="bf16-mixed", activation_checkpointing="full")),
    ("Mistral-7B ZeRO-3, full AC, micro-batch 2, 8 simulated", "mistral-7b", 8,
     dict(gpus=8, zero_stage=3, seq_len=4096, micro_batch=2, precision="bf16-mixed", activation_checkpointing="full")),
    ("Qwen1.5-7B ZeRO-3, 32 simulated", "qwen1.5-7b", 32,
     dict(gpus=32, zero_stage=3, seq_len=4096, micro_batch=1, precision="bf16-mixed")),
    ("tiny GPT-2 (tied head) ZeRO-3, 8 simulated", "tiny-gpt2", 8, dict(gpus=8, zero_stage=3, precision="bf16-mixed")),
    # torchtitan's checkpointing policies (issue 11)
    ("ZeRO-3, op-level AC", "tiny-llama", None, dict(gpus=2, zero_stage=3, activation_checkpointing="op")),
    ("ZeRO-3, layer:2 AC", "tiny-llama", None, dict(gpus=2, zero_stage=3, activation_checkpointing="layer:2")),
    ("8B ZeRO-3, op-level AC, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=1, precision="bf16-mixed", activation_checkpointing="op")),
    ("8B ZeRO-3, layer:2 AC, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="layer:2")),
    ("8B ZeRO-2, op-level AC, micro-batch 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=2, seq_len=4096, micro_batch=2, precision="bf16-mixed", activation_checkpointing="op")),
    # unsharded layouts with checkpointing: a rebuilt block's MLP backward (found by torchtitan's model)
    ("DDP, full AC", "tiny-llama", None, dict(gpus=2, zero_stage=0, activation_checkpointing="full")),
    ("DDP, op-level AC", "tiny-llama", None, dict(gpus=2, zero_stage=0, activation_checkpointing="op")),
    ("DDP, layer:2 AC", "tiny-llama", None, dict(gpus=2, zero_stage=0, activation_checkpointing="layer:2")),
    ("8B DDP, layer:2 AC, seq 4096, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=0, seq_len=4096, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="layer:2")),
    # fine-tuning (issue 12): frozen bases, adapters, 8-bit optimizer, optimizer in backward, a teacher
    ("LoRA, 1 GPU", "tiny-llama", None, dict(gpus=1, finetune="lora", precision="bf16-mixed")),
    ("QLoRA, fp32 adapters, 8-bit AdamW in backward, 1 GPU", "tiny-llama", None,
     dict(gpus=1, finetune="qlora", lora_dtype="fp32", precision="bf16", optimizer="adamw8bit",
          optimizer_in_backward=True)),
    ("LoRA INT8 base, DDP, full AC, distilled", "tiny-llama", None,
     dict(gpus=2, zero_stage=0, finetune="lora", base_precision="int8", activation_checkpointing="full",
          teacher="tiny-llama", precision="bf16-mixed")),
    ("LoRA q,v, ZeRO-3", "tiny-llama", None,
     dict(gpus=2, zero_stage=3, finetune="lora", lora_targets="q,v", precision="bf16-mixed", global_batch=4)),
    ("8B QLoRA ZeRO-1, full AC, seq 4096, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=1, finetune="qlora", seq_len=4096, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="full")),
    # context parallel (issue 14): PyTorch's ring attention, FSDP over dp x cp
    ("Context parallel cp2, ZeRO-3", "tiny-llama", None, dict(gpus=2, cp=2, zero_stage=3)),
    ("Context parallel cp2, DDP", "tiny-llama", None, dict(gpus=2, cp=2, zero_stage=0)),
    ("1B dp2 x cp4 ZeRO-3, full AC, seq 16384, 8 simulated", "llama-3.2-1b", 8,
     dict(gpus=8, cp=4, zero_stage=3, seq_len=16384, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="full")),
    ("8B cp8 ZeRO-3, full AC, seq 65536, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, cp=8, zero_stage=3, seq_len=65536, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="full")),
    # Float8 (issue 14): torchao's Float8Linear (torch._scaled_mm has a CPU kernel), FSDP2
    ("Float8 tensorwise, fp8 all-gather, ZeRO-3", "tiny-llama", None, dict(gpus=2, zero_stage=3,
                                                                            precision="fp8-tensorwise")),
    ("Float8 rowwise, ZeRO-2, full AC", "tiny-llama", None, dict(gpus=2, zero_stage=2, precision="fp8-rowwise",
                                                                 activation_checkpointing="full")),
    ("Float8 tensorwise, fp8 all-gather, ZeRO-2, full AC", "tiny-llama", None,
     dict(gpus=2, zero_stage=2, precision="fp8-tensorwise", activation_checkpointing="full")),
    ("Float8 rowwise, ZeRO-3, full AC", "tiny-llama", None, dict(gpus=2, zero_stage=3, precision="fp8-rowwise",
                                                                 activation_checkpointing="full")),
    ("Float8 tensorwise, bf16 all-gather, ZeRO-3, op-level AC", "tiny-llama", None,
     dict(gpus=2, zero_stage=3, precision="fp8-tensorwise", fp8_all_gather=False, activation_checkpointing="op")),
    ("8B ZeRO-3 fp8-tensorwise, seq 8192 x 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=2, precision="fp8-tensorwise")),
    ("8B ZeRO-3 fp8-rowwise, op-level AC, seq 8192, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=1, precision="fp8-rowwise", activation_checkpointing="op")),
    ("1B ZeRO-2 fp8-tensorwise, bf16 all-gather, full AC, 16 simulated", "llama-3.2-1b", 16,
     dict(gpus=16, zero_stage=2, seq_len=4096, micro_batch=4, precision="fp8-tensorwise", fp8_all_gather=False,
          activation_checkpointing="full")),
    # pipelines with FSDP2 (issue 21): torch.distributed.pipelining on a fake process group,
    # rank 0 (the first stage) of 1F1B / GPipe over 8 micro-batches
    ("8B PP4 x dp2 ZeRO-3 amp-bf16, 1F1B, 8 micro-batches, seq 8192, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, pp=4, zero_stage=3, seq_len=8192, micro_batch=1, global_batch=16, precision="amp-bf16")),
    ("8B PP4 x dp4 ZeRO-3, 1F1B, 8 micro-batches, 16 simulated", "llama-3-8b", 16,
     dict(gpus=16, pp=4, zero_stage=3, seq_len=4096, micro_batch=1, global_batch=32, precision="bf16-mixed")),
    ("7B PP4 x dp2 ZeRO-2, GPipe, 8 micro-batches, 8 simulated", "llama-2-7b", 8,
     dict(gpus=8, pp=4, zero_stage=2, seq_len=4096, micro_batch=1, global_batch=16, precision="bf16-mixed",
          schedule="gpipe")),
    # mixtures of experts (issue 24): the reference MoE block, experts as grouped GEMMs; with
    # expert parallelism rows exchanged by all_to_all_single (gloo), simulated with balanced routing
    ("MoE ZeRO-3, bf16-mixed", "tiny-moe", None, dict(gpus=2, zero_stage=3, precision="bf16-mixed")),
    ("MoE ZeRO-3 ep2, bf16-mixed", "tiny-moe", None, dict(gpus=2, zero_stage=3, ep=2, precision="bf16-mixed")),
    ("MoE ZeRO-3 ep2, full AC", "tiny-moe", None, dict(gpus=2, zero_stage=3, ep=2, activation_checkpointing="full")),
    ("MoE DDP, 1 GPU", "tiny-moe", None, dict(gpus=1, zero_stage=0)),
    ("Mixtral-8x7B ZeRO-3 ep8, full AC, seq 4096, 8 simulated", "mixtral-8x7b", 8,
     dict(gpus=8, zero_stage=3, ep=8, seq_len=4096, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="full")),
    ("Mixtral-8x7B ZeRO-3 ep4 x efsdp2, seq 2048, 8 simulated", "mixtral-8x7b", 8,
     dict(gpus=8, zero_stage=3, ep=4, seq_len=2048, micro_batch=1, precision="bf16-mixed")),
    ("MoE LoRA ZeRO-3, bf16-mixed", "tiny-moe", None, dict(gpus=2, zero_stage=3, finetune="lora",
                                                           precision="bf16-mixed")),
    ("MoE QLoRA, full AC, 1 GPU", "tiny-moe", None, dict(gpus=1, finetune="qlora", activation_checkpointing="full")),
    ("MoE LoRA ZeRO-3 ep2, bf16-mixed", "tiny-moe", None, dict(gpus=2, zero_stage=3, ep=2, finetune="lora",
                                                               precision="bf16-mixed")),
    # latent attention (DeepSeek's MLA) with experts: the reference LatentAttention
    ("MLA + MoE, 1 GPU", "tiny-deepseek", None, dict(gpus=1, zero_stage=0)),
    ("MLA + MoE ZeRO-3 ep2, bf16-mixed", "tiny-deepseek", None, dict(gpus=2, zero_stage=3, ep=2,
                                                                    precision="bf16-mixed")),
    ("DeepSeek-V3 4-layer slice ZeRO-3 ep16, seq 4096, 16 simulated", "validation/slices/deepseek-v3-4-layers.json", 16,
     dict(gpus=16, zero_stage=3, ep=16, seq_len=4096, micro_batch=1, precision="bf16-mixed")),
    ("DeepSeek-V3 4-layer slice ZeRO-2 ep8 x efsdp2, full AC, seq 4096, 16 simulated",
     "validation/slices/deepseek-v3-4-layers.json", 16,
     dict(gpus=16, zero_stage=2, ep=8, seq_len=4096, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="full")),
    # op-level checkpointing of MoE layers: torchtitan's policy keeps the router's top-k, every
    # other matmul (the router's gate counted) and the all-to-all's outputs
    ("MoE op-level AC, 1 GPU", "tiny-moe", None, dict(gpus=1, zero_stage=0, activation_checkpointing="op")),
    ("MoE ZeRO-3 ep2, op-level AC", "tiny-moe", None, dict(gpus=2, zero_stage=3, ep=2, activation_checkpointing="op")),
    ("Qwen3-30B-A3B 4-layer slice ZeRO-3 ep8, op-level AC, seq 4096, 8 simulated",
     "validation/slices/qwen3-30b-a3b-4-layers.json", 8,
     dict(gpus=8, zero_stage=3, ep=8, seq_len=4096, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="op")),
    # Qwen3's per-head q/k norms in the reference attention (the MoE layers as above)
    ("Qwen3-style MoE, full AC, 1 GPU", "tiny-qwen3-moe", None,
     dict(gpus=1, zero_stage=0, precision="bf16-mixed", activation_checkpointing="full")),
    ("Qwen3-style MoE ZeRO-3 ep2, bf16-mixed", "tiny-qwen3-moe", None, dict(gpus=2, zero_stage=3, ep=2,
                                                                           precision="bf16-mixed")),
    ("Qwen3-30B-A3B 4-layer slice ZeRO-3 ep8, seq 4096, 8 simulated", "validation/slices/qwen3-30b-a3b-4-layers.json", 8,
     dict(gpus=8, zero_stage=3, ep=8, seq_len=4096, micro_batch=1, precision="bf16-mixed")),
    ("Qwen3-30B-A3B 4-layer slice ZeRO-2 ep4 x efsdp2, full AC, seq 4096, 8 simulated",
     "validation/slices/qwen3-30b-a3b-4-layers.json", 8,
     dict(gpus=8, zero_stage=2, ep=4, seq_len=4096, micro_batch=1, precision="bf16-mixed",
          activation_checkpointing="full")),
]
CPU_DEFAULTS = dict(seq_len=256, micro_batch=2, precision="fp32")

GPU_CASES = [
    ("1B bf16-mixed", "llama-3.2-1b", None, dict(gpus=1, seq_len=2048, micro_batch=2)),
    ("1B bf16-mixed, full AC", "llama-3.2-1b", None, dict(gpus=1, seq_len=4096, micro_batch=4,
                                                          activation_checkpointing="full")),
    ("1B amp-bf16", "llama-3.2-1b", None, dict(gpus=1, seq_len=2048, micro_batch=2, precision="amp-bf16")),
    ("1B bf16-mixed, eager attention", "llama-3.2-1b", None, dict(gpus=1, seq_len=1024, micro_batch=2,
                                                                  attention="eager")),
    ("1B bf16-mixed, eager attention, seq 2048", "llama-3.2-1b", None, dict(gpus=1, seq_len=2048, micro_batch=1,
                                                                          attention="eager")),
    ("1B bf16-mixed, micro-batch 8", "llama-3.2-1b", None, dict(gpus=1, seq_len=1024, micro_batch=8)),
    ("7B DDP, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=0)),
    ("7B ZeRO-1, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=1)),
    ("7B ZeRO-2, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=2)),
    ("7B ZeRO-3, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=3)),
    ("7B ZeRO-2+offload, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=2, offload="optimizer")),
    ("7B ZeRO-3+offload, 8 simulated", "llama-2-7b", 8, dict(gpus=8, zero_stage=3, offload="params")),
    ("8B TP8, 8 simulated", "llama-3-8b", 8, dict(gpus=8, tp=8, sequence_parallel=True)),
    ("8B dp2xtp4 ZeRO-3, 8 simulated", "llama-3-8b", 8, dict(gpus=8, tp=4, zero_stage=3, sequence_parallel=True)),
    ("7B PP4xdp2 ZeRO-3, 8 simulated", "llama-2-7b", 8, dict(gpus=8, pp=4, zero_stage=3, global_batch=16)),
    # Float8 (issue 14): torchao on the fp8 tensor cores, compiled as torchtitan runs it; the
    # amp-bf16 twin gives the measured speed-up (needs torchao among the carried wheels)
    ("1B ZeRO-3 amp-bf16, compiled", "llama-3.2-1b", None,
     dict(gpus=1, zero_stage=3, seq_len=4096, micro_batch=2, precision="amp-bf16", compile=True)),
    ("1B ZeRO-3 fp8-tensorwise, compiled", "llama-3.2-1b", None,
     dict(gpus=1, zero_stage=3, seq_len=4096, micro_batch=2, precision="fp8-tensorwise", compile=True)),
    ("1B ZeRO-3 fp8-rowwise, compiled", "llama-3.2-1b", None,
     dict(gpus=1, zero_stage=3, seq_len=4096, micro_batch=2, precision="fp8-rowwise", compile=True)),
    ("8B ZeRO-3 fp8-tensorwise, seq 8192 x 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=2, precision="fp8-tensorwise")),
]
GPU_DEFAULTS = dict(seq_len=4096, micro_batch=1, precision="bf16-mixed")


def main() -> None:
    """``run_matrix.py KIND OUT [INDICES]``: with INDICES (comma-separated case numbers), only
    those cases run, and OUT keeps its other cases (each report carries its own environment)."""
    kind, out = sys.argv[1], sys.argv[2]
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    kept = {}
    if only and Path(out).exists():
        kept = {case["label"]: case for case in json.loads(Path(out).read_text())["cases"]}
    on_cpu = kind == "cpu"
    cases, defaults = (CPU_CASES, CPU_DEFAULTS) if on_cpu else (GPU_CASES, GPU_DEFAULTS)
    gpu = load_gpu("h100-sxm-80gb")
    if not on_cpu:
        from strategies.nvml import device_info

        name = device_info(0)["name"]
        gpu = load_gpu(gpu_preset_for_device(name) or "h100-sxm-80gb")
    calibration = default_calibration() if on_cpu else calibration_for_gpu(gpu)
    for i, (label, model, simulate, fields) in enumerate(cases):
        if only and str(i) not in only:
            continue
        start = time.time()
        train = TrainConfig(**(defaults | fields))
        cal = calibration
        if simulate and not on_cpu:
            # a fake process group has no NCCL communicators
            cal = cal.model_copy(update={"overheads": cal.overheads.model_copy(update={"communicator_bytes": 0})})
        try:
            report = profile_layout(load_model(model), gpu, train, cal, simulate_world=simulate, on_cpu=on_cpu,
                                    timeout_s=600)
            entry = {"label": label, "report": json.loads(report.model_dump_json())}
        except Exception as exc:  # keep going: one failed case must not lose the others
            entry = {"label": label, "error": f"{type(exc).__name__}: {exc}"}
        entry["seconds"] = round(time.time() - start, 1)
        print(f"{label}: {entry.get('error') or entry['report']['status']} ({entry['seconds']} s)", flush=True)
        kept[label] = entry
        from importlib.metadata import version

        order = [label for label, *_ in cases]
        cases_out = sorted(kept.values(), key=lambda c: order.index(c["label"]) if c["label"] in order else len(order))
        write_atomic(out, json.dumps({"kind": kind, "environment": environment() | {"torch": version("torch")},
                                      "calibration": calibration.id, "cases": cases_out}, indent=1))


if __name__ == "__main__":
    main()
