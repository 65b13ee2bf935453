"""``plan``, ``run`` and ``profile`` with ``--mode inference``: the inference flags, their checks,
and the three commands' inference paths (planner/inference.py, strategies/inference.py,
profiler/inference.py)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from planner.configs import MAX_LAYERS, MAX_MICRO_BATCH, MAX_SEQ_LEN
from trainplan.types import Finite
from planner.inference import WEIGHTS_HELP

INFERENCE_FLAGS = {
    "weights": "--weights", "dtype": "--dtype", "kv_cache": "--kv-cache", "batch": "--batch",
    "prompt_len": "--prompt-len", "new_tokens": "--new-tokens", "prefill_chunk": "--prefill-chunk",
    "slots": "--slots", "swapped_layers": "--swapped-layers", "kernels": "--kernels",
    "memory_limit_gib": "--memory-limit-gib", "simulate": "--simulate",
}
# training knobs with no meaning for inference (tp, pp, gpus, gpu, model and offload are shared)
TRAINING_FLAGS = {
    "strategy": "--strategy", "sequence_parallel": "--sequence-parallel", "schedule": "--schedule",
    "chunks": "--chunks", "activation_checkpointing": "--ac", "attention": "--attention", "precision": "--precision",
    "optimizer": "--optimizer", "optimizer_in_backward": "--optimizer-in-backward",
    "paged_optimizer": "--paged-optimizer", "finetune": "--finetune", "lora_rank": "--lora-rank",
    "lora_targets": "--lora-targets", "base_precision": "--base-precision", "train_embeddings": "--train-embeddings",
    "teacher": "--teacher", "lora_dtype": "--lora-dtype", "optimizer_impl": "--optimizer-impl",
    "seq_len": "--seq-len", "micro_batch": "--micro-batch", "global_batch": "--global-batch", "engine": "--engine",
    "impl": "--impl", "compile_": "--compile", "steps": "--steps", "warmup": "--warmup", "data": "--data",
    "simulate_world": "--simulate-world", "fake_tp": "--fake-tp", "recommend": "--recommend",
    "top_k": "--candidates", "sort": "--sort", "allow_cross_node_tp": "--allow-cross-node-tp",
    "nodes": "--nodes", "nproc": "--nproc", "cp": "--cp", "fp8_all_gather": "--fp8-all-gather",
    "async_tp": "--async-tp", "alloc_conf": "--alloc-conf",
}


def inference_options(fn):
    options = [
        click.option("--mode", type=click.Choice(["train", "inference"]), default="train", show_default=True,
                     help="plan/run training, or inference (generation with a KV cache)"),
        click.option("--weights", type=click.Choice(["bf16", "fp16", "fp32", "int8", "w8a8", "int4", "nf4"]),
                     default="bf16", show_default=True, help=f"inference: {WEIGHTS_HELP}"),
        click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
                     help="inference: activations and compute of quantised weights (auto: bf16 where the GPU has it, "
                          "else the faster of fp16 and fp32)"),
        click.option("--kv-cache", type=click.Choice(["auto", "int8"]), default="auto", show_default=True,
                     help="inference: KV cache in the compute dtype, or int8 with per-token scales"),
        click.option("--batch", type=click.IntRange(1, MAX_MICRO_BATCH), default=1, show_default=True,
                     help="inference: sequences generated together"),
        click.option("--prompt-len", type=click.IntRange(1, MAX_SEQ_LEN), default=512, show_default=True,
                     help="inference: prompt tokens per sequence"),
        click.option("--new-tokens", type=click.IntRange(1, MAX_SEQ_LEN), default=128, show_default=True,
                     help="inference: tokens generated per sequence"),
        click.option("--prefill-chunk", type=click.IntRange(0, MAX_SEQ_LEN), default=0, show_default=True,
                     help="inference: prompt tokens per prefill forward (0: the whole prompt)"),
        click.option("--slots", type=click.IntRange(1, MAX_LAYERS), default=2, show_default=True,
                     help="inference with --offload layers: device buffers the swapped layers pass through"),
        click.option("--swapped-layers", type=click.IntRange(0, MAX_LAYERS), default=0, show_default=True,
                     help="inference with --offload layers: layers kept in host memory (0: the fewest that fit)"),
        click.option("--kernels", type=click.Choice(["fused", "dequant"]), default=None,
                     help="inference: weight-only matmuls by fused kernels (plan's default) or by dequantising "
                          "each weight (run's executor)"),
        click.option("--memory-limit-gib", type=Finite(0.01, 2**20), default=None,
                     help="inference: plan for (and on a GPU, emulate) a card with this much memory "
                          "(torch.cuda.set_per_process_memory_fraction)"),
        click.option("--simulate", is_flag=True, help="profile --mode inference: measure memory with fake tensors "
                     "(sizes without values: a full-size model on a CPU; no tokens, no time)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _given(name: str) -> bool:
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def split_mode(options: dict) -> tuple[str, dict]:
    """Pop the mode and the inference flags from ``options``; refuse flags of the other mode."""
    mode = options.pop("mode")
    inference = {key: options.pop(key) for key in INFERENCE_FLAGS}
    if mode == "train":
        given = [flag for key, flag in INFERENCE_FLAGS.items() if _given(key)]
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to inference: add --mode inference")
        if options.get("offload") == "layers":
            raise click.UsageError("--offload layers is inference's layer swapping: add --mode inference "
                                   "(training offloads optimizer or params)")
    else:
        given = [flag for key, flag in TRAINING_FLAGS.items() if _given(key)]
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to training, not --mode inference")
        if options.get("offload") in ("optimizer", "params"):
            raise click.UsageError(f"--offload {options['offload']} is a training offload; inference offloads "
                                   "--offload layers")
    return mode, inference


def _fields(options: dict, inference: dict, kernels_default: str) -> dict:
    """InferenceConfig fields from the flags (the layout's gpus, tp, pp set by the caller)."""
    keys = ("weights", "dtype", "kv_cache", "batch", "prompt_len", "new_tokens", "prefill_chunk", "slots",
            "swapped_layers")
    return dict({key: inference[key] for key in keys}, offload=options["offload"] or "none",
                kernels=inference["kernels"] or kernels_default)


def _config(model, options: dict, inference: dict, kernels_default: str):
    from planner.inference import InferenceConfig, check_inference

    gpus = options["gpus"]
    tp = options["tp"] or 1
    cfg = InferenceConfig(gpus=gpus, tp=tp, pp=options["pp"] or max(1, gpus // tp),
                          **_fields(options, inference, kernels_default))
    check_inference(model, cfg)
    return cfg


def _gpu_with_limit(gpu, inference: dict):
    limit = inference["memory_limit_gib"]
    if limit is None:
        return gpu, None
    nbytes = int(limit * 2**30)
    if nbytes > gpu.memory_bytes:
        raise click.UsageError(f"--memory-limit-gib {limit:g} is more than the {gpu.name}'s "
                               f"{gpu.memory_bytes / 2**30:.2f} GiB: it emulates a smaller card")
    return gpu.model_copy(update={"memory_bytes": nbytes, "name": f"{gpu.name} limited to {limit:g} GiB"}), nbytes


def plan(options: dict, inference: dict, cal, gpus: int, per_node: int):
    """(the estimate or plan, None) when it fits; (result, the one-line reason) when it does not."""
    from planner.catalog import load_gpu, load_model
    from planner.inference import InferenceConfig, estimate_inference, inference_advice, search_inference

    if inference["simulate"]:
        raise click.UsageError("--simulate measures a run: use it with profile --mode inference")
    model = load_model(options["model_name"])
    gpu, _ = _gpu_with_limit(load_gpu(options["gpu_name"]), inference)
    if gpus == 1 or options["tp"] is not None or options["pp"] is not None:
        cfg = _config(model, {**options, "gpus": gpus}, inference, "fused")
        est = estimate_inference(model, gpu, cfg, cal)
        if est.fits:
            return est, None
        failing = [limit for limit in est.limits if not limit.fits]
        short = "; ".join(f"{limit.name} needs {limit.needed_bytes / 2**30:,.2f} GiB of "
                          f"{limit.available_bytes / 2**30:,.2f} GiB" for limit in failing)
        if any(limit.name != "GPU memory" for limit in failing):
            return est, f"does not fit: {short} (the swapped layers' pinned copies); try fewer --gpus per node or " \
                        "int8 / int4 / nf4 --weights"
        return est, f"does not fit: {short}; try {'; '.join(inference_advice(cfg))}"
    base = InferenceConfig(gpus=gpus, tp=1, pp=gpus, **_fields(options, inference, "fused"))
    result = search_inference(model, gpu, base, cal, per_node)
    if result.recommended is not None:
        return result, None
    return result, f"nothing fits: {result.reason}; try {'; '.join(result.advice)}"


def profile(options: dict, inference: dict, cal, gpu, on_cpu: bool, seed: int, measure_only: bool = False):
    """``run --mode inference`` (measure_only) and ``profile --mode inference``: generate on this
    machine's device (CUDA if present, else CPU) and compare with the plan. Returns (report, None),
    or (None, the reason) when the device ran out of memory."""
    import torch

    from planner.catalog import load_model
    from profiler.inference import profile_inference

    model = load_model(options["model_name"])
    if (options["gpus"] or 1) > 1 or (options["tp"] or 1) > 1 or (options["pp"] or 1) > 1:
        raise click.UsageError("inference runs on one device; tensor and pipeline parallel inference are planned "
                               "by `plan --mode inference`")
    if inference["kernels"] == "fused":
        raise click.UsageError("the executor dequantises each weight (--kernels dequant); fused kernels are planned only")
    if model.encoder_layers:
        raise click.UsageError(f"{model.name} is an encoder-decoder model: trainplan plans its inference but runs "
                               "decoder-only models")
    if measure_only and inference["simulate"]:
        raise click.UsageError("--simulate measures memory only: use profile --mode inference")
    cfg = _config(model, {**options, "gpus": 1}, inference, "dequant")
    device = torch.device("cpu" if on_cpu else "cuda:0")
    limit = None if inference["memory_limit_gib"] is None else int(inference["memory_limit_gib"] * 2**30)
    try:
        return profile_inference(model, gpu, cfg, cal, device, seed=seed, memory_limit=limit,
                                 simulate=inference["simulate"]), None
    except torch.cuda.OutOfMemoryError as exc:
        return None, f"out of memory: {str(exc).splitlines()[0]}"
    except RuntimeError as exc:  # a CPU allocation failure: DefaultCPUAllocator "can't allocate memory"
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        return None, f"out of memory: {str(exc).splitlines()[0]}"
