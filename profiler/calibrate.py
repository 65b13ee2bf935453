"""Calibration: measure the planner's constants on this GPU and write them as data.

Measured (one GPU, one process):

- **CUDA context**: NVML's memory for this process after the training steps (the context and
  every kernel module the steps loaded), less what the caching allocator reserved and the
  communicator;
- **communicator**: NVML's growth when an NCCL process group starts and runs its first
  all-reduce, less the allocator's growth (a one-rank communicator: a lower bound for larger
  groups, whose buffers grow with peers and channels);
- the caching allocator's cache is not a constant: the planner models it
  (``planner/allocator.py``); its reserved / allocated ratio is kept with the measurements;
- **compute efficiency**: the executed FLOPs of the steps (planner.flops) over the time left
  once the predicted optimizer step is taken out, divided by the dense peak -- less the flash
  attention, which the planner times at its own ``attention_efficiency`` (so that the
  calibrated step is predicted as measured);
- **compute time scale**: the same forward + backward time over the per-operation model's
  prediction for it (``planner/op_time.py``), where a GEMM model covers the GPU: the factor the
  planner applies to every compute time on it;
- **optimizer HBM efficiency**: bytes a fused AdamW step touches over its time and the HBM
  bandwidth.

The file (``calibration/<gpu>.json``) records GPU, driver, torch and CUDA versions, the date
and the raw measurements; ``plan --calibration FILE`` loads it, and a file shipped under
``presets/calibration`` is used automatically for its GPU.
"""

from __future__ import annotations

import statistics
import time

from planner.calibration import Calibration, default_calibration
from planner.configs import GPUSpec, ModelSpec, TrainConfig
from planner.errors import TrainplanError
from planner.catalog import load_model
from planner.flops import FLASH_BACKWARD_FACTOR, rank_attention_flops, stage_flops
from planner.params import total_params
from planner.precision import OPTIMIZER_STATES, RECIPES


def fit_compute_efficiency(executed_flops: float, compute_seconds: float, peak_flops: float,
                           attention_flops: float = 0.0, attention_flops_per_s: float = float("inf")) -> float:
    """Fraction of the dense peak the compute ran at. ``attention_flops`` (forward and backward
    of the flash attention, included in ``executed_flops``) ran at ``attention_flops_per_s``, as
    planner.step_time times them; the rest at the fitted efficiency."""
    rest_seconds = compute_seconds - attention_flops / attention_flops_per_s
    if compute_seconds <= 0 or rest_seconds <= 0:
        raise TrainplanError("measured compute time is not positive; take more or longer steps")
    return (executed_flops - attention_flops) / (rest_seconds * peak_flops)


def optimizer_bytes_touched(num_params: int, precision: str, optimizer: str = "adamw") -> int:
    """What one fused step reads and writes per parameter (as planner.step_time counts it)."""
    r = RECIPES[precision]
    master_or_param = r.master_bytes or r.param_bytes
    states = OPTIMIZER_STATES[optimizer] * r.state_bytes
    return num_params * (2 * (master_or_param + states) + r.grad_bytes + (r.param_bytes if r.has_master else 0))


