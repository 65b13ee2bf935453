"""Profile a layout: plan it, run it with per-phase memory tracking, compare."""

from __future__ import annotations

import platform
import time

from planner.calibration import Calibration, Overheads
from planner.configs import GPUSpec, ModelSpec, TrainConfig
from planner.estimate import estimate
from profiler.report import ProfileReport, compare, failed_report
from strategies.launch import RunFailedError, launch
from strategies.train import RunConfig, RunResult

MIN_STEPS = 3  # DDP rebuilds its buckets in the second step; profile a later one
TIMED_STEPS = 2  # untracked steps between warm-up and the tracked last step


def environment(result: RunResult | None = None) -> dict[str, str]:
    from strategies.nvml import NvmlUnavailable, device_info

    env = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "python": platform.python_version()}
    try:
        info = device_info(0)
        env |= {"gpu": info["name"], "driver": info["driver"]}
    except NvmlUnavailable as exc:
        env["gpu"] = f"none ({exc})"
    if result is not None:
        env |= {"torch": result.torch_version, "backend": result.backend, "device": result.device}
    return env


def profile_layout(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, calibration: Calibration, *,
                   steps: int = MIN_STEPS, simulate_world: int | None = None, timeout_s: float = 1800,
                   on_cpu: bool = True, data: str | None = None, seed: int = 0, fail_rank: int | None = None,
                   fail_step: int = 0, fail_kind: str = "error", fake_tp: bool = False,
                   replay_allocator: bool = False) -> ProfileReport:
    """Plan, run (``simulate_world``: one process for rank 0), measure, compare. An
    out-of-memory run is a result (status "oom"); any other failure raises RunFailedError.

    ``replay_allocator`` (a CPU run): record rank 0's allocations and replay them through the
    model of PyTorch's CUDA caching allocator (planner/allocator.py), so the report compares the
    planner's reserved memory and device peak for ``gpu`` with what that allocator would hold."""
    device_calibration = calibration
    device_estimate = estimate(model, gpu, train, calibration) if replay_allocator else None
    if on_cpu:
        # no CUDA context, communicators or allocator on a CPU: predict without overheads
        calibration = calibration.model_copy(update={"overheads": Overheads.none()})
    est = estimate(model, gpu, train, calibration)
    steps = max(steps, MIN_STEPS + TIMED_STEPS) if simulate_world is None else max(steps, MIN_STEPS)
    config = RunConfig(model=model, train=train, steps=steps, warmup=MIN_STEPS - 1, seed=seed,
                       data=data, profile=True, simulate_world=simulate_world, fake_tensor_parallel=fake_tp,
                       fail_rank=fail_rank, fail_step=fail_step, fail_kind=fail_kind,
                       trace_allocations=replay_allocator)
    nproc = 1 if simulate_world else train.gpus
    try:
        result = RunResult.model_validate_json(launch(config.model_dump_json(), nproc, timeout_s,
                                                          worker="profiler.worker"))
    except RunFailedError as exc:
        if exc.oom:
            message = str(exc).split(": ", 2)[-1] if ": " in str(exc) else str(exc)
            return failed_report(est, environment(), "oom", message)
        raise
    report = compare(est, result, environment(result))
    if device_estimate is not None and result.allocations is not None:
        _add_replay(report, device_estimate, device_calibration, result.allocations)
    if fake_tp and simulate_world and train.tp > 1 and on_cpu:
        report.notes.append("fake tensor parallelism (--fake-tp): DTensor's loss_parallel holds two more fp32 "
                            "vocabulary shards at the end of forward than a real rank (a measurement artefact, "
                            "measured on tiny-llama against real shards)")
    return report


def _add_replay(report: ProfileReport, est, calibration: Calibration, events: list) -> None:
    """Rows for rank 0's allocation trace replayed through the caching-allocator model, against
    the planner's reserved memory and device peak for the planned GPU (``est``)."""
    from planner.allocator import replay
    from planner.memory import communicator_count
    from profiler.alloc_trace import device_events
    from profiler.report import Row, _error

    train = est.train
    expandable = train.alloc_conf == "expandable_segments"
    replayed = replay(device_events(events, train.offload), expandable_segments=expandable)
    stage = est.stages[0]
    overheads = calibration.overheads
    fixed = overheads.cuda_context_bytes + communicator_count(train) * overheads.communicator_bytes
    planned_reserved = stage.peak - fixed
    replayed_device = replayed.peak_reserved + fixed
    report.rows += [
        Row(quantity="max_memory_reserved (replayed, rank 0)", unit="bytes", predicted=planned_reserved,
            measured=replayed.peak_reserved, error_pct=_error(planned_reserved, replayed.peak_reserved)),
        Row(quantity=f"device memory on {est.gpu} (replayed + context + communicators)", unit="bytes",
            predicted=stage.peak, measured=replayed_device, error_pct=_error(stage.peak, replayed_device)),
    ]
    conf = "expandable segments" if expandable else "default segments"
    report.notes.append(
        f"allocator replay: rank 0's {len(events):,} allocation events through PyTorch's caching allocator "
        f"(planner/allocator.py, {conf}, with cuBLAS's and FlashAttention's CUDA workspaces, "
        f"profiler/alloc_trace.py); the device memory adds the CUDA context "
        f"({overheads.cuda_context_bytes / 2**30:.2f} GiB) and {communicator_count(train)} NCCL communicator(s) "
        f"of {calibration.label}; it fits {est.gpu}'s {est.gpu_memory_bytes / 2**30:.1f} GiB: "
        f"{'yes' if replayed_device <= est.gpu_memory_bytes else 'no'}")
