"""The README's numbers, generated: every table and sample output between
``<!-- begin: NAME -->`` and ``<!-- end: NAME -->`` comes from the code or from committed data.

    python docs/readme.py           # rewrite README.md's generated sections (atomically)
    python docs/readme.py --check   # exit 1, showing the first difference, if README.md is stale

CI runs ``--check`` (tests/test_readme.py), so a number in the README cannot drift from what
the code prints now. Sample runs and benchmarks are committed as data
(validation/samples/, validation/gpu/, benchmarks/results/) and rendered here.
"""

from __future__ import annotations

import difflib
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"(<!-- begin: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def _fence(text: str, prefix: str = "") -> str:
    return f"```\n{prefix}{text.rstrip()}\n```\n"


def _cli(*args: str) -> str:
    """What the command prints on a pipe (120 columns, no colour)."""
    from click.testing import CliRunner

    from trainplan.cli import main

    result = CliRunner().invoke(main, list(args))
    return "\n".join(line.rstrip() for line in result.stdout.splitlines())


def plan_search() -> str:
    return _fence(_cli("plan", "--model", "7b", "--gpus", "8"), "$ plan --model 7b --gpus 8\n")


def plan_fixed() -> str:
    args = ("plan", "--model", "7b", "--gpus", "8", "--strategy", "zero3", "--tp", "1", "--pp", "1")
    return _fence(_cli(*args), "$ " + " ".join(args) + "\n")


def _render(render, obj) -> str:
    import io

    from rich.console import Console

    buffer = io.StringIO()
    render(obj, Console(file=buffer, width=120, highlight=False, color_system=None, force_terminal=False))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def run_sample() -> str:
    from strategies.train import RunResult
    from trainplan.report import render_run

    result = RunResult.model_validate_json((ROOT / "validation/samples/run_tiny_zero3.json").read_text())
    command = "$ trainplan run --model tiny-llama --nproc 2 --strategy zero3 --steps 4 --seq-len 128\n"
    return _fence(_render(render_run, result), command)


def _repredicted(path: Path, on_cpu: bool):
    sys.path.insert(0, str(ROOT / "validation"))
    from accuracy_table import repredict

    from profiler.report import ProfileReport

    return repredict(ProfileReport.model_validate_json(path.read_text()), on_cpu)


def profile_cpu() -> str:
    from trainplan.report import render_profile

    report = _repredicted(ROOT / "validation/samples/profile_tiny_zero2.json", on_cpu=True)
    command = ("$ trainplan profile --model tiny-llama --nproc 2 --strategy zero2 --seq-len 256 --micro-batch 2 "
               "--precision fp32\n")
    return _fence(_render(render_profile, report), command)


def profile_replay() -> str:
    """The committed `profile --replay-allocator` sample: the replay as measured, the planned
    reserved memory re-predicted with the current planner."""
    from planner.calibration import calibration_for_gpu
    from planner.catalog import load_gpu, load_model
    from planner.configs import TrainConfig
    from planner.estimate import estimate
    from planner.memory import communicator_count
    from profiler.report import ProfileReport

    report = ProfileReport.model_validate_json(
        (ROOT / "validation/samples/profile_7b_zero3_sim8_replay.json").read_text())
    train = TrainConfig(**report.train)
    gpu = load_gpu("h100-sxm-80gb")
    cal = calibration_for_gpu(gpu)
    stage = estimate(load_model(report.model), gpu, train, cal).stages[0]
    planned = stage.peak - cal.overheads.cuda_context_bytes - communicator_count(train) * cal.overheads.communicator_bytes
    replayed = next(r.measured for r in report.rows if r.quantity.startswith("max_memory_reserved (replayed"))
    command = ("trainplan profile --model 7b --gpus 8 --simulate-world 8 --strategy zero3 --tp 1 --pp 1 "
               "--micro-batch 1 --seq-len 4096 --replay-allocator")
    return (f"`{command}` ({report.environment['date']}, CPU): Llama-2-7B ZeRO-3, rank 0 of 8, plans "
            f"{planned / 2**30:.2f} GiB reserved on an H100 where the replay holds {replayed / 2**30:.2f} GiB "
            f"({planned / replayed - 1:+.1%}).\n")


def profile_h100() -> str:
    from trainplan.report import render_profile

    report = _repredicted(ROOT / "validation/gpu/profile_7b_zero3_sim8.json", on_cpu=False)
    return _fence(_render(render_profile, report))


