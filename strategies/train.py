"""The training loop one rank runs, and the result objects of a run.

Every layout sees the same global batch: step k trains samples k*G .. (k+1)*G - 1, data-
parallel rank r takes its contiguous G/dp of them, split into micro-batches (or handed to the
pipeline schedule, which splits them the same way). The loss reported per step is the mean
over the global batch; gradients are averaged the same way (1/m per micro-batch, averaged
over data-parallel ranks), so every layout follows the single-process trajectory.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from planner.capabilities import run_refusal
from planner.configs import ModelSpec, TrainConfig
from planner.errors import ConfigError
from strategies.context_parallel import load_balanced_shard
from strategies.data import SyntheticTokens, TokenFile, batch
from strategies.kernels.optim import MasterWeightOptimizer, state_tensors
from strategies.model import build_model, materialize
from strategies.parallelize import Parallelized, build_mesh, parallelize


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: ModelSpec
    train: TrainConfig
    steps: int = Field(default=5, gt=0)
    warmup: int = Field(default=1, ge=0, description="steps left out of the timing summary")
    seed: int = 0
    data: str | None = Field(default=None, description="token file; None: synthetic samples")
    profile: bool = Field(default=False, description="per-phase memory of the last step: needs a phase tracker, "
                                                     "which `python -m profiler.worker` provides")
    simulate_world: int | None = Field(default=None, description="run rank 0 of this many ranks in one process "
                                                                 "(fake process group)")
    fake_tensor_parallel: bool = Field(default=False, description="a simulated tensor-parallel rank on fake tensors "
                                       "too (DTensor over FakeTensorMode): full-size TP layouts in seconds")
    fail_rank: int | None = Field(default=None, description="testing: this rank raises at fail_step")
    fail_step: int = 0
    fail_kind: str = Field(default="error", description="testing: 'error', or 'oom' for a simulated out-of-memory")
    trace_allocations: bool = Field(default=False, description="record every device allocation and free, with its "
                                    "stream, for the caching-allocator replay: needs an allocation tracer, which "
                                    "`python -m profiler.worker` provides")


class StepRecord(BaseModel):
    step: int
    loss: float | None = Field(description="None for a simulated rank (fake tensors have no values)")
    step_time_s: float
    tokens_per_s: float


class RankBytes(BaseModel):
    """Bytes a rank holds after its last optimizer step, before zero_grad: its share of
    parameters, gradients and optimizer state (unique storages of local shards)."""

    rank: int
    params: int
    grads: int
    optimizer: int
    host_params: int = 0
    host_grads: int = 0
    host_optimizer: int = 0
    activations: int | None = Field(default=None, description="activation bytes at the end of forward "
                                                              "(MemTracker), when profiled")
    phases: dict[str, dict[str, int]] = Field(default_factory=dict, description="per phase: the planner's "
                                              "components at that phase's peak (profiler.memory)")
    phase_totals: dict[str, int] = Field(default_factory=dict)
    max_memory_allocated: int | None = None
    max_memory_reserved: int | None = None
    device_used: int | None = Field(default=None, description="NVML: device memory this process uses")


class RunResult(BaseModel):
    model_name: str
    num_params: int
    train: TrainConfig
    world: int
    backend: str
    device: str
    torch_version: str
    steps: list[StepRecord]
    ranks: list[RankBytes]
    median_step_time_s: float
    tokens_per_s: float
    simulated_world: int | None = None
    notes: list[str] = []
    allocations: list[list] | None = Field(default=None, description="the allocation trace (trace_allocations): "
                                           "[\"a\", id, bytes, stream], [\"f\", id], [\"m\", marker]")


def _scalar(t: torch.Tensor) -> float:
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t.detach().float().item())


def _local_tensors(tensors):
    """The plain tensors holding ``tensors``' data: a DTensor's local shard, and the inner tensors
    of a wrapper subclass (torchao's fp8 all-gather weight wraps the fp32 parameter)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if is_traceable_wrapper_subclass(local):
            yield from _local_tensors(getattr(local, name) for name in local.__tensor_flatten__()[0])
        else:
            yield local


def _unique_bytes(tensors, device_type: str | None = None) -> int:
    """Bytes of the unique storages behind ``tensors`` (on ``device_type`` only, if given)."""
    storages = {}
    for local in _local_tensors(tensors):
        if device_type is not None and local.device.type != device_type:
            continue
        storage = local.untyped_storage()
        storages[storage._cdata] = storage.nbytes()  # the StorageImpl: unique, also for fake tensors
    return sum(storages.values())


def host_resident(par: Parallelized) -> list[torch.Tensor]:
    """What an offloaded layout keeps in host memory: the optimizer state (and the fp32 masters),
    and with parameter offload the parameter and gradient shards too."""
    tensors = state_tensors(par.optimizer)
    if par.cfg.offload == "params":
        params = list(par.parameters())
        tensors += params + [p.grad for p in params if p.grad is not None]
    return tensors


def resident_bytes(par: Parallelized, rank: int) -> RankBytes:
    """On a GPU, what lives on the device and what lives on the host (offload) apart; on a CPU
    everything is "device"."""
    params = list(par.parameters())
    grads = [p.grad for p in params]
    states = state_tensors(par.optimizer)
    device = par.device.type
    host = "cpu" if device != "cpu" else None
    record = RankBytes(
        rank=rank,
        params=_unique_bytes(params, device if host else None),
        grads=_unique_bytes(grads, device if host else None),
        optimizer=_unique_bytes(states, device if host else None),
        host_params=_unique_bytes(params, host) if host else 0,
        host_grads=_unique_bytes(grads, host) if host else 0,
        host_optimizer=_unique_bytes(states, host) if host else 0,
    )
    if device == "cuda":
        record.max_memory_allocated = torch.cuda.max_memory_allocated(par.device)
        record.max_memory_reserved = torch.cuda.max_memory_reserved(par.device)
        record.device_used = _device_used(par.device)
    return record


def _device_used(device: torch.device) -> int | None:
    """NVML: this process's device memory (CUDA context, NCCL, the caching allocator's
    reservations); where the driver cannot attribute memory to processes, the device's."""
    from strategies.nvml import NvmlUnavailable, device_info, process_used_memory

    try:
        used = process_used_memory(device.index or 0)
        return used if used is not None else device_info(device.index or 0)["memory_used"]
    except NvmlUnavailable:
        return None


def _loss_context(par: Parallelized):
    if not par.loss_parallel:
        return nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _optimizer_with_scaler(optimizer) -> MasterWeightOptimizer | None:
    inner = getattr(optimizer, "optim", optimizer)
    return inner if isinstance(inner, MasterWeightOptimizer) and inner.loss_scaling else None


class _NoPhases:
    """Stand-in for a phase tracker when a step is not profiled. A tracker (``profiler.memory.
    PhaseMemory`` is the one the profiler injects) is a context manager with ``phase(name)``
    regions, ``peaks``, ``totals`` and ``forward_end``, built as ``tracker(modules, optimizer,
    fsdp=..., device_type=...)``."""

    current_phase = "forward"

    @contextmanager
    def phase(self, name: str):
        self.current_phase = name
        yield


def train_step(par: Parallelized, source, step: int, phases=None, losses: bool = True) -> tuple[float, int]:
    """One optimizer step's forward and backward; returns (sum of micro-batch losses on this
    rank, their count). ``phases`` marks forward and backward regions (profiling)."""
    phases = phases or _NoPhases()
    value = _scalar if losses else (lambda t: 0.0)
    cfg = par.cfg
    dp_rank = par.mesh["dp"].get_local_rank()
    per_replica = cfg.global_batch // cfg.dp
    first = step * cfg.global_batch + dp_rank * per_replica
    scaler = _optimizer_with_scaler(par.optimizer)
    total, count = 0.0, 0
    if par.pipeline is not None:
        inputs, targets = batch(source, first, per_replica, par.device)
        # forward and backward interleave inside a pipeline schedule: one region, "backward"
        with _loss_context(par), phases.phase("backward"):
            stage_losses = par.pipeline.step(inputs, targets)
        return sum(value(loss) for loss in stage_losses), len(stage_losses)
    model = par.modules[0]
    m = cfg.num_microbatches
    for j in range(m):
        inputs, targets = batch(source, first + j * cfg.micro_batch, cfg.micro_batch, par.device)
        if cfg.cp > 1:  # this rank's share of each sequence (strategies/context_parallel.py)
            rank = par.mesh["cp"].get_local_rank()
            inputs, targets = (load_balanced_shard(t, 1, rank, cfg.cp) for t in (inputs, targets))
        sync = nullcontext() if j == m - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync, _loss_context(par):
            with par.precision.autocast(par.device.type), phases.phase("forward"):
                if par.teacher is None:
                    loss = model(inputs, targets)
                else:  # distillation: the teacher's fp32 log-probabilities, then the student's loss
                    with torch.no_grad():
                        teacher_logprobs = F.log_softmax(par.teacher(inputs).float(), dim=-1)
                    loss = model(inputs, targets, teacher_logprobs=teacher_logprobs)
                    del teacher_logprobs  # the loss's backward keeps its own reference
            scaled = loss / m
            with phases.phase("backward"):
                (scaler.scale_loss(scaled) if scaler is not None else scaled).backward()
        total += value(loss)
        count += 1
    return total, count


class _Traced:
    """The fake mode (or nothing) with an allocation tracer entered inside it, as one reusable
    context manager: the tracer must sit above FakeTensorMode to see the fake tensors it makes."""

    def __init__(self, fake, tracer):
        self.fake, self.tracer = fake, tracer

    def __enter__(self):
        self.fake.__enter__()
        self.tracer.__enter__()
        return self

    def __exit__(self, *exc):
        self.tracer.__exit__(*exc)
        return self.fake.__exit__(*exc)


def check_runnable(config: RunConfig, cuda: bool) -> None:
    """The strategy layer's start-up check: a layout it does not execute is refused, with the
    reason of planner/capabilities.py, before anything is built (``cuda``: the ranks run on CUDA
    GPUs). ``launch`` asks it before any rank starts, ``run_rank`` again for ranks started by
    torchrun."""
    train, simulated = config.train, config.simulate_world is not None
    if reason := run_refusal(config.model, train, cuda=cuda, simulated=simulated):
        raise ConfigError(reason)


def run_rank(config: RunConfig, rank: int, world: int, device: torch.device,
             phase_tracker=None, alloc_tracer=None) -> tuple[list[StepRecord], RankBytes]:
    """``phase_tracker``: the class that measures a profiled step per phase (see ``_NoPhases``);
    ``alloc_tracer``: the allocation tracer of a traced run (``profiler.alloc_trace``), a dispatch
    mode entered around everything the rank allocates. The strategy layer runs steps, the layer
    above it measures them."""
    spec, cfg = config.model, config.train
    check_runnable(config, cuda=device.type == "cuda")
    if cfg.gpus != world:
        raise ConfigError(f"the layout is for {cfg.gpus} GPUs but {world} ranks are running")
    if config.profile and phase_tracker is None:
        raise ConfigError("a profiled run needs a phase tracker: launch `python -m profiler.worker`")
    if config.trace_allocations and alloc_tracer is None:
        raise ConfigError("an allocation trace needs a tracer: launch `python -m profiler.worker`")
    if alloc_tracer is not None and device.type != "cpu":
        raise ConfigError("allocation traces are taken on a CPU (fake tensors stand in for the GPU's); on a "
                          "GPU read the caching allocator itself (torch.cuda.memory_stats)")
    torch.manual_seed(config.seed)
    source = (TokenFile(config.data, spec.vocab_size, cfg.seq_len) if config.data
              else SyntheticTokens(spec.vocab_size, cfg.seq_len, config.seed))
    fake = _fake_mode(config, device)
    if alloc_tracer is not None:
        fake = _Traced(fake, alloc_tracer)
    model = build_model(spec, "meta", _param_dtype(cfg), max_seq_len=cfg.seq_len)
    mesh = build_mesh(cfg, world, device)
    par = parallelize(model, cfg, world, rank, device, config.seed, mesh=mesh,
                      fake=None if isinstance(fake, nullcontext) else fake,
                      simulated=config.simulate_world is not None)
    if cfg.teacher:
        par.teacher = _teacher(cfg, device, config.seed, fake)
    with fake:
        return _loop(config, par, source, rank, device, losses=config.simulate_world is None,
                     phase_tracker=phase_tracker, alloc_tracer=alloc_tracer)


def _teacher(cfg: TrainConfig, device: torch.device, seed: int, fake) -> torch.nn.Module:
    """Distillation's teacher: the reference model of ``cfg.teacher``, frozen, in the compute
    dtype, replicated on every rank, run under no_grad (its own initial values: seed + 1)."""
    from planner.catalog import load_model
    from strategies.precision import precision_plan

    plan = precision_plan(cfg.precision, cfg.zero_stage >= 2)
    dtype = plan.autocast_dtype or plan.fsdp_param_dtype or plan.param_dtype
    teacher = build_model(load_model(cfg.teacher), "meta", dtype, max_seq_len=cfg.seq_len)
    with fake:
        materialize(teacher, device, seed + 1)
    teacher.requires_grad_(False)
    return teacher.eval()


def _fake_mode(config: RunConfig, device: torch.device):
    """A simulated world on CPU runs under FakeTensorMode: shapes and sizes, no real memory
    (a 7B rank fits in a few hundred MB of RAM). On a GPU the tensors are real; so are they
    with pipeline parallelism, whose schedule cannot run on fake tensors, and by default with
    tensor parallelism: DTensor runs on fake tensors (torch 2.13; an 8B dp4 x tp2 rank at seq
    4096 in 44 s), but its loss_parallel then holds two more fp32 vocabulary shards at the end
    of forward than a real rank does (measured on tiny-llama: +1.04 MB = 2 x 512 tokens x 256
    x 4 B; real shards -0.12%), so fake tensor parallelism is opt-in
    (``fake_tensor_parallel``, ``profile --fake-tp``)."""
    t = config.train
    if (config.simulate_world is None or device.type != "cpu"
            or (t.tp > 1 and not config.fake_tensor_parallel)):
        return nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _loop(config: RunConfig, par: Parallelized, source, rank: int, device: torch.device,
          losses: bool, phase_tracker=None, alloc_tracer=None) -> tuple[list[StepRecord], RankBytes]:
    cfg = par.cfg
    records, bytes_record = [], None
    tokens_per_step = cfg.global_batch * cfg.seq_len
    phases = _NoPhases()
    for step in range(config.steps):
        if config.fail_rank == rank and config.fail_step == step:
            if config.fail_kind == "oom":
                raise torch.OutOfMemoryError(f"out of memory at backward of step {step}: simulated (--fail-kind oom)")
            raise RuntimeError(f"deliberate failure of rank {rank} at step {step} (--fail-rank)")
        last = step == config.steps - 1
        if alloc_tracer is not None:
            alloc_tracer.mark(f"step {step}")
        if last and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        # Interleaved schedules run several stage modules of one rank in alternation, which the
        # trackers' per-module bookkeeping cannot follow: resident bytes only, there.
        tracked = last and config.profile and cfg.schedule != "interleaved"
        if tracked:
            modules = par.modules + ([par.teacher] if par.teacher is not None else [])
            phases = phase_tracker(modules, par.optimizer, fsdp=cfg.zero_stage >= 2, device_type=device.type,
                                   compiled=cfg.compile)
        try:
            with phases if tracked else nullcontext():
                total, count = train_step(par, source, step, phases, losses)
                if alloc_tracer is not None:
                    alloc_tracer.mark("optimizer")
                with phases.phase("optimizer"):
                    par.optimizer.step()
                if alloc_tracer is not None:
                    alloc_tracer.mark("after optimizer")
                    if cfg.offload != "none":  # offloaded state lives in host memory on a GPU
                        alloc_tracer.host(host_resident(par))
                if last:
                    bytes_record = resident_bytes(par, rank)
        except torch.OutOfMemoryError as exc:
            phase = getattr(phases, "current_phase", None) or "the step"
            raise torch.OutOfMemoryError(f"out of memory at {phase} of step {step}: "
                                         f"{str(exc).splitlines()[0]}") from None
        if tracked:
            bytes_record.phases, bytes_record.phase_totals = phases.peaks, phases.totals
            if phases.forward_end:
                bytes_record.activations = phases.forward_end["activations"]
        # DDP's gradients are views into its buckets, which live on anyway: zero them in place
        # (the planner counts DDP gradients in every phase); elsewhere free them.
        par.optimizer.zero_grad(set_to_none=not par.ddp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        summed = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        if dist.is_initialized() and losses:
            dist.all_reduce(summed)
        loss = (summed[0] / summed[1]).item() if losses and summed[1] > 0 else None
        records.append(StepRecord(step=step, loss=loss, step_time_s=elapsed, tokens_per_s=tokens_per_step / elapsed))
    return records, bytes_record


def _param_dtype(cfg: TrainConfig) -> torch.dtype:
    from strategies.precision import precision_plan

    return precision_plan(cfg.precision, cfg.zero_stage >= 2).param_dtype
