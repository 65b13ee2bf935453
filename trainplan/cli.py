"""Command line: ``plan`` and ``trainplan {plan, presets, ...}``.

User mistakes become one line on stderr and exit 2; a layout that does not fit or a run that
fails exits 1 (``_OneLineErrors``); never a traceback. Heavy imports (torch) happen only inside the commands that run
things; ``plan`` never imports torch.
"""

from __future__ import annotations

import sys
from typing import get_args

import click

from trainplan.types import Finite, field_option
from pydantic import ValidationError

from planner.configs import (
    CHECKPOINTING_HELP,
    MAX_GLOBAL_BATCH,
    MAX_GPUS,
    MAX_GPUS_PER_NODE,
    MAX_MICRO_BATCH,
    MAX_SEQ_LEN,
    STRATEGIES,
    Offload,
    TrainConfig,
)
from planner.inference import InferenceConfig
from planner.errors import TrainplanError
from trainplan import inference_cli
from trainplan.inference_cli import inference_options, split_mode


class Failure(click.ClickException):
    """The input was fine and the answer is no (it does not fit, the run failed): exit 1.
    ``result_printed``: the result object is already on stdout (so ``--json`` prints no error
    object after it: stdout holds exactly one JSON object)."""

    exit_code = 1

    def __init__(self, message: str, kind: str, result_printed: bool = False):
        super().__init__(message)
        self.kind, self.result_printed = kind, result_printed


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def _classify(exc: BaseException) -> tuple[str, str, int]:
    """(message, kind, exit code): 2 for a user's mistake, 1 for a verdict or a failed run."""
    if isinstance(exc, Failure):
        return exc.format_message(), exc.kind, 1
    if isinstance(exc, click.UsageError):
        return exc.format_message(), "usage", 2
    if isinstance(exc, click.ClickException):
        return exc.format_message(), "usage", exc.exit_code
    if isinstance(exc, TrainplanError):
        return str(exc), exc.kind, 2 if exc.user_mistake else 1
    if isinstance(exc, ValidationError):
        return _validation_message(exc), "config", 2
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"internal error ({type(exc).__name__}: {first}); set TRAINPLAN_TRACEBACK=1 for the traceback",
            "internal", 1)


class _OneLineErrors:
    """Mixin: run click in non-standalone mode and print every failure as one line on stderr
    (``error: ...``); with ``--json`` also as ``{"error": {"message", "kind"}}`` on stdout,
    which then always holds exactly one JSON object. Exit codes: 0 it fits / it ran, 1 it
    does not fit / the run failed, 2 a usage error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        json_mode = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
        try:
            result = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()):  # click >= 8.2
            commands = ", ".join(getattr(self, "commands", {}))
            self._fail(f"no command given: choose one of {commands} (trainplan --help)", "usage", 2, json_mode)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C, or SIGTERM during a run (strategies.launch)
            self._fail("interrupted; no rank of a run was left running", "interrupted", 1, json_mode)
        except BrokenPipeError:
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 -- every failure is one line; a bug's traceback on request
            import os

            if os.environ.get("TRAINPLAN_TRACEBACK") and not isinstance(
                    exc, (click.ClickException, TrainplanError, ValidationError)):
                raise
            message, kind, code = _classify(exc)
            printed = isinstance(exc, Failure) and exc.result_printed
            self._fail(message, kind, code, json_mode and not printed)
        sys.exit(result if isinstance(result, int) else 0)

    @staticmethod
    def _fail(message: str, kind: str, code: int, json_mode: bool) -> None:
        message = " ".join(message.split())  # one line, whatever the message held
        if json_mode:
            import json

            click.echo(json.dumps({"error": {"message": message, "kind": kind}}))
        click.echo(f"error: {message}", err=True)
        sys.exit(code)


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    command_class = Command


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped output has no width to detect; tables need about 110 columns.
        console = Console(highlight=False, width=120)
    return console


# ---------------------------------------------------------------- plan




MAX_LOCAL_RANKS = 1024
"""Processes ``run`` and ``profile`` start on this machine (one per rank)."""


class Checkpointing(click.ParamType):
    """none, selective, full, op or layer:N."""

    name = "policy"

    def convert(self, value, param, ctx):
        from planner.configs import parse_checkpointing
        from planner.errors import ConfigError

        try:
            parse_checkpointing(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


def _count(hi: int) -> click.IntRange:
    return click.IntRange(min=1, max=hi)


DEFAULT_SEQ_LEN = TrainConfig.model_fields["seq_len"].default
OFFLOADS = list(dict.fromkeys((*get_args(Offload), *get_args(InferenceConfig.model_fields["offload"].annotation))))
"""--offload's values: training's (TrainConfig) and inference's (layers)."""


