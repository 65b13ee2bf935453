"""The training loop one rank runs, and the result objects of a run.

Every layout sees the same global batch: step k trains samples k*G .. (k+1)*G - 1, data-
parallel rank r takes its contiguous G/dp of them, split into micro-batches (or handed to the
pipeline schedule, which splits them the same way). The loss reported per step is the mean
over the global batch; gradients are averaged the same way (1/m per micro-batch, averaged
over data-parallel ranks), so every layout follows the single-process trajectory.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from planner.configs import ModelSpec, TrainConfig
from planner.errors import ConfigError
from strategies.data import SyntheticTokens, TokenFile, batch
from strategies.kernels.optim import MasterWeightOptimizer, state_tensors
from strategies.model import build_model
from strategies.parallelize import Parallelized, parallelize


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: ModelSpec
    train: TrainConfig
    steps: int = Field(default=5, gt=0)
    warmup: int = Field(default=1, ge=0, description="steps left out of the timing summary")
    seed: int = 0
    data: str | None = Field(default=None, description="token file; None: synthetic samples")
    compile: bool = False
    measure_activations: bool = Field(default=False, description="MemTracker over the last step's first "
                                                                 "micro-batch forward (not with pipelines)")
    fail_rank: int | None = Field(default=None, description="testing: this rank raises at fail_step")
    fail_step: int = 0


class StepRecord(BaseModel):
    step: int
    loss: float
    step_time_s: float
    tokens_per_s: float


class RankBytes(BaseModel):
    """Bytes a rank holds after its last optimizer step, before zero_grad: its share of
    parameters, gradients and optimizer state (unique storages of local shards)."""

    rank: int
    params: int
    grads: int
    optimizer: int
    activations: int | None = Field(default=None, description="activation bytes at the end of one micro-batch's "
                                                              "forward (MemTracker), when measured")
    max_memory_allocated: int | None = None
    max_memory_reserved: int | None = None


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
    notes: list[str] = []


def _scalar(t: torch.Tensor) -> float:
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t.detach().float().item())


def _unique_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def resident_bytes(par: Parallelized, rank: int) -> RankBytes:
    params = list(par.parameters())
    record = RankBytes(
        rank=rank,
        params=_unique_bytes(params),
        grads=_unique_bytes(p.grad for p in params),
        optimizer=_unique_bytes(state_tensors(par.optimizer)),
    )
    if par.device.type == "cuda":
        record.max_memory_allocated = torch.cuda.max_memory_allocated(par.device)
        record.max_memory_reserved = torch.cuda.max_memory_reserved(par.device)
    return record


def _loss_context(par: Parallelized):
    if not par.loss_parallel:
        return nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _optimizer_with_scaler(optimizer) -> MasterWeightOptimizer | None:
    inner = getattr(optimizer, "optim", optimizer)
    return inner if isinstance(inner, MasterWeightOptimizer) and inner.loss_scaling else None


def train_step(par: Parallelized, source, step: int, measure: dict | None = None) -> tuple[float, int]:
    """One optimizer step; returns (sum of micro-batch losses on this rank, their count).
    ``measure``: a dict that receives the activation bytes of the first micro-batch's forward."""
    cfg = par.cfg
    dp_rank = par.mesh["dp"].get_local_rank()
    per_replica = cfg.global_batch // cfg.dp
    first = step * cfg.global_batch + dp_rank * per_replica
    scaler = _optimizer_with_scaler(par.optimizer)
    total, count = 0.0, 0
    if par.pipeline is not None:
        if scaler is not None:
            raise ConfigError("fp16-mixed loss scaling is not supported with pipeline parallelism; use bf16-mixed")
        inputs, targets = batch(source, first, per_replica, par.device)
        with _loss_context(par):
            losses = par.pipeline.step(inputs, targets)
        return sum(_scalar(loss) for loss in losses), len(losses)
    model = par.modules[0]
    m = cfg.num_microbatches
    for j in range(m):
        inputs, targets = batch(source, first + j * cfg.micro_batch, cfg.micro_batch, par.device)
        sync = nullcontext() if j == m - 1 or not hasattr(model, "no_sync") else model.no_sync()
        tracker = _activation_tracker(par) if measure is not None and j == 0 else nullcontext()
        with sync, _loss_context(par), tracker:
            with par.precision.autocast(par.device.type):
                loss = model(inputs, targets)
            if measure is not None and j == 0:
                snapshot = tracker.get_tracker_snapshot("current")
                measure["activations"] = sum(d.get("Activation", 0) for d in snapshot.values())
            scaled = loss / m
            (scaler.scale_loss(scaled) if scaler is not None else scaled).backward()
        total += _scalar(loss)
        count += 1
    return total, count


def _activation_tracker(par: Parallelized):
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*par.modules, par.optimizer)
    return tracker


def run_rank(config: RunConfig, rank: int, world: int, device: torch.device) -> tuple[list[StepRecord], RankBytes]:
    spec, cfg = config.model, config.train
    if cfg.gpus != world:
        raise ConfigError(f"the layout is for {cfg.gpus} GPUs but {world} ranks are running")
    torch.manual_seed(config.seed)
    source = (TokenFile(config.data, spec.vocab_size, cfg.seq_len) if config.data
              else SyntheticTokens(spec.vocab_size, cfg.seq_len, config.seed))
    model = build_model(spec, "meta", _param_dtype(cfg), max_seq_len=cfg.seq_len)
    par = parallelize(model, cfg, world, rank, device, config.seed, config.compile)
    records, bytes_record = [], None
    tokens_per_step = cfg.global_batch * cfg.seq_len
    for step in range(config.steps):
        if config.fail_rank == rank and config.fail_step == step:
            raise RuntimeError(f"deliberate failure of rank {rank} at step {step} (--fail-rank)")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        last = step == config.steps - 1
        measure = {} if last and config.measure_activations and par.pipeline is None else None
        total, count = train_step(par, source, step, measure)
        par.optimizer.step()
        if last:
            bytes_record = resident_bytes(par, rank)
            if measure:
                bytes_record.activations = measure["activations"]
        par.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        summed = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(summed)
        loss = (summed[0] / summed[1]).item()
        records.append(StepRecord(step=step, loss=loss, step_time_s=elapsed, tokens_per_s=tokens_per_step / elapsed))
    return records, bytes_record


def _param_dtype(cfg: TrainConfig) -> torch.dtype:
    from strategies.precision import precision_plan

    return precision_plan(cfg.precision, cfg.zero_stage >= 2).param_dtype