def measure(model: ModelSpec, gpu: GPUSpec, seq_len: int = 2048, micro_batch: int = 4, steps: int = 6,
            precision: str = "bf16-mixed") -> dict:
    """Run the measurements in this process on CUDA device 0; returns the raw figures."""
    import os

    import torch
    import torch.distributed as dist

    from strategies.data import SyntheticTokens
    from strategies.model import build_model
    from strategies.nvml import device_info, process_used_memory
    from strategies.parallelize import parallelize
    from strategies.train import train_step

    if not torch.cuda.is_available():
        raise TrainplanError("calibrate measures a CUDA GPU, and this machine has none (no NVIDIA driver)")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)

    def used() -> int:
        value = process_used_memory(0)
        return value if value is not None else device_info(0)["memory_used"]

    torch.empty(1, device=device)
    torch.cuda.synchronize()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    before_used, before_reserved = used(), torch.cuda.memory_reserved(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    probe = torch.ones(1 << 20, device=device)
    dist.all_reduce(probe)
    torch.cuda.synchronize()
    del probe
    communicator = (used() - before_used) - (torch.cuda.memory_reserved(device) - before_reserved)

    train = TrainConfig(gpus=1, seq_len=seq_len, micro_batch=micro_batch, precision=precision)
    par = parallelize(build_model(model, "meta", _dtype(precision), max_seq_len=seq_len), train, 1, 0, device)
    source = SyntheticTokens(model.vocab_size, seq_len)
    times, optimizer_times = [], []
    for step in range(steps):
        if step == 1:
            torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(par, source, step)
        torch.cuda.synchronize()
        mid = time.perf_counter()
        par.optimizer.step()
        torch.cuda.synchronize()
        end = time.perf_counter()
        par.optimizer.zero_grad(set_to_none=True)
        if step >= 1:
            times.append(end - start)
            optimizer_times.append(end - mid)
    max_allocated = torch.cuda.max_memory_allocated(device)
    max_reserved = torch.cuda.max_memory_reserved(device)
    # what the process holds outside the allocator once the training kernels are loaded
    context = used() - torch.cuda.memory_reserved(device) - max(communicator, 0)
    flops = stage_flops(model, train, 0)
    info = device_info(0)
    dist.destroy_process_group()
    return {
        "gpu": info["name"], "driver": info["driver"], "torch": torch.__version__,
        "cuda": torch.version.cuda or "", "model": model.name, "seq_len": seq_len, "micro_batch": micro_batch,
        "precision": precision, "cuda_context_bytes": int(context), "communicator_bytes": int(max(communicator, 0)),
        "max_memory_allocated": int(max_allocated), "max_memory_reserved": int(max_reserved),
        "step_time_s": statistics.median(times), "forward_backward_s": statistics.median(
            [t - o for t, o in zip(times, optimizer_times)]),
        "optimizer_step_s": statistics.median(optimizer_times), "executed_flops": flops.total,
        "num_params": total_params(model),
    }


def measured_layout(measured: dict) -> tuple[ModelSpec, TrainConfig]:
    """The model and one-GPU layout a calibration's raw measurements were taken on."""
    return load_model(measured["model"]), TrainConfig(gpus=1, seq_len=measured["seq_len"],
                                                      micro_batch=measured["micro_batch"],
                                                      precision=measured["precision"])


def compute_time_scale(model: ModelSpec, gpu: GPUSpec, train: TrainConfig, forward_backward_s: float,
                       base: Calibration) -> float | None:
    """The measured forward + backward time over what the per-operation model (planner/op_time.py)
    predicts for the same single-GPU step with the shipped constants: the machine factor the
    planner applies to every compute time on this GPU (None where no GEMM model covers it)."""
    from planner.gemm import gemm_model_for
    from planner.step_time import estimate_step

    if gemm_model_for(gpu.name, RECIPES[train.precision].compute_dtype) is None:
        return None
    step = estimate_step(model, gpu, train, base, check=False)
    return forward_backward_s / (step.breakdown.compute_s + step.breakdown.recompute_s)


def calibration_from(measured: dict, gpu: GPUSpec, preset_id: str) -> Calibration:
    """Fit the constants to the raw figures and return the calibration object."""
    base = default_calibration()
    dtype = RECIPES[measured["precision"]].compute_dtype
    peak = gpu.peak_tflops.for_dtype(dtype) * 1e12
    model, train = measured_layout(measured)
    attention = (1 + FLASH_BACKWARD_FACTOR) * (rank_attention_flops(model, train) * model.num_layers
                                               + rank_attention_flops(model, train, "encoder") * model.encoder_layers)
    attention_rate = peak * base.throughput.attention_efficiency_by_gpu.get(gpu.name,
                                                                            base.throughput.attention_efficiency)
    efficiency = fit_compute_efficiency(measured["executed_flops"], measured["forward_backward_s"], peak,
                                        attention, attention_rate)
    touched = optimizer_bytes_touched(measured["num_params"], measured["precision"])
    hbm = min(1.0, touched / (measured["optimizer_step_s"] * gpu.hbm_bandwidth_gb_s * 1e9))
    by_gpu = dict(base.throughput.compute_efficiency_by_gpu)
    by_gpu[gpu.name] = {**by_gpu.get(gpu.name, {}), dtype: round(efficiency, 4)}
    update = {"compute_efficiency_by_gpu": by_gpu, "optimizer_hbm_efficiency": round(hbm, 4)}
    measured_names = [f"compute_efficiency[{gpu.name}][{dtype}]"]
    scale = compute_time_scale(model, gpu, train, measured["forward_backward_s"], base)
    if scale is not None:
        update["compute_time_scale_by_gpu"] = {**base.throughput.compute_time_scale_by_gpu,
                                               gpu.name: {dtype: round(scale, 4)}}
        measured_names.append(f"compute_time_scale[{gpu.name}][{dtype}]")
    throughput = base.throughput.model_copy(update=update)
    overheads = base.overheads.model_copy(update={
        "cuda_context_bytes": measured["cuda_context_bytes"],
        "communicator_bytes": measured["communicator_bytes"],
        "fragmentation": None,
        "calibrated": True,
        "source": f"measured by trainplan calibrate on {measured['gpu']} ({measured['date']})",
    })
    return Calibration(
        id=preset_id, calibrated=True, device=gpu.name, chip=gpu.chip,
        source=f"trainplan calibrate: {measured['model']}, seq {measured['seq_len']}, micro-batch "
               f"{measured['micro_batch']}, {measured['precision']} on {measured['gpu']}",
        environment={k: str(measured[k]) for k in ("gpu", "driver", "torch", "cuda")},
        date=measured["date"], overheads=overheads, throughput=throughput,
        calibrated_constants=["cuda_context_bytes", "communicator_bytes", *measured_names, "optimizer_hbm_efficiency"],
        measurements=measured,
    )


def _dtype(precision: str):
    from strategies.precision import precision_plan

    return precision_plan(precision, sharded=False).param_dtype
