"""``plan``, ``run`` and ``profile`` with ``--mode inference``: the inference flags, their checks,
and the three commands' inference paths (planner/inference.py, strategies/inference.py,
profiler/inference.py)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from planner.configs import TrainConfig
from planner.inference import WEIGHTS_HELP, InferenceConfig
from trainplan.types import Finite, field_option

SHARED_FIELDS = ("gpus", "tp", "pp", "offload")
"""Fields of both configs that one flag sets in either mode: the layout's sizes and --offload."""
INFERENCE_KNOBS = (*(name for name in InferenceConfig.model_fields if name not in SHARED_FIELDS),
                   "memory_limit_gib", "simulate")
"""The inference flags' parameter names: InferenceConfig's fields, the memory limit and --simulate."""
TRAINING_KNOBS = (*(name for name in TrainConfig.model_fields if name not in SHARED_FIELDS),
                  "strategy", "compile_", "steps", "warmup", "data", "simulate_world", "fake_tp", "recommend", "top_k",
                  "sort", "allow_cross_node_tp", "nodes", "nproc")
"""Parameters with no meaning for inference: TrainConfig's fields (those with a flag) and the
commands' own training options (gpu, model and the shared fields apply to both)."""


def _inference(*decls, **overrides):
    """An option for the InferenceConfig field of the flag's name: choices, bounds, default and
    help from the model (trainplan.types.field_option), shown as the default."""
    return field_option(InferenceConfig, *decls, **({"show_default": True} | overrides))


def inference_options(fn):
    fields = InferenceConfig.model_fields
    options = [
        click.option("--mode", type=click.Choice(["train", "inference"]), default="train", show_default=True,
                     help="plan/run training, or inference (generation with a KV cache)"),
        _inference("--weights", help=f"inference: {WEIGHTS_HELP}"),
        _inference("--dtype", help=f"inference: {fields['dtype'].description}"),
        _inference("--kv-cache", help=f"inference: the KV cache's storage; {fields['kv_cache'].description}"),
        _inference("--batch", help="inference: sequences generated together"),
        _inference("--prompt-len", help="inference: prompt tokens per sequence"),
        _inference("--new-tokens", help="inference: tokens generated per sequence"),
        _inference("--prefill-chunk", help=f"inference: {fields['prefill_chunk'].description}"),
        _inference("--slots", help=f"inference with --offload layers: {fields['slots'].description}"),
        _inference("--swapped-layers", help=f"inference: {fields['swapped_layers'].description}"),
        _inference("--kernels", default=None, show_default=None,
                   help=f"inference: {fields['kernels'].description} [default: fused for plan, dequant for run and profile]"),
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


def _flags_given(names) -> list[str]:
    """The flags among ``names`` (parameter names) given on the command line, as the user typed them."""
    flags = {param.name: param.opts[0] for param in click.get_current_context().command.params}
    return [flags[name] for name in names if name in flags and _given(name)]


def split_mode(options: dict) -> tuple[str, dict]:
    """Pop the mode and the inference flags from ``options``; refuse flags of the other mode."""
    mode = options.pop("mode")
    inference = {key: options.pop(key) for key in INFERENCE_KNOBS}
    if mode == "train":
        given = _flags_given(INFERENCE_KNOBS)
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to inference: add --mode inference")
        if options.get("offload") == "layers":
            raise click.UsageError("--offload layers is inference's layer swapping: add --mode inference "
                                   "(training offloads optimizer or params)")
    else:
        given = _flags_given(TRAINING_KNOBS)
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to training, not --mode inference")
        if options.get("offload") in ("optimizer", "params"):
            raise click.UsageError(f"--offload {options['offload']} is a training offload; inference offloads "
                                   "--offload layers")
    return mode, inference


def _fields(options: dict, inference: dict, kernels_default: str) -> dict:
    """InferenceConfig fields from the flags (the layout's gpus, tp, pp set by the caller)."""
    given = {name: inference[name] for name in InferenceConfig.model_fields if name in inference}
    return given | dict(offload=options["offload"] or "none", kernels=inference["kernels"] or kernels_default)


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
        return est, f"does not fit: {short}; try {'; '.join(inference_advice(cfg, model))}"
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
