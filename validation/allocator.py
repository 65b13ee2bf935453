"""Caching-allocator replays: the memory a GPU reserves, predicted from allocation traces taken
on this CPU (issue 21).

    python validation/allocator.py trace [INDICES]   # trace every case (fake tensors), replay, write
                                                     # validation/allocator.json and validation/traces/
    python validation/allocator.py table             # print the README table

Each case is run by the strategy layer as on the GPU (same layout, same number of steps, rank 0
of the same simulated world; the single-GPU runs as a simulated world of one) with
``profiler.alloc_trace.AllocationTrace`` recording every allocation, free and stream; the trace
is replayed through ``planner.allocator`` (PyTorch's caching allocator, default settings and
``expandable_segments``). ``H100_CASES`` are the 14 runs measured on an H100
(``gpu_h100.json``): their replayed ``max_memory_reserved`` is checked against the measured
one. ``LAYOUTS`` are further full-size layouts, traced and replayed only: the planner's fast
rule for reserved memory (``planner.memory``) was derived from them, never from the H100
runs, which stay held out.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

TRACES = HERE / "traces"
OUT = HERE / "allocator.json"

# (label, model, simulated world, TrainConfig fields) -- replay only, for the planner's rule
LAYOUTS = [
    ("1B bf16-mixed, seq 4096", "llama-3.2-1b", 1, dict(gpus=1, seq_len=4096, micro_batch=1)),
    ("1B bf16-mixed, full AC, seq 2048 x 8", "llama-3.2-1b", 1,
     dict(gpus=1, seq_len=2048, micro_batch=8, activation_checkpointing="full")),
    ("1B bf16-mixed, op-level AC, seq 4096 x 2", "llama-3.2-1b", 1,
     dict(gpus=1, seq_len=4096, micro_batch=2, activation_checkpointing="op")),
    ("1B bf16-mixed, selective AC, eager attention, seq 1024 x 4", "llama-3.2-1b", 1,
     dict(gpus=1, seq_len=1024, micro_batch=4, activation_checkpointing="selective", attention="eager")),
    ("1B bf16-mixed, layer:2 AC, seq 4096 x 2", "llama-3.2-1b", 1,
     dict(gpus=1, seq_len=4096, micro_batch=2, activation_checkpointing="layer:2")),
    ("1B amp-bf16 ZeRO-2, seq 4096 x 4, 8 simulated", "llama-3.2-1b", 8,
     dict(gpus=8, zero_stage=2, seq_len=4096, micro_batch=4, precision="amp-bf16")),
    ("8B ZeRO-3, seq 4096, 8 simulated", "llama-3-8b", 8, dict(gpus=8, zero_stage=3)),
    ("8B ZeRO-3 amp-bf16, full AC, seq 8192 x 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=2, precision="amp-bf16",
          activation_checkpointing="full")),
    ("8B ZeRO-2, op-level AC, seq 4096 x 2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, zero_stage=2, micro_batch=2, activation_checkpointing="op")),
    ("8B ZeRO-1, seq 2048 x 2, 8 simulated", "llama-3-8b", 8, dict(gpus=8, zero_stage=1, seq_len=2048, micro_batch=2)),
    ("8B dp4 x tp2 ZeRO-2, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, tp=2, zero_stage=2, sequence_parallel=True)),
    ("8B dp2 x tp4 ZeRO-3, full AC, seq 8192, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, tp=4, zero_stage=3, sequence_parallel=True, seq_len=8192, activation_checkpointing="full")),
    ("8B PP2 x dp4 ZeRO-3, 1F1B, 8 simulated", "llama-3-8b", 8,
     dict(gpus=8, pp=2, zero_stage=3, global_batch=32)),
    ("7B PP4 x dp2 ZeRO-2, GPipe, 8 simulated", "llama-2-7b", 8,
     dict(gpus=8, pp=4, zero_stage=2, global_batch=16, schedule="gpipe")),
    ("13B ZeRO-3, full AC, 16 simulated", "llama-2-13b", 16, dict(gpus=16, zero_stage=3, activation_checkpointing="full")),
    ("Mistral-7B ZeRO-3, full AC, micro-batch 2, 8 simulated", "mistral-7b", 8,
     dict(gpus=8, zero_stage=3, micro_batch=2, activation_checkpointing="full")),
    ("8B ZeRO-3 + parameter offload, 8 simulated", "llama-3-8b", 8, dict(gpus=8, zero_stage=3, offload="params")),
    ("GPT-2 XL bf16-mixed, seq 1024 x 8", "gpt2-xl", 1, dict(gpus=1, seq_len=1024, micro_batch=8)),
]
DEFAULTS = dict(seq_len=4096, micro_batch=1, precision="bf16-mixed")


def h100_cases() -> list[tuple]:
    """The committed H100 runs that completed: (label, model, simulated world, fields, steps,
    measured rank record)."""
    from run_matrix import GPU_CASES, GPU_DEFAULTS

    measured = {c["label"]: c for c in json.loads((HERE / "gpu_h100.json").read_text())["cases"]}
    cases = []
    for label, model, world, fields in GPU_CASES:
        report = measured.get(label, {}).get("report")
        if not report or report["status"] != "ok":
            continue
        # profiler.run: a simulated world runs MIN_STEPS steps, a real run MIN_STEPS + TIMED_STEPS
        cases.append((label, model, world or 1, GPU_DEFAULTS | fields, 3 if world else 5,
                      report["measured"]["ranks"][0]))
    return cases


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def trace(model: str, world: int, fields: dict, steps: int) -> list:
    """The allocation trace of rank 0 of ``fields`` (a simulated world of ``world``) on this CPU."""
    from planner.catalog import load_model
    from planner.configs import TrainConfig
    from strategies.launch import launch
    from strategies.train import RunConfig, RunResult

    train = TrainConfig(**fields)
    config = RunConfig(model=load_model(model), train=train, steps=steps, warmup=0, simulate_world=world,
                       trace_allocations=True, fake_tensor_parallel=train.tp > 1)
    result = RunResult.model_validate_json(launch(config.model_dump_json(), 1, 3600, worker="profiler.worker"))
    return result.allocations


def replayed(events: list, offload: str) -> dict:
    from planner.allocator import replay
    from profiler.alloc_trace import device_events, pool_peaks

    device = device_events(events, offload)
    default, expandable = replay(device), replay(device, expandable_segments=True)
    return {"max_memory_allocated": default.peak_allocated, "max_memory_reserved": default.peak_reserved,
            "max_memory_reserved_expandable": expandable.peak_reserved, "streams": default.streams,
            "pools": pool_peaks(device)}


def load_trace(label: str) -> list:
    with gzip.open(TRACES / f"{slug(label)}.json.gz", "rt") as f:
        return json.load(f)


def main() -> None:
    from importlib.metadata import version

    from planner.configs import TrainConfig
    from strategies.files import write_atomic

    if sys.argv[1] == "table":
        print(table())
        return
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    kept = {c["label"]: c for c in json.loads(OUT.read_text())["cases"]} if OUT.exists() and only else {}
    TRACES.mkdir(exist_ok=True)
    work = [(label, model, world, fields, steps, measured) for label, model, world, fields, steps, measured
            in h100_cases()] + [(label, model, world, DEFAULTS | fields, 3, None)
                                for label, model, world, fields in LAYOUTS]
    for i, (label, model, world, fields, steps, measured) in enumerate(work):
        if only and str(i) not in only:
            continue
        start = time.time()
        events = trace(model, world, fields, steps)
        with gzip.open(TRACES / f"{slug(label)}.json.gz", "wt", compresslevel=9) as f:
            json.dump(events, f, separators=(",", ":"))
        entry = {"label": label, "model": model, "simulated_world": world, "train": fields, "steps": steps,
                 "events": len(events), "replay": replayed(events, TrainConfig(**fields).offload),
                 "measured": ({k: measured[k] for k in ("max_memory_allocated", "max_memory_reserved", "device_used")}
                              if measured else None)}
        kept[label] = entry
        r = entry["replay"]
        line = f"{label}: {len(events)} events, {time.time() - start:.0f} s"
        if measured:
            line += (f", allocated {r['max_memory_allocated'] / measured['max_memory_allocated'] - 1:+.2%}, "
                     f"reserved {r['max_memory_reserved'] / measured['max_memory_reserved'] - 1:+.2%}")
        print(line, flush=True)
        order = [w[0] for w in work]
        write_atomic(OUT, json.dumps({
            "kind": "allocator replay",
            "environment": {"date": time.strftime("%Y-%m-%d"), "torch": version("torch"),
                            "traced_on": "CPU, fake tensors (FakeTensorMode), fake process group",
                            "measured_on": "gpu_h100.json: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130"},
            "cases": sorted(kept.values(), key=lambda c: order.index(c["label"]) if c["label"] in order else 1e9),
        }, indent=1))


def table() -> str:
    """The README table: replayed vs measured reserved memory of the H100 runs."""
    data = json.loads(OUT.read_text())
    rows = ["| run | allocated (measured) | reserved (measured) | reserved (replayed) | error |",
            "|---|---:|---:|---:|---:|"]
    for case in data["cases"]:
        m, r = case["measured"], case["replay"]
        if not m:
            continue
        rows.append(f"| {case['label']} | {m['max_memory_allocated'] / 2**30:.2f} GiB | "
                    f"{m['max_memory_reserved'] / 2**30:.2f} GiB | {r['max_memory_reserved'] / 2**30:.2f} GiB | "
                    f"{r['max_memory_reserved'] / m['max_memory_reserved'] - 1:+.2%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
