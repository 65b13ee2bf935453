"""Measure inference layouts for validation/inference.json (the README's inference accuracy tables).

    python validation/inference.py          # writes validation/inference.json (atomically)
    python validation/inference.py gpu OUT  # on a lent GPU (validation/gpu_session.sh inference): GPU_CASES

Memory: the executor (strategies/inference.py) generates, profiler/inference.py measures weights,
KV cache, swap slots (exact bytes) and the activation peaks of prefill and decoding -- on this CPU
with real tensors for the small reference models, and with fake tensors (sizes, no values) for
full-size models nobody tuned the walk for: Llama-3-8B (GQA), Llama-2-7B (MHA), Llama-3.2-1B and
GPT-2 XL (LayerNorm, GELU, biases, learned positions, tied head), Mixtral-8x7B and Qwen3-30B-A3B
(mixtures of experts; Qwen3's per-head q/k norms) and a DeepSeek-V3 4-layer slice (latent attention). Each record keeps the layout and
the measured bytes; docs/readme.py and tests/test_inference.py re-predict them with the current
planner. Logit error: the prompt's last logits of each weight format against bf16 weights, relative
RMS, on the reference model's Gaussian initial weights.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "validation" / "inference.json"

SMALL = [  # (model, config) measured with real tensors
    ("tiny-llama", dict(weights="fp32")),
    ("tiny-llama", dict(weights="bf16")),
    ("tiny-llama", dict(weights="int8", dtype="bf16")),
    ("tiny-llama", dict(weights="int4", dtype="fp32")),
    ("tiny-llama", dict(weights="nf4", dtype="bf16")),
    ("tiny-llama", dict(weights="w8a8", dtype="fp32")),
    ("tiny-llama", dict(weights="bf16", kv_cache="int8")),
    ("tiny-llama", dict(weights="fp32", prefill_chunk=16)),
    ("tiny-llama", dict(weights="int8", dtype="fp32", offload="layers", swapped_layers=3)),
    ("tiny-gpt2", dict(weights="bf16")),
    ("tiny-gpt2", dict(weights="int8", dtype="fp32")),
    ("tiny-gpt2", dict(weights="int4", dtype="bf16", prefill_chunk=16)),
    ("tiny-moe", dict(weights="bf16")),
    ("tiny-qwen3-moe", dict(weights="int8", dtype="bf16")),
    ("tiny-deepseek", dict(weights="bf16")),
]
SMALL_SHAPE = dict(batch=2, prompt_len=48, new_tokens=8)
FULL = [  # (model, config) measured with fake tensors
    ("llama-3-8b", dict(batch=4, prompt_len=2048, weights="bf16")),
    ("llama-3-8b", dict(batch=4, prompt_len=2048, weights="int8", dtype="bf16", offload="layers", swapped_layers=12)),
    ("llama-3-8b", dict(batch=4, prompt_len=2048, weights="int4", dtype="bf16", kv_cache="int8")),
    ("llama-3-8b", dict(batch=4, prompt_len=2048, weights="nf4", dtype="bf16", prefill_chunk=512)),
    ("llama-2-7b", dict(batch=8, prompt_len=1024, weights="fp16")),
    ("llama-2-7b", dict(batch=2, prompt_len=1024, weights="w8a8", dtype="fp16", kv_cache="int8")),
    ("llama-3.2-1b", dict(batch=16, prompt_len=4096, weights="nf4", dtype="bf16", prefill_chunk=1024)),
    ("gpt2-xl", dict(batch=4, prompt_len=1000, weights="int4", dtype="fp16")),
    # mixtures of experts (issue 24): every expert resident, the MoE block's own working set
    ("mixtral-8x7b", dict(batch=4, prompt_len=2048, weights="int8", dtype="bf16")),
    ("qwen3-30b-a3b", dict(batch=4, prompt_len=2048, weights="bf16")),
    # DeepSeek-V3's latent attention over its compressed cache, at full width (4 layers: a dense one, 3 MoE)
    ("validation/slices/deepseek-v3-4-layers.json", dict(batch=4, prompt_len=2048, weights="bf16")),
]
LOGIT_MODELS = [("tiny-llama", 0), ("llama-3.2-1b", 2)]  # (model, layers kept: 0 = all)
LOGIT_WEIGHTS = ("int8", "w8a8", "int4", "nf4")


def _measure(model_name: str, config: dict, simulate: bool) -> dict:
    import torch

    from planner.calibration import default_calibration
    from planner.catalog import load_gpu, load_model
    from planner.inference import InferenceConfig
    from profiler.inference import profile_inference

    cfg = InferenceConfig(kernels="dequant", **({} if simulate else SMALL_SHAPE), **(
        dict(new_tokens=3) if simulate else {}), **config)
    report = profile_inference(load_model(model_name), load_gpu("h100-sxm-80gb"), cfg, default_calibration(),
                               torch.device("cpu"), simulate=simulate)
    m = report.measured
    record = dict(model=model_name, config=cfg.model_dump(), simulated=simulate,
                  measured=dict(weights=m.weights, kv_cache=m.kv_cache, swap_buffers=m.swap_buffers,
                                host_bytes=m.host_bytes, prefill_activations=m.prefill_activations,
                                decode_activations=m.decode_activations))
    print(model_name, config, {k: v for k, v in report.error.items() if v is not None and "activ" in k}, flush=True)
    return record


def logit_errors() -> list[dict]:
    import torch

    from planner.catalog import load_model
    from planner.inference import InferenceConfig
    from strategies.inference import KVCache, build_inference_model, generate, place

    records = []
    for name, layers in LOGIT_MODELS:
        spec = load_model(name)
        if layers:
            spec = spec.model_copy(update={"num_layers": layers})
        prompt = torch.randint(0, spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))

        def first_logits(weights: str) -> torch.Tensor:
            cfg = InferenceConfig(batch=2, prompt_len=32, new_tokens=1, weights=weights, kernels="dequant",
                                  dtype="auto" if weights == "bf16" else "bf16")
            net = build_inference_model(spec, cfg)
            place(net, cfg, spec, torch.device("cpu"))
            return generate(net, prompt, cfg, KVCache.allocate(spec, cfg, "cpu")).first_logits

        reference = first_logits("bf16")
        for weights in LOGIT_WEIGHTS:
            diff = first_logits(weights) - reference
            records.append(dict(model=name, layers=spec.num_layers, weights=weights,
                                relative_rms=(diff.norm() / reference.norm()).item(),
                                max_abs=diff.abs().max().item(), logit_std=reference.std().item()))
            print(records[-1], flush=True)
    return records


GPU_CASES = [  # (model, config, emulated card in GiB or None): issue 13's acceptance on a lent GPU
    ("llama-2-7b", dict(batch=1, prompt_len=512, new_tokens=64, weights="int8", dtype="bf16", offload="layers"), 8.0),
    ("llama-2-7b", dict(batch=1, prompt_len=512, new_tokens=128, weights="bf16"), None),
    ("llama-3-8b", dict(batch=8, prompt_len=1024, new_tokens=64, weights="int4", dtype="bf16"), None),
]


def gpu(out: str) -> None:
    """Measured tokens/s and peak memory against the plan, per GPU_CASES case, one JSON file."""
    import torch

    from planner.calibration import calibration_for_gpu
    from planner.catalog import gpu_preset_for_device, load_gpu, load_model
    from planner.inference import InferenceConfig
    from profiler.inference import profile_inference
    from strategies.files import write_atomic
    from strategies.nvml import device_info

    info = device_info(0)
    gpu_spec = load_gpu(gpu_preset_for_device(info["name"]) or "h100-sxm-80gb")
    cal = calibration_for_gpu(gpu_spec)
    records = []
    for name, config, limit_gib in GPU_CASES:
        cfg = InferenceConfig(kernels="dequant", **config)
        limit = None if limit_gib is None else int(limit_gib * 2**30)
        try:
            report = profile_inference(load_model(name), gpu_spec, cfg, cal, torch.device("cuda:0"),
                                       memory_limit=limit)
            records.append(dict(model=name, limit_gib=limit_gib, report=json.loads(report.model_dump_json())))
            print(name, config, limit_gib, {k: v for k, v in report.error.items() if v is not None}, flush=True)
        except torch.cuda.OutOfMemoryError as exc:
            records.append(dict(model=name, config=config, limit_gib=limit_gib, error=str(exc).splitlines()[0]))
            print(name, "out of memory", flush=True)
        torch.cuda.empty_cache()
        write_atomic(out, json.dumps(dict(environment=dict(gpu=info["name"], driver=str(info.get("driver", "")),
                                                           torch=torch.__version__, cuda=str(torch.version.cuda),
                                                           date=datetime.date.today().isoformat()),
                                          records=records), indent=1) + "\n")


def main() -> None:
    import torch

    from strategies.files import write_atomic

    if sys.argv[1:2] == ["gpu"]:
        gpu(sys.argv[2])
        return

    records = [_measure(name, config, simulate=False) for name, config in SMALL]
    records += [_measure(name, config, simulate=True) for name, config in FULL]
    data = dict(environment=dict(torch=torch.__version__, python=platform.python_version(),
                                 date=datetime.date.today().isoformat(), device="cpu"),
                records=records, logit_error=logit_errors())
    write_atomic(str(OUT), json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()


def repredicted() -> list[tuple[dict, dict, dict]]:
    """(record, predicted, measured) for every record of validation/inference.json, predicted by
    the current planner (no overheads: CPU and fake tensors have no CUDA context)."""
    from planner.calibration import Overheads, default_calibration
    from planner.catalog import load_gpu, load_model
    from planner.inference import InferenceConfig, estimate_inference

    data = json.loads(OUT.read_text())
    rows = []
    for record in data["records"]:
        est = estimate_inference(load_model(record["model"]), load_gpu("h100-sxm-80gb"),
                                 InferenceConfig(**record["config"]), default_calibration(), Overheads.none())
        predicted = {key: getattr(est.memory, key) for key in record["measured"]}
        rows.append((record, predicted, record["measured"]))
    return rows