def int8() -> str:
    data = json.loads((ROOT / "validation/gpu/int8_gemm.json").read_text())
    env = data["environment"]
    lines = [f"`python benchmarks/int8_gemm.py` on the lent {env['device']} ({env['date']}, torch {env['torch']}, "
             "`validation/gpu/int8_gemm.json`):", "", "| shape | 16-bit | INT8 | INT8 speed |", "|---|---|---|---|"]
    bf16_linear = next(r for r in data["results"] if r["kind"] == "linear" and r["mode"] == "bfloat16")
    for r in data["results"]:
        if r["kind"] == "gemm":
            lines.append(f"| GEMM {r['m']}×{r['k']}×{r['n']} | {r['tflops_16bit']:.0f} TFLOP/s (bf16) | "
                         f"{r['tops_int8']:.0f} TOPS (int8 `_int_mm`) | {r['speedup']:.2f}× |")
        elif r["mode"] != "bfloat16":
            lines.append(f"| Linear {r['tokens']}×{r['in']}→{r['out']}, {r['mode']} | "
                         f"{bf16_linear['seconds'] * 1e3:.2f} ms (bf16) | {r['seconds'] * 1e3:.2f} ms | "
                         f"{r['vs_16bit']:.2f}× |")
    speedups = [r["speedup"] for r in data["results"] if r["kind"] == "gemm"]
    lines += ["", f"INT8 GEMMs beat bf16 by {min(speedups) - 1:.0%}–{max(speedups) - 1:.0%} at these sizes, and the "
              "quantize/dequantize work around them makes the INT8 linears slower than bf16: on Hopper, INT8 pays for "
              "memory (half the bytes of fp16 weights — the seed notes' BMInf use), not speed."]
    return "\n".join(lines) + "\n"


def calibration() -> str:
    from planner.calibration import load_calibration

    path = ROOT / "presets/calibration/h100-sxm-80gb.json"
    cal = load_calibration(path)
    o, t = cal.overheads, cal.throughput
    return (f"`h100-sxm-80gb.json` was measured on {cal.date}: CUDA context (with the training kernels loaded) "
            f"{o.cuda_context_bytes / 2**20:.0f} MiB, communicator {o.communicator_bytes / 2**20:.0f} MiB, bf16 compute "
            f"efficiency {t.efficiency(cal.device, 'bf16'):.1%}, optimizer HBM {t.optimizer_hbm_efficiency:.0%}. A GPU "
            f"without a calibration of its own uses one measured on the same chip (an H200 uses this one: both are "
            f"{cal.chip}), and the report names the file it used.\n")


def _allocator():
    sys.path.insert(0, str(ROOT / "validation"))
    import allocator

    return allocator


def allocator_replay() -> str:
    return _allocator().table() + "\n"


def device_memory() -> str:
    """The planner's peak against the device memory the H100 runs held (NVML), fit and check halves."""
    allocator = _allocator()
    rows = allocator.h100_predictions()
    gaps = [r["device_used"] / r["allocated"] - 1 for r in rows]
    derived = allocator.derive()
    layouts = allocator.layout_errors()
    out = [f"NVML showed {min(gaps):.0%} to {max(gaps):.0%} more than the allocated peak on these runs. The rule's "
           f"constants come from {layouts['fitted']} points ({layouts['layouts']} replayed layouts and "
           f"{len(allocator.FIT_RUNS)} H100 runs), each constant lifted until no point is more than "
           f"{allocator.MARGIN:.1%} above its prediction; the CUDA context with its training kernels is "
           f"{derived['cuda_context_bytes'] / 2**30:.2f} GiB. Over the replayed layouts the rule is "
           f"{layouts['min']:+.0%} to {layouts['max']:+.0%} off the replayed reserved memory (with "
           f"expandable segments {layouts['exp_min']:+.0%} to {layouts['exp_max']:+.0%}), the widest margins with "
           f"recompute.\n",
           "| run | half | NVML used | planned peak | error |", "|---|---|---:|---:|---:|"]
    summary = {}
    for row in sorted(rows, key=lambda r: r["role"] != "check"):
        error = row["predicted"] / row["device_used"] - 1
        summary.setdefault(row["role"], []).append(error)
        out.append(f"| {row['label']} | {row['role']} | {row['device_used'] / 2**30:.2f} GiB | "
                   f"{row['predicted'] / 2**30:.2f} GiB | {error:+.1%} |")
    for role in ("check", "fit"):
        errors = summary[role]
        inside = sum(-0.01 <= e <= 0.06 for e in errors)
        out.append(f"\n{role}: {inside} of {len(errors)} within -1% .. +6%, errors {min(errors):+.1%} .. "
                   f"{max(errors):+.1%}, median {statistics.median(errors):+.1%}")
    return "\n".join(out) + "\n"