def _train(*decls, **overrides):
    """An option for the TrainConfig field of the flag's name: choices, bounds, default and help
    from the model (trainplan.types.field_option)."""
    return field_option(TrainConfig, *decls, **overrides)


def plan_options(fn):
    """Options shared by ``plan``, ``run`` and ``profile``: same names, same meaning.
    A knob left unset is open: ``plan`` searches it, ``run`` takes its default."""
    fields = TrainConfig.model_fields
    options = [
        click.option("--model", "-m", "model_name", required=True,
                     help="preset (llama-2-7b), size alias (7b) or a Hugging Face config.json"),
        _train("--gpus", "-g", default=None, help="total GPUs (default: nodes x gpus-per-node, or 1)"),
        click.option("--nodes", type=_count(MAX_GPUS), default=None, help="number of nodes"),
        click.option("--gpus-per-node", type=_count(MAX_GPUS_PER_NODE), default=None,
                     help="GPUs per node (default: the GPU preset's, usually 8)"),
        click.option("--gpu", "gpu_name", default="h100-sxm-80gb", show_default=True, help="GPU preset"),
        click.option("--strategy", type=click.Choice(list(STRATEGIES)), default=None,
                     help="data-parallel strategy [default: search all]"),
        click.option("--offload", type=click.Choice(OFFLOADS), default=None,
                     help="training: offload optimizer state and gradients (and parameters) to host memory; "
                          "inference: layers (BMInf's layer swapping through --slots device buffers)"),
        _train("--tp", default=None, help="tensor-parallel size [default: search]"),
        _train("--pp", default=None, help="pipeline-parallel size [default: search]"),
        _train("--cp", default=None, help=f"{fields['cp'].description} [default: 1; searched from 32k-token "
               "sequences]"),
        _train("--ep", default=None, help=f"{fields['ep'].description} [default: search, on a mixture of experts]"),
        _train("--etp", default=None, help=f"{fields['etp'].description}"),
        _train("--expert-load", show_default=True),
        _train("--dp-shard", default=None, help=f"{fields['dp_shard'].description} [default: 0]"),
        _train("--dp-replicate", default=None, help=f"{fields['dp_replicate'].description} [default: 0]"),
        _train("--sequence-parallel/--no-sequence-parallel", default=None,
               help="sequence parallelism with tp [default: on when tp > 1]"),
        _train("--schedule", default=None, help="pipeline schedule [default: search 1f1b and interleaved]"),
        _train("--chunks", default=None),
        _train("--ac", "activation_checkpointing", type=Checkpointing(), default=None,
               help=f"activation checkpointing: {CHECKPOINTING_HELP} [default: search]"),
        _train("--attention", show_default=True),
        _train("--precision", show_default=True,
               help="fp8-tensorwise / fp8-rowwise: torchao's Float8 linears over amp-bf16 under FSDP2"),
        _train("--fp8-all-gather/--no-fp8-all-gather", show_default=True),
        _train("--async-tp", help=f"{fields['async_tp'].description}; needs --tp, sequence parallelism and "
               "--compile"),
        _train("--alloc-conf", default=None, help=f"{fields['alloc_conf'].description} [default: default]"),
        _train("--optimizer", show_default=True, help="adamw8bit: block-wise 8-bit states (Dettmers et al. 2022)"),
        _train("--optimizer-in-backward"),
        _train("--paged-optimizer"),
        _train("--finetune", show_default=True),
        _train("--lora-rank", show_default=True),
        _train("--lora-targets", show_default=True),
        _train("--base-precision", show_default=True),
        _train("--train-embeddings"),
        _train("--teacher"),
        _train("--lora-dtype", show_default=True),
        _train("--optimizer-impl", show_default=True),
        _train("--exp-avg-dtype", show_default=True),
        _train("--exp-avg-sq-dtype", show_default=True),
        _train("--fp8-param-gather"),
        _train("--seq-len", default=None,
               help=f"tokens per sequence [default: {DEFAULT_SEQ_LEN}; run: at most the model's positions]"),
        _train("--micro-batch", default=None, help="sequences per micro-batch [default: search, 1 for a fixed layout]"),
        _train("--global-batch", type=_count(MAX_GLOBAL_BATCH), default=None,
               help="sequences per optimizer step [default: one per GPU]"),
        _train("--engine", show_default=True, help="whose memory semantics to predict"),
        _train("--impl", show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def overhead_options(fn):
    options = [
        click.option("--calibration", "calibration_path", type=click.Path(dir_okay=False), default=None,
                     help="calibration JSON (default: the shipped one for this GPU, else documented defaults)"),
        click.option("--cuda-context-mib", type=Finite(0, 10**6), default=None,
                     help="override the CUDA context overhead (MiB)"),
        click.option("--communicator-mib", type=Finite(0, 10**6), default=None,
                     help="override the per-communicator (NCCL) overhead (MiB)"),
        click.option("--fragmentation", type=Finite(0, 1), default=None,
                     help="instead of the caching-allocator model, a flat fraction of the allocated peak"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _named_file(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("needs a file name", param_hint="'--out'")
    return value


def resolve_gpus(gpus, nodes, gpus_per_node, gpu_spec) -> tuple[int, int]:
    """Total GPUs and GPUs per node from --gpus / --nodes / --gpus-per-node."""
    per_node = gpus_per_node or gpu_spec.gpus_per_node
    if gpus is None:
        gpus = (nodes or 1) * per_node if (nodes or gpus_per_node) else 1
    elif nodes is not None and nodes * per_node != gpus:
        raise click.UsageError(f"--gpus {gpus} != --nodes {nodes} x --gpus-per-node {per_node}")
    return gpus, min(per_node, gpus)


def resolve_calibration(path, gpu, cuda_context_mib=None, communicator_mib=None, fragmentation=None):
    from planner.calibration import calibration_for_gpu, load_calibration

    cal = load_calibration(path) if path else calibration_for_gpu(gpu)
    update = {}
    if cuda_context_mib is not None:
        update["cuda_context_bytes"] = int(cuda_context_mib * 2**20)
    if communicator_mib is not None:
        update["communicator_bytes"] = int(communicator_mib * 2**20)
    if fragmentation is not None:
        update["fragmentation"] = fragmentation
    if update:
        update["source"] = cal.overheads.source + " (overridden on the command line)"
        cal = cal.model_copy(update={"overheads": cal.overheads.model_copy(update=update)})
    return cal


def build_space(options: dict):
    """Model, GPU and the search space from the shared options."""
    from planner.catalog import load_gpu, load_model
    from planner.search import STRATEGY_CHOICES, SearchSpace

    model = load_model(options["model_name"])
    gpu = load_gpu(options["gpu_name"])
    gpus, per_node = resolve_gpus(options["gpus"], options["nodes"], options["gpus_per_node"], gpu)
    strategy, offload = options["strategy"], options["offload"]
    if strategy is not None:
        strategies = [(STRATEGIES[strategy], offload or "none")]
    elif offload is not None:
        strategies = [(z, o) for z, o in STRATEGY_CHOICES if o == offload]
    else:
        strategies = None
    schedule, chunks = options["schedule"], options["chunks"]
    if schedule is not None or chunks is not None:
        schedule = schedule or ("interleaved" if (chunks or 1) > 1 else "1f1b")
        schedules = [(schedule, chunks or (2 if schedule == "interleaved" else 1))]
    else:
        schedules = None
    fixed_layout = strategy is not None and options["tp"] is not None and options["pp"] is not None
    micro_batch = options["micro_batch"]
    if micro_batch is None and fixed_layout and options["global_batch"] is None:
        micro_batch = 1
    checkpointing = options["activation_checkpointing"]
    if fixed_layout:  # a fixed layout takes the defaults for what is still open
        checkpointing = checkpointing or "none"
        schedules = schedules or [("1f1b", 1)]
    space = SearchSpace(
        gpus=gpus,
        gpus_per_node=per_node,
        tp=[options["tp"]] if options["tp"] else None,
        pp=[options["pp"]] if options["pp"] else None,
        cp=[options["cp"]] if options["cp"] else ([1] if fixed_layout else None),
        ep=[options["ep"]] if options["ep"] else ([1] if fixed_layout else None),
        strategies=strategies,
        activation_checkpointing=[checkpointing] if checkpointing else None,
        micro_batch=[micro_batch] if micro_batch else None,
        schedules=schedules,
        sequence_parallel=options["sequence_parallel"],
        global_batch=options["global_batch"],
        allow_cross_node_tp=options.get("allow_cross_node_tp", False),
        fixed=dict(seq_len=options["seq_len"] or DEFAULT_SEQ_LEN, compile=options.get("compile_", False),
                   **given_fields(options)),
    )
    return model, gpu, space


RESOLVED_FIELDS = frozenset({"gpus", "tp", "pp", "cp", "ep", "sequence_parallel", "schedule", "chunks",
                             "activation_checkpointing", "micro_batch", "global_batch", "seq_len", "offload"})
"""TrainConfig fields whose flags the search enumerates (``build_space``) or ``run`` resolves to
a default of its own (``build_run_config``)."""


def given_fields(options: dict) -> dict:
    """Every other TrainConfig field with a flag of its name, as the flag gives it (unset: the
    field's default)."""
    return {name: options[name] for name in TrainConfig.model_fields
            if name in options and name not in RESOLVED_FIELDS and options[name] is not None}


@click.command("plan", cls=Command)
@plan_options
@inference_options
@overhead_options
@click.option("--allow-cross-node-tp", is_flag=True, help="let tensor parallelism span nodes")
@click.option("--compile", "compile_", is_flag=True, help="plan torch.compile'd blocks: what inductor saves for "
              "backward and its speed-up")
@click.option("--top", type=click.IntRange(min=0, max=100_000), default=10, show_default=True,
              help="ranked layouts to show (0: all that fit)")
@click.option("--sort", type=click.Choice(["throughput", "memory", "mfu"]), default="throughput", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def plan_command(calibration_path, cuda_context_mib, communicator_mib, fragmentation, top, sort, as_json,
                 **options):
    """Predict per-GPU memory and throughput for every layout the flags leave open, and
    recommend the fastest that fits.

    Flags are constraints. Fix --strategy, --tp and --pp (and --ac, --micro-batch) to see one
    layout in detail: memory per component, phase and pipeline stage, and its step time."""
    from planner.estimate import estimate
    from planner.search import enumerate_configs, search

    mode, inference = split_mode(options)
    if mode == "inference":
        return _plan_inference(options, inference, calibration_path, cuda_context_mib, communicator_mib,
                               fragmentation, as_json)
    model, gpu, space = build_space(options)
    cal = resolve_calibration(calibration_path, gpu, cuda_context_mib, communicator_mib, fragmentation)
    configs = enumerate_configs(model, space)
    console = _console()
    if len(configs) == 1:
        result = estimate(model, gpu, configs[0], cal, space.gpus_per_node)
        if as_json:
            click.echo(result.model_dump_json(indent=2))
        else:
            from trainplan.report import render_estimate

            render_estimate(result, console)
        if not result.fits:
            short = "; ".join(f"{limit.name} needs {limit.needed_bytes / 2**30:,.2f} GiB of "
                              f"{limit.available_bytes / 2**30:,.2f} GiB" for limit in result.limits if not limit.fits)
            raise Failure(f"does not fit: {short}", "does_not_fit", result_printed=True)
        return
    plan_result = search(model, gpu, space, cal, top=top, sort=sort, configs=configs)
    if as_json:
        click.echo(plan_result.model_dump_json(indent=2))
    else:
        from trainplan.report import render_plan

        render_plan(plan_result, console)
    if plan_result.recommended is None:
        raise Failure(f"nothing fits: {plan_result.reason}; try {'; '.join(plan_result.advice)}", "does_not_fit",
                      result_printed=True)


def _plan_inference(options, inference, calibration_path, cuda_context_mib, communicator_mib, fragmentation,
                    as_json) -> None:
    from planner.catalog import load_gpu
    from planner.inference import InferenceEstimate
    from trainplan.report import render_inference, render_inference_plan

    gpu = load_gpu(options["gpu_name"])
    cal = resolve_calibration(calibration_path, gpu, cuda_context_mib, communicator_mib, fragmentation)
    gpus, per_node = resolve_gpus(options["gpus"], None, options["gpus_per_node"], gpu)
    if options["gpus"] is None and (options["tp"] or options["pp"]):  # a layout given by its sizes
        gpus = (options["tp"] or 1) * (options["pp"] or 1)
    result, failure = inference_cli.plan(options, inference, cal, gpus, per_node)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        (render_inference if isinstance(result, InferenceEstimate) else render_inference_plan)(result, _console())
    if failure:
        raise Failure(failure, "does_not_fit", result_printed=True)


def _profile_inference(options, inference, cal, gpu, on_cpu, seed, out, as_json, measure_only=False) -> None:
    from trainplan.report import render_inference_profile

    report, failure = inference_cli.profile(options, inference, cal, gpu, on_cpu, seed, measure_only)
    if failure:
        raise Failure(failure, "out_of_memory")
    text = report.model_dump_json(indent=2)
    if out:
        write_atomic(out, text)
    if as_json:
        click.echo(text)
    else:
        render_inference_profile(report, _console(), measure_only)


# ---------------------------------------------------------------- run


def run_options(fn):
    options = [
        click.option("--nproc", type=_count(MAX_LOCAL_RANKS), default=None,
                     help="ranks to launch [default: --gpus, else the visible GPUs, else 1]"),
        click.option("--steps", type=_count(100_000), default=5, show_default=True),
        click.option("--warmup", type=click.IntRange(min=0, max=100_000), default=1, show_default=True,
                     help="steps left out of the median step time"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--data", type=click.Path(dir_okay=False), default=None,
                     help="token file (uint16 .bin/.u16 or int32 .i32) [default: synthetic samples]"),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile each block"),
        click.option("--timeout", type=Finite(1, 10**7), default=1800, show_default=True,
                     help="seconds before every rank is stopped"),
        click.option("--fail-rank", type=int, default=None, hidden=True),
        click.option("--fail-step", type=int, default=0, hidden=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def visible_gpus() -> int:
    """CUDA devices visible to this process, without initialising CUDA here (NVML)."""
    from strategies.nvml import device_count

    return device_count()


def build_run_config(options: dict, run: dict, simulated: bool = False):
    """One fully specified layout from the shared options: what ``plan`` leaves open, ``run``
    takes at its default (DDP, tp = pp = 1, no checkpointing, micro-batch 1, 1F1B). A layout
    the strategy layer does not execute is refused here, before any rank starts, with the
    reason of planner/capabilities.py (``simulated``: profile --simulate-world's one rank)."""
    from planner.capabilities import run_refusal
    from planner.catalog import load_model
    from planner.configs import check_layout
    from strategies.train import RunConfig

    model = load_model(options["model_name"])
    nproc = run["nproc"]
    gpus = options["gpus"] or nproc or visible_gpus() or 1
    if nproc is not None and nproc != gpus:
        raise click.UsageError(f"--nproc {nproc} != --gpus {gpus}: run launches one rank per GPU of the layout")
    tp, pp = options["tp"] or 1, options["pp"] or 1
    schedule = options["schedule"] or ("interleaved" if (options["chunks"] or 1) > 1 else "1f1b")
    sequence_parallel = options["sequence_parallel"] if options["sequence_parallel"] is not None else tp > 1
    seq_len = options["seq_len"] or min(DEFAULT_SEQ_LEN, model.max_position_embeddings)
    fields = dict(
        gpus=gpus, tp=tp, pp=pp, cp=options["cp"] or 1, ep=options["ep"] or 1, sequence_parallel=sequence_parallel,
        zero_stage=STRATEGIES[options["strategy"] or "ddp"], offload=options["offload"] or "none",
        activation_checkpointing=options["activation_checkpointing"] or "none", micro_batch=options["micro_batch"] or 1,
        seq_len=seq_len, schedule=schedule, chunks=options["chunks"] or (2 if schedule == "interleaved" else 1),
        compile=run["compile_"], **given_fields(options),
    )
    if options["global_batch"]:
        fields["global_batch"] = options["global_batch"]
    elif pp > 1:
        fields["grad_accum"] = pp  # 1F1B needs at least pp micro-batches
    train = TrainConfig(**fields)
    check_layout(model, train)
    if reason := run_refusal(model, train, cuda=visible_gpus() > 0, simulated=simulated):
        raise click.UsageError(reason)
    if run["data"]:
        from strategies.data import check_token_file

        check_token_file(run["data"], model.vocab_size, train.seq_len)
    return RunConfig(model=model, train=train, steps=run["steps"], warmup=run["warmup"], seed=run["seed"],
                     data=run["data"], fail_rank=run["fail_rank"],
                     fail_step=run["fail_step"])


@click.command("run", cls=Command)
@plan_options
@run_options
@inference_options
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def run_command(nproc, steps, warmup, seed, data, compile_, timeout, fail_rank, fail_step, as_json, **options):
    """Run a layout for a few steps on PyTorch's own engines and report loss, step time and
    tokens/s. NCCL on GPUs, gloo on CPU; one process per rank (torchrun-compatible)."""
    from strategies.launch import launch
    from strategies.train import RunResult

    mode, inference = split_mode(options)
    if mode == "inference":
        gpu, on_cpu = _device_gpu(options["gpu_name"])
        return _profile_inference(options, inference, resolve_calibration(None, gpu), gpu, on_cpu, seed, None,
                                  as_json, measure_only=True)
    run = dict(nproc=nproc, steps=steps, warmup=warmup, seed=seed, data=data, compile_=compile_,
               fail_rank=fail_rank, fail_step=fail_step)
    config = build_run_config(options, run)
    result = RunResult.model_validate_json(launch(config.model_dump_json(), config.train.gpus, timeout))
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    from trainplan.report import render_run

    render_run(result, _console())


# ---------------------------------------------------------------- profile


def write_atomic(path: str, text: str) -> None:
    from strategies.files import write_atomic as write

    try:
        write(path, text)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror or exc}", "io") from None


def _device_gpu(gpu_name_option: str):
    """The GPU preset: the detected GPU's, when one matches, else the --gpu preset; and
    whether this machine runs on CPU."""
    from planner.catalog import gpu_preset_for_device, load_gpu
    from strategies.nvml import NvmlUnavailable, device_info

    try:
        name = device_info(0)["name"]
    except NvmlUnavailable:
        return load_gpu(gpu_name_option), True
    return load_gpu(gpu_preset_for_device(name) or gpu_name_option), False


@click.command("profile", cls=Command)
@plan_options
@run_options
@inference_options
@overhead_options
@click.option("--simulate-world", type=click.IntRange(min=2, max=MAX_GPUS), default=None,
              help="measure rank 0 of this many GPUs in one process (fake process group)")
@click.option("--fake-tp", is_flag=True, help="with --simulate-world and --tp: fake tensors for the tensor-parallel "
              "rank too (full-size layouts in seconds; its loss_parallel holds 2 more fp32 vocabulary shards "
              "at the end of forward than a real rank)")
@click.option("--replay-allocator", is_flag=True, help="on a CPU: record rank 0's allocations and replay them through "
              "PyTorch's caching allocator (planner/allocator.py), comparing the planned reserved memory and device "
              "peak with the replay's")
@click.option("--recommend", is_flag=True, help="run the planner's top candidates and recommend the best measured")
@click.option("--candidates", "top_k", type=_count(64), default=3, show_default=True,
              help="how many planned candidates --recommend runs")
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=lambda ctx, param, value: _named_file(value),
              help="write the report as JSON (atomically)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--fail-kind", type=click.Choice(["error", "oom"]), default="error", hidden=True)
def profile_command(nproc, steps, warmup, seed, data, compile_, timeout, fail_rank, fail_step, calibration_path,
                    cuda_context_mib, communicator_mib, fragmentation, simulate_world, fake_tp, replay_allocator,
                    recommend, top_k, out, as_json,
                    fail_kind, **options):
    """Plan a layout, run it, measure every component per rank and phase, and compare.

    The same flags as plan and run. --simulate-world N measures one rank of an N-GPU layout in
    one process (memory only); with --replay-allocator the run's allocations are replayed through the
    caching allocator, for the memory a GPU would hold. --recommend runs the planner's best candidates and picks the
    fastest that really fits."""
    from profiler.run import profile_layout
    from strategies.files import check_output

    if out:
        check_output(out)  # before anything runs
    mode, inference = split_mode(options)
    gpu, on_cpu = _device_gpu(options["gpu_name"])
    cal = resolve_calibration(calibration_path, gpu, cuda_context_mib, communicator_mib, fragmentation)
    if replay_allocator and not on_cpu:
        raise click.UsageError("--replay-allocator replays a CPU run's allocations; on a GPU the caching allocator "
                               "itself is measured (max_memory_reserved, NVML)")
    if replay_allocator and (mode == "inference" or recommend):
        raise click.UsageError("--replay-allocator profiles one training layout (not --mode inference or --recommend)")
    if mode == "inference":
        return _profile_inference(options, inference, cal, gpu, on_cpu, seed, out, as_json)
    if recommend:
        return _profile_recommend(options, dict(nproc=nproc, steps=steps, warmup=warmup, seed=seed, data=data,
                                               compile_=compile_, fail_rank=None, fail_step=0), gpu, cal, on_cpu,
                                  top_k, timeout, out, as_json)
    run = dict(nproc=simulate_world or nproc, steps=max(steps, 3), warmup=warmup, seed=seed, data=data,
               compile_=compile_, fail_rank=fail_rank, fail_step=fail_step)
    if simulate_world and options["gpus"] not in (None, simulate_world):
        raise click.UsageError(f"--simulate-world {simulate_world} != --gpus {options['gpus']}")
    config = build_run_config(options, run, simulated=simulate_world is not None)
    report = profile_layout(config.model, gpu, config.train, cal, steps=config.steps, simulate_world=simulate_world,
                            timeout_s=timeout, on_cpu=on_cpu, data=data, seed=seed, fail_rank=fail_rank,
                            fail_step=fail_step, fail_kind=fail_kind, fake_tp=fake_tp,
                            replay_allocator=replay_allocator)
    _emit_report(report, out, as_json)
    if report.status != "ok":
        raise Failure(report.message, "out_of_memory" if report.status == "oom" else "run_failed",
                      result_printed=True)


def _emit_report(report, out, as_json) -> None:
    """--out (atomically), then --json or the table, for a profile or a recommendation report."""
    text = report.model_dump_json(indent=2)
    if out:
        write_atomic(out, text)
    if as_json:
        click.echo(text)
        return
    from profiler.report import ProfileReport
    from trainplan.report import render_profile, render_recommend

    (render_profile if isinstance(report, ProfileReport) else render_recommend)(report, _console())


def _profile_recommend(options, run, gpu, cal, on_cpu, top_k, timeout, out, as_json):
    """Plan, then run the top candidates the strategy layer executes (planner/capabilities.py);
    recommend the best measured one that fits."""
    from planner.capabilities import run_refusal
    from planner.catalog import load_model
    from planner.search import search
    from profiler.report import RecommendReport
    from profiler.run import profile_layout

    model, _, space = build_space(options)
    space.fixed |= {"engine": "pytorch", "compile": run["compile_"]}
    result = search(model, gpu, space, cal, top=0)
    if result.recommended is None:  # the candidates are then the closest layouts, none of which fits
        raise Failure(f"nothing fits: {result.reason}", "does_not_fit")
    refusals = [run_refusal(model, c.train, cuda=not on_cpu) for c in result.candidates]
    runnable = [c for c, refused in zip(result.candidates, refusals) if refused is None][:top_k]
    if not runnable:
        best = f"the best planned one: {refusals[0]}; " if refusals else ""
        raise click.UsageError(f"no planned candidate can be run here ({best}see `trainplan plan`)")
    reports = [profile_layout(load_model(options["model_name"]), gpu, c.train, cal, steps=run["steps"],
                              timeout_s=timeout, on_cpu=on_cpu, data=run["data"], seed=run["seed"])
               for c in runnable]
    report = RecommendReport.from_reports(reports)
    _emit_report(report, out, as_json)
    if report.recommended is None:
        raise Failure("none of the measured candidates ran without running out of memory", "out_of_memory",
                      result_printed=True)


@click.command("compare", cls=Command)
@click.argument("report_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def compare_command(report_path, as_json):
    """Re-render a saved profile report (trainplan profile --out FILE)."""
    from planner.errors import shown
    from planner.inputs import parse_json, read_text
    from profiler.report import ProfileReport, RecommendReport

    from profiler.inference import InferenceReport

    where = shown(report_path)
    data = parse_json(read_text(report_path, "report"), where)
    # which report: a recommendation holds reports, an inference profile its config and estimate
    cls = (RecommendReport if isinstance(data, dict) and "reports" in data else
           InferenceReport if isinstance(data, dict) and "estimate" in data and "config" in data else ProfileReport)
    try:
        report = cls.model_validate(data)
    except ValidationError as exc:
        raise click.UsageError(f"{where} is not a trainplan profile report ({_validation_message(exc)})") from None
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    from trainplan.report import render_inference_profile, render_profile, render_recommend

    render = {ProfileReport: render_profile, RecommendReport: render_recommend, InferenceReport: render_inference_profile}
    render[cls](report, _console())


# ---------------------------------------------------------------- calibrate


@click.command("calibrate", cls=Command)
@click.option("--model", "-m", "model_name", default="llama-3.2-1b", show_default=True,
              help="model whose training steps are measured")
@click.option("--seq-len", type=_count(MAX_SEQ_LEN), default=2048, show_default=True)
@click.option("--micro-batch", type=_count(MAX_MICRO_BATCH), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=3, max=100_000), default=6, show_default=True)
@click.option("--precision", type=click.Choice(["bf16-mixed", "fp32", "bf16"]), default="bf16-mixed",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=lambda ctx, param, value: _named_file(value),
              help="where to write the calibration [default: calibration/<gpu>.json]")
@click.option("--json", "as_json", is_flag=True, help="print the calibration as JSON")
def calibrate_command(model_name, seq_len, micro_batch, steps, precision, out, as_json):
    """Measure this GPU (CUDA context with its training kernels, NCCL communicator, compute and
    optimizer efficiency) and write the planner's constants as a calibration file."""
    import time
    from pathlib import Path

    from planner.catalog import gpu_preset_for_device, load_gpu, load_model
    from profiler.calibrate import calibration_from, measure
    from strategies.files import check_output
    from strategies.nvml import device_info

    name = device_info(0)["name"]
    preset = gpu_preset_for_device(name)
    if preset is None:
        raise Failure(f"no GPU preset is named {name!r}; add one under presets/gpus first", "unknown_gpu")
    path = out or str(Path("calibration") / f"{preset}.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    check_output(path)  # before the measurement
    measured = measure(load_model(model_name), load_gpu(preset), seq_len, micro_batch, steps, precision)
    measured["date"] = time.strftime("%Y-%m-%d")
    cal = calibration_from(measured, load_gpu(preset), preset)
    write_atomic(path, cal.model_dump_json(indent=2))
    if as_json:
        click.echo(cal.model_dump_json(indent=2))
    else:
        o, t = cal.overheads, cal.throughput
        click.echo(f"{name}: CUDA context {o.cuda_context_bytes / 2**20:.0f} MiB, communicator "
                   f"{o.communicator_bytes / 2**20:.0f} MiB, compute efficiency "
                   f"{t.compute_efficiency_by_gpu[name]}, optimizer HBM efficiency {t.optimizer_hbm_efficiency:.0%}"
                   f" -> {path}")


# ---------------------------------------------------------------- presets


@click.command("presets", cls=Command)
@click.option("--json", "as_json", is_flag=True, help="print the presets as JSON")
def presets_command(as_json):
    """List the model and GPU presets (names, aliases, sizes, sources)."""
    import json

    from planner import catalog
    from planner.params import active_params, total_params

    models = []
    for preset_id in catalog.model_ids():
        preset, spec = catalog.model_preset(preset_id), catalog.load_model(preset_id)
        models.append(dict(id=preset_id, aliases=list(preset.aliases), num_params=total_params(spec),
                           active_params=active_params(spec), experts=spec.num_experts,
                           experts_per_token=spec.experts_per_token, layers=spec.total_layers, hidden=spec.hidden_size, heads=spec.num_heads,
                           kv_heads=spec.num_kv_heads, vocab=spec.vocab_size, source=spec.source))
    gpus = []
    for preset_id in catalog.gpu_ids():
        preset, spec = catalog.gpu_preset(preset_id), catalog.load_gpu(preset_id)
        gpus.append(dict(id=preset_id, aliases=list(preset.aliases), name=spec.name, memory_bytes=spec.memory_bytes,
                         bf16_tflops=spec.peak_tflops.bf16, fp32_tflops=spec.peak_tflops.fp32,
                         int8_tops=spec.peak_tflops.int8, hbm_gb_s=spec.hbm_bandwidth_gb_s, source=spec.source))
    if as_json:
        click.echo(json.dumps({"models": models, "gpus": gpus}, indent=2))
        return
    from rich.table import Table

    from trainplan.report import gib, params_text, print_table

    console = _console()
    table = Table(title="models", title_justify="left", header_style="bold")
    for column in ("id", "aliases", "params", "active", "experts (k)", "layers", "hidden", "heads (kv)", "vocab"):
        table.add_column(column, justify="right" if column not in ("id", "aliases") else "left")
    for m in models:
        moe = m["experts"] > 0
        table.add_row(m["id"], ", ".join(m["aliases"]), params_text(m["num_params"]),
                      params_text(m["active_params"]) if moe else "", f"{m['experts']} ({m['experts_per_token']})"
                      if moe else "", str(m["layers"]), str(m["hidden"]), f"{m['heads']} ({m['kv_heads']})",
                      f"{m['vocab']:,}")
    print_table(console, table)
    table = Table(title="GPUs", title_justify="left", header_style="bold")
    for column in ("id", "aliases", "memory GiB", "bf16 TFLOP/s", "fp32 TFLOP/s", "int8 TOPS", "HBM GB/s"):
        table.add_column(column, justify="right" if column not in ("id", "aliases") else "left")
    for g in gpus:
        table.add_row(g["id"], ", ".join(g["aliases"]), gib(g["memory_bytes"]),
                      f"{g['bf16_tflops']:g}" if g["bf16_tflops"] else "-", f"{g['fp32_tflops']:g}",
                      f"{g['int8_tops']:g}" if g["int8_tops"] else "-", f"{g['hbm_gb_s']:g}")
    print_table(console, table)


# ---------------------------------------------------------------- entry points


@click.group(cls=Group)
@click.version_option(package_name="trainplan")
def main():
    """trainplan: will it fit, which layout is fastest -- planned, run and measured."""


main.add_command(plan_command)
main.add_command(run_command)
main.add_command(profile_command)
main.add_command(compare_command)
main.add_command(calibrate_command)
main.add_command(presets_command)


def plan_main():
    plan_command.main(prog_name="plan")


if __name__ == "__main__":
    main()