def torchtitan_memory() -> str:
    sys.path.insert(0, str(ROOT / "validation"))
    from published import TORCHTITAN_MEMORY, TORCHTITAN_MEMORY_SOURCE, predict_reserved

    out = ["| torchtitan run (H100 96 GB) | published reserved | planned | error |", "|---|---:|---:|---:|"]
    for run in TORCHTITAN_MEMORY:
        planned = predict_reserved(run) / 2**30
        out.append(f"| {run.label} | {run.published_gib:.1f} GiB | {planned:.1f} GiB | "
                   f"{planned / run.published_gib - 1:+.0%} |")
    return "\n".join(out) + f"\n\nSource: {TORCHTITAN_MEMORY_SOURCE}.\n"


def accuracy() -> str:
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "validation/accuracy_table.py")], capture_output=True,
                            text=True, check=True, cwd=ROOT)
    return result.stdout.rstrip() + "\n"


def step_time() -> str:
    sys.path.insert(0, str(ROOT))
    from validation.published import (
        BLOOM_LABEL,
        BLOOM_TFLOPS,
        NARAYANAN,
        NARAYANAN_ZERO3,
        predict_bloom,
        predict_megatron,
        predict_narayanan_zero3,
    )

    lines = ["| run | published TFLOP/s per GPU | predicted | error |", "|---|---|---|---|"]
    for run in NARAYANAN:
        ours = predict_megatron(run)
        error = ours / run.published_tflops - 1
        lines.append(f"| {run.label} | {run.published_tflops:g} | {ours:.0f} | {error:+.1%} |")
    bloom = predict_bloom()
    lines.append(f"| {BLOOM_LABEL} | ~{BLOOM_TFLOPS:g} | {bloom:.0f} | {bloom / BLOOM_TFLOPS - 1:+.1%} |")
    zero3 = [(gpus, published, predict_narayanan_zero3(gpus, mb)) for gpus, mb, published in NARAYANAN_ZERO3]
    published = " / ".join(f"{p:g}" for _, p, _ in zero3)
    lines += ["", f"Table 2's ZeRO-3 rows (DeepSpeed, 2021: {published} TFLOP/s on "
              + " / ".join(str(g) for g, _, _ in zero3) + " GPUs) are not reproduced (ours: "
              + " / ".join(f"{o:.0f}" for _, _, o in zero3) + "): with NCCL's rings over every NIC and unit-by-unit "
              "prefetching, a 175B layer's compute hides its all-gathers at every size; the 2021 implementation "
              "exposed them. Multi-node FSDP runs published since (below) hide them too."]
    return "\n".join(lines) + "\n"


def comm_checks() -> str:
    sys.path.insert(0, str(ROOT))
    from validation.published import FSDP_RUNS, NCCL_TESTS, predict_busbw, predict_fsdp

    lines = ["| nccl-tests, 4 GiB | published bus bandwidth GB/s | predicted | source |", "|---|---|---|---|"]
    for test in NCCL_TESTS:
        lines.append(f"| {test.label} | {test.published_gb_s:g} | {predict_busbw(test):.0f} | {test.source} |")
    lines += ["", "| multi-node FSDP run | published tokens/s per GPU (MFU) | predicted tokens/s per GPU | "
              "exposed data-parallel comm | source |", "|---|---|---|---|---|"]
    gaps = []
    for run in FSDP_RUNS:
        ours = predict_fsdp(run)
        exposed = ours.breakdown.dp_communication_exposed_s / ours.step_time_s
        gaps.append(ours.tokens_per_s_per_gpu / run.published_tokens_per_s_per_gpu - 1)
        lines.append(f"| {run.label} | {run.published_tokens_per_s_per_gpu:,.0f} ({run.published_mfu:.1%}) | "
                     f"{ours.tokens_per_s_per_gpu:,.0f} | {exposed:.1%} of the step | {run.source} |")
    lines += ["", f"Tokens/s error: median {statistics.median(gaps):+.0%}, from {min(gaps):+.0%} to {max(gaps):+.0%}. "
              "The network is not the gap: every run exposes little of its traffic, as published; the compute "
              "efficiency is (the shipped H100 calibration was measured on a 1B model; full recomputation's share is "
              "counted at the same efficiency). The published MFUs count attention over the full s × s square; "
              "trainplan's MFU counts a causal model's unmasked half (so it cannot pass 100%)."]
    return "\n".join(lines) + "\n"


def search_speed() -> str:
    data = json.loads((ROOT / "benchmarks/results/search_speed.json").read_text())
    return _fence("\n".join(data["lines"]), f"$ python benchmarks/search_speed.py   # {data['machine']}, "
                                                f"{data['date']}\n")


def aliases() -> str:
    from planner import catalog

    pairs = []
    for preset_id in catalog.model_ids():
        for alias in catalog.model_preset(preset_id).aliases:
            if re.fullmatch(r"[0-9.]+[bm]", alias):
                pairs.append(f"`{alias}` → {preset_id}")
    return "Size aliases: " + ", ".join(pairs) + " (see `trainplan presets`).\n"


def seed_states() -> str:
    from planner.memory import model_states

    gb = [model_states(7 * 10**9, 8, stage, "bf16-mixed").total / 1e9 for stage in (0, 1, 2, 3)]
    return ("the seed notes (7B on 8 GPUs, DDP / ZeRO-1 / ZeRO-2 / ZeRO-3: " + " / ".join(f"{x:g}" for x in gb)
            + " GB of model states)\n")


def limits() -> str:
    from planner import configs
    from planner.inputs import MAX_FILE_BYTES
    from planner.search import MAX_CANDIDATES

    rows = [("GPUs", configs.MAX_GPUS), ("GPUs per node", configs.MAX_GPUS_PER_NODE), ("layers", configs.MAX_LAYERS),
            ("hidden size", configs.MAX_HIDDEN), ("attention heads", configs.MAX_HEADS),
            ("FFN hidden size", configs.MAX_FFN), ("vocabulary", configs.MAX_VOCAB),
            ("positions, sequence length", configs.MAX_SEQ_LEN), ("micro-batch", configs.MAX_MICRO_BATCH),
            ("global batch", configs.MAX_GLOBAL_BATCH), ("layouts one search evaluates", MAX_CANDIDATES),
            ("bytes of a configuration, calibration, GPU or report file", MAX_FILE_BYTES)]
    lines = ["| limit | at most |", "|---|---|"] + [f"| {name} | {value:,} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def fuzz() -> str:
    data = json.loads((ROOT / "validation/fuzz_run.json").read_text())
    return (f"`{data['command']}` ({data['date']}, {data['machine']}): {data['tests']} generators × "
            f"{data['examples_per_test']:,} examples = {data['tests'] * data['examples_per_test']:,} generated inputs, "
            f"{data['failures']} failures, {data['seconds']:,.0f} s.\n")


def frameworks() -> str:
    """validation/clients.json re-predicted with the current planner."""
    from planner.calibration import Overheads
    from planner.catalog import load_gpu
    from planner.configs import ModelSpec, TrainConfig
    from planner.memory import estimate_memory

    data = json.loads((ROOT / "validation" / "clients.json").read_text())
    gpu = load_gpu("h100-sxm-80gb")
    lines = ["| run (CPU) | activations: predicted / measured | error | peak: predicted / measured | error |",
             "|---|---|---|---|---|"]
    worst = {}
    for record in data["records"]:
        spec, train = ModelSpec(**record["model"]), TrainConfig(**record["train"])
        stage = estimate_memory(spec, gpu, train, Overheads.none(), search_micro_batch=False).stages[0]
        act, peak = stage.saved_activations, max(p.total for p in stage.phases.values())
        m = record["measured"]
        e_act, e_peak = 100 * (act - m["activations"]) / m["activations"], 100 * (peak - m["peak"]) / m["peak"]
        w = worst.setdefault(record["framework"], [0.0, 0.0])
        w[0], w[1] = max(w[0], abs(e_act)), max(w[1], abs(e_peak))
        lines.append(f"| {record['name']} | {act / 2**20:.2f} / {m['activations'] / 2**20:.2f} MiB | {e_act:+.2f}% "
                     f"| {peak / 2**20:.2f} / {m['peak'] / 2**20:.2f} MiB | {e_peak:+.2f}% |")
    versions = {k: v for record in data["records"] for k, v in record["versions"].items()}
    dates = sorted({record["date"] for record in data["records"]})
    head = (f"Measured {dates[0] if len(dates) == 1 else f'{dates[0]} to {dates[-1]}'} on CPU (transformers "
            f"{versions['transformers']}, peft {versions['peft']}, torchtitan {versions['torchtitan']}, torch "
            f"{versions['torch']}; `python validation/clients.py`). Worst errors: Hugging Face activations "
            f"{worst['hf'][0]:.2f}%, peak {worst['hf'][1]:.2f}%; Hugging Face mixtures of experts activations "
            f"{worst['hf-moe'][0]:.2f}%, peak {worst['hf-moe'][1]:.2f}%; peft LoRA activations {worst['peft'][0]:.2f}%, "
            f"peak {worst['peft'][1]:.2f}%; torchtitan activations {worst['torchtitan'][0]:.2f}%, peak "
            f"{worst['torchtitan'][1]:.2f}%; torchtitan's Qwen3 mixture of experts activations "
            f"{worst['torchtitan-moe'][0]:.2f}%, peak {worst['torchtitan-moe'][1]:.2f}%; torch.compile activations {worst['compile'][0]:.2f}%, peak "
            f"{worst['compile'][1]:.2f}%.\n\n")
    return head + "\n".join(lines) + "\n"


def finetune_qlora() -> str:
    args = ("plan", "--model", "8b", "--gpu", "rtx-4090", "--finetune", "qlora")
    return _fence(_cli(*args), "$ " + " ".join(args) + "\n")


def finetune_70b() -> str:
    args = ("plan", "--model", "70b", "--gpus", "8", "--gpu", "a100-80gb", "--finetune", "lora")
    return _fence(_cli(*args), "$ " + " ".join(args) + "\n")


def finetune_accuracy() -> str:
    """The fine-tuning layouts of validation/cpu.json, re-predicted (as the accuracy table)."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "validation/accuracy_table.py"), "--only", "finetune"],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    return result.stdout.rstrip() + "\n"


def inference_seed() -> str:
    args = ("plan", "--mode", "inference", "--model", "cpm-2", "--gpu", "gtx-1060-6gb", "--weights", "int8",
            "--offload", "layers")
    return _fence(_cli(*args), "$ " + " ".join(args) + "\n")


def _layout_text(config: dict) -> str:
    parts = [f"{config['weights']}"]
    if config["weights"] not in ("bf16", "fp16", "fp32"):
        parts[0] += f" ({config['dtype']})"
    if config["kv_cache"] == "int8":
        parts.append("int8 KV")
    if config["prefill_chunk"]:
        parts.append(f"chunks of {config['prefill_chunk']}")
    if config["offload"] == "layers":
        parts.append(f"{config['swapped_layers']} layers swapped")
    return ", ".join(parts)


def inference_accuracy() -> str:
    """validation/inference.json re-predicted with the current planner."""
    sys.path.insert(0, str(ROOT / "validation"))
    import inference as measured_inference

    lines = ["| model | layout | batch × prompt + new | tensors | weights, KV, slots | prefill activations | "
             "decode activations |", "|---|---|---|---|---|---|---|"]
    for record, predicted, measured in measured_inference.repredicted():
        c = record["config"]
        exact = all(predicted[k] == measured[k] for k in ("weights", "kv_cache", "swap_buffers", "host_bytes"))
        cells = []
        for key in ("prefill_activations", "decode_activations"):
            error = (predicted[key] - measured[key]) / measured[key]
            cells.append(f"{measured[key] / 2**20:,.2f} MiB, {error:+.2%}")
        lines.append(f"| {record['model']} | {_layout_text(c)} | {c['batch']} × {c['prompt_len']} + {c['new_tokens']} | "
                     f"{'fake (full size)' if record['simulated'] else 'real'} | {'exact' if exact else 'differ'} | "
                     f"{cells[0]} | {cells[1]} |")
    data = json.loads((ROOT / "validation/inference.json").read_text())
    env = data["environment"]
    lines.append("")
    lines.append(f"Measured {env['date']} with torch {env['torch']} on a CPU (validation/inference.json; "
                 "`python validation/inference.py`). Errors are predicted − measured over measured.")
    return "\n".join(lines) + "\n"


def inference_logits() -> str:
    data = json.loads((ROOT / "validation/inference.json").read_text())
    lines = ["| model (layers) | int8 | w8a8 | int4 | nf4 |", "|---|---|---|---|---|"]
    by_model: dict[tuple, dict] = {}
    for r in data["logit_error"]:
        by_model.setdefault((r["model"], r["layers"]), {})[r["weights"]] = r["relative_rms"]
    for (model, layers), errors in by_model.items():
        lines.append(f"| {model} ({layers}) | " + " | ".join(f"{errors[w]:.1%}" for w in ("int8", "w8a8", "int4", "nf4"))
                     + " |")
    return "\n".join(lines) + "\n"


def long_context() -> str:
    """torchtitan's published context-parallel runs against the planner (validation/published.py)."""
    sys.path.insert(0, str(ROOT / "validation"))
    from published import TORCHTITAN_CP, TORCHTITAN_CP_SOURCE, predict_torchtitan_cp

    lines = ["| FSDP × CP | sequence | published tokens/s per GPU | planned | published / 32k | planned / 32k |",
             "|---|---|---|---|---|---|"]
    first = None
    for fsdp, cp, seq, tps in TORCHTITAN_CP:
        planned = predict_torchtitan_cp(cp, seq)
        first = first or (tps, planned)
        lines.append(f"| {fsdp} × {cp} | {seq:,} | {tps:,} | {planned:,.0f} | {tps / first[0]:.3f} | "
                     f"{planned / first[1]:.3f} |")
    lines += ["", f"Source: {TORCHTITAN_CP_SOURCE}."]
    return "\n".join(lines) + "\n"


def float8_published() -> str:
    """Published Float8 and async-TP runs against the planner (validation/published.py)."""
    sys.path.insert(0, str(ROOT / "validation"))
    from published import ASYNC_TP, ASYNC_TP_SOURCE, FLOAT8_RUNS, predict_async_tp, predict_float8

    lines = ["| Float8 run (Llama 3 8B, FSDP2, compile) | recipe | published bf16 → fp8 tokens/s per GPU | "
             "planned | published speed-up | planned |", "|---|---|---|---|---|---|"]
    for run in FLOAT8_RUNS:
        bf16, fp8 = (predict_float8(run, p).tokens_per_s_per_gpu for p in ("amp-bf16", run.precision))
        lines.append(f"| {run.label}, batch {run.micro_batch} | {run.precision} | {run.published_bf16:,.0f} → "
                     f"{run.published_fp8:,.0f} | {bf16:,.0f} → {fp8:,.0f} | {run.published_fp8 / run.published_bf16:.2f}× | "
                     f"{fp8 / bf16:.2f}× |")
    lines += ["", "Sources: " + "; ".join(dict.fromkeys(run.source for run in FLOAT8_RUNS)) + ".", "",
              "| async TP run | precision | published vanilla → async tokens/s per GPU | planned | published gain | "
              "planned |", "|---|---|---|---|---|---|"]
    for model, gpus, mb, ac, precision, vanilla, fused in ASYNC_TP:
        sync, over = (predict_async_tp(model, gpus, mb, ac, precision, a).tokens_per_s_per_gpu for a in (False, True))
        lines.append(f"| {model}, {gpus} GPUs (FSDP {gpus // 8} × TP 8), batch {mb}, AC {ac} | {precision} | "
                     f"{vanilla:,} → {fused:,} | {sync:,.0f} → {over:,.0f} | {fused / vanilla:.2f}× | {over / sync:.2f}× |")
    lines += ["", f"Source: {ASYNC_TP_SOURCE}."]
    return "\n".join(lines) + "\n"


def step_accuracy() -> str:
    """validation/step_accuracy.json (committed; tests/test_step_accuracy.py keeps it current)."""
    sys.path.insert(0, str(ROOT / "validation"))
    import step_accuracy as sa

    from planner.calibration import default_calibration
    from planner.catalog import load_gpu

    res = json.loads(sa.RESULT.read_text())
    checked = [r for r in res["rows"] if r["error"] is not None and r["half"] == "check"]
    worst = sorted(checked, key=lambda r: -abs(r["error"]))[:3]
    k = default_calibration().throughput
    derate = load_gpu("h100-sxm-96gb-500w").compute_derate
    return sa.table(res) + (
        f"\nFour constants are fitted on the fit half only (`python validation/step_fit.py`): a GEMM sustains "
        f"{k.gemm_sustained:.0%} of its benchmarked rate in a training step, the memory-bound ops stream at "
        f"{k.elementwise_hbm_efficiency:.0%} of HBM bandwidth, an ALiBi model's attention runs at "
        f"{k.alibi_attention_factor:.0%} of FlashAttention's rate, and the 500 W H100 boards of torchtitan's tables "
        f"sustain {derate:.0%} of the datasheet's tensor-core rate. The fit reads the fit half only; the check half's "
        f"errors were printed while the model was built (which ops to model, MPT's ALiBi kernel, pre-FlashAttention "
        f"runs), so its structure was not chosen blind to them. "
        f"Its worst runs: " + "; ".join(f"{r['label']} ({r['error']:+.0%})" for r in worst) + ". "
        "validation/step_accuracy.json lists every run with its source's figure, how it was converted to "
        "tokens/s, and why a run is not expressed.\n")


def moe_search() -> str:
    """The issue's acceptance search on an MoE, as printed."""
    args = ("plan", "--model", "qwen3-30b-a3b", "--gpus", "8")
    return _fence(_cli(*args), "$ " + " ".join(args) + "\n")


def moe_published() -> str:
    """Published MoE steps against the planner (validation/published.py)."""
    sys.path.insert(0, str(ROOT / "validation"))
    from published import MEGATRON_MOE, MEGATRON_MOE_SOURCE, predict_megatron_moe

    lines = ["| Qwen3-235B-A22B, 256 H100 | dispatcher | recompute | published step | planned | error | planned "
             "all-to-all |", "|---|---|---|---|---|---|---|"]
    for label, tp, pp, chunks, ep, dispatcher, recompute, step in MEGATRON_MOE:
        t = predict_megatron_moe(tp, pp, chunks, ep)
        lines.append(f"| {label} | {dispatcher} | {recompute} | {step:.1f} s | {t.step_time_s:.1f} s | "
                     f"{t.step_time_s / step - 1:+.0%} | {t.breakdown.ep_communication_s:.1f} s |")
    return "\n".join(lines + ["", f"Source: {MEGATRON_MOE_SOURCE}."]) + "\n"


SECTIONS = {
    "moe-search": moe_search,
    "moe-published": moe_published,
    "step-accuracy": step_accuracy,
    "long-context": long_context,
    "float8": float8_published,
    "inference-seed": inference_seed,
    "inference-accuracy": inference_accuracy,
    "inference-logits": inference_logits,
    "frameworks": frameworks,
    "finetune-qlora": finetune_qlora,
    "finetune-70b": finetune_70b,
    "finetune-accuracy": finetune_accuracy,
    "plan-search": plan_search,
    "plan-fixed": plan_fixed,
    "run-sample": run_sample,
    "profile-cpu": profile_cpu,
    "profile-h100": profile_h100,
    "int8": int8,
    "calibration": calibration,
    "allocator-replay": allocator_replay,
    "profile-replay": profile_replay,
    "device-memory": device_memory,
    "torchtitan-memory": torchtitan_memory,
    "accuracy": accuracy,
    "step-time": step_time,
    "comm": comm_checks,
    "search-speed": search_speed,
    "aliases": aliases,
    "seed-states": seed_states,
    "limits": limits,
    "fuzz": fuzz,
}


def generate(text: str) -> str:
    found = set()

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in SECTIONS:
            raise SystemExit(f"README.md: unknown generated section {name!r}")
        found.add(name)
        return match.group(1) + SECTIONS[name]() + match.group(4)

    out = MARKER.sub(replace, text)
    missing = set(SECTIONS) - found
    if missing:
        raise SystemExit(f"README.md lacks the generated sections {', '.join(sorted(missing))}")
    return out


def main() -> int:
    text = README.read_text()
    fresh = generate(text)
    if "--check" in sys.argv:
        if fresh == text:
            return 0
        diff = difflib.unified_diff(text.splitlines(), fresh.splitlines(), "README.md", "generated", lineterm="", n=1)
        print("README.md is stale: run `python docs/readme.py`\n" + "\n".join(list(diff)[:40]), file=sys.stderr)
        return 1
    from strategies.files import write_atomic

    write_atomic(README, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
