"""Predicted against measured, per component, per rank: the ``ProfileReport``.

Measured components of a rank, in the planner's definitions:

- ``params``, ``grads``, ``optimizer``: the bytes of the unique storages the rank holds after
  its last optimizer step (exact; offloaded bytes apart, as ``host``);
- ``activations``: what the forward pass leaves saved for backward (the tracker's activations
  at the end of forward); with pipelines, where forward and backward interleave, the
  activations at the step's peak;
- ``temporaries``: the rest of the peak phase's total (gathered parameters, buffers of the
  loss, activation gradients, optimizer-step scratch), i.e. total - the components above;
- ``peak``: the largest phase total the tracker saw (allocated bytes, as the planner's peak
  without overhead); on CUDA also ``torch.cuda.max_memory_allocated``;
- ``overhead`` (CUDA): what NVML says the process uses beyond its peak allocation (context,
  NCCL, allocator fragmentation).

Error % = (predicted - measured) / measured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.layout import RankLayout
from planner.estimate import Estimate
from planner.memory import HostMemory
from planner.memory import RankMemory as PlannerRankMemory
from strategies.train import RankBytes, RunResult

MEMORY_KEYS = ("params", "grads", "optimizer", "activations", "temporaries", "overhead", "peak")


Memory = PlannerRankMemory  # integer bytes with the planner's keys, predicted or measured


class _Checked(BaseModel):
    """Reports are read back from files (``trainplan compare``): numbers must be finite."""

    model_config = ConfigDict(allow_inf_nan=False)


class RankMemory(_Checked):
    rank: int = Field(ge=0)
    stage: int = Field(ge=0)
    memory: Memory
    host: HostMemory
    phases: dict[str, int] = Field(default_factory=dict, description="total per phase")
    max_memory_allocated: int | None = Field(default=None, ge=0)
    max_memory_reserved: int | None = Field(default=None, ge=0)
    device_used: int | None = Field(default=None, ge=0)

    @property
    def fragmentation(self) -> float | None:
        """The caching allocator's reserve beyond its peak allocation (reserved / allocated - 1)."""
        if not self.max_memory_allocated or self.max_memory_reserved is None:
            return None
        return self.max_memory_reserved / self.max_memory_allocated - 1


class Side(_Checked):
    memory: Memory = Field(description="the most loaded rank")
    ranks: list[RankMemory] = Field(min_length=1)
    step_time_s: float | None = Field(default=None, gt=0)
    tokens_per_s: float | None = Field(default=None, gt=0)
    mfu: float | None = Field(default=None, ge=0)


class Row(_Checked):
    quantity: str
    unit: str
    predicted: float | None
    measured: float | None
    error_pct: float | None


# TrainConfig fields added after reports were stored: issue 11 (impl, compile), issue 12 (the rest).
# A stored report without one reads with the field's default (TrainConfig's; a default that ever
# changes keeps its old value here).
_ADDED_LATER = ("impl", "compile", "finetune", "lora_rank", "lora_targets", "base_precision", "train_embeddings",
                "lora_dtype", "teacher", "optimizer_in_backward", "paged_optimizer", "cp", "fp8_all_gather", "async_tp",
                "alloc_conf", "dp_shard", "dp_replicate", "exp_avg_dtype", "exp_avg_sq_dtype", "fp8_param_gather", "ep", "etp",
                "expert_load")


class ProfileReport(_Checked):
    model: str
    num_params: int = Field(gt=0)
    train: dict
    gpu: str
    environment: dict[str, str]
    simulated_world: int | None = Field(default=None, ge=2)
    status: Literal["ok", "oom", "failed"]
    message: str = ""
    predicted: Side
    measured: Side | None = None
    rows: list[Row] = []
    notes: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> ProfileReport:
        """What rendering relies on: a valid layout, a measured side when the run was ok, and
        every rank within the layout."""
        from planner.configs import TrainConfig
        from planner.errors import TrainplanError

        # reports stored before a field existed read with its default
        for name in _ADDED_LATER:
            self.train.setdefault(name, TrainConfig.model_fields[name].default)
        missing = [name for name in TrainConfig.model_fields if name not in self.train]
        if missing:
            raise ValueError(f"train lacks {', '.join(missing)}")
        try:
            train = TrainConfig(**self.train)
        except TrainplanError as exc:
            raise ValueError(f"train: {exc}") from None
        if self.status == "ok" and self.measured is None:
            raise ValueError("a report with status ok needs its measured side")
        for side in (self.predicted, self.measured):
            if side is not None and any(rank.rank >= train.gpus for rank in side.ranks):
                raise ValueError(f"a rank beyond the layout's {train.gpus} GPUs")
        if len(self.predicted.ranks) != train.gpus:
            raise ValueError(f"the prediction covers {len(self.predicted.ranks)} ranks, the layout {train.gpus}")
        return self


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured * 100


def predicted_side(est: Estimate) -> Side:
    t = est.train
    ranks = []
    for rank in range(t.gpus):
        stage = est.stages[RankLayout.of(t).stage_of(rank)]
        resident = stage.phases["optimizer"]
        ranks.append(RankMemory(
            rank=rank, stage=stage.stage,
            memory=Memory(params=resident.params, grads=resident.grads, optimizer=resident.optimizer,
                          activations=stage.saved_activations, temporaries=stage.temporaries,
                          overhead=stage.overhead, peak=stage.peak, peak_phase=stage.peak_phase),
            host=stage.host,
            phases={name: phase.total for name, phase in stage.phases.items()},
        ))
    worst = max(ranks, key=lambda r: r.memory.peak)
    th = est.throughput
    return Side(memory=worst.memory, ranks=ranks, step_time_s=th.step_time_s, tokens_per_s=th.tokens_per_s,
                mfu=th.mfu)


def _measured_rank(r: RankBytes, stage: int, pipeline: bool) -> RankMemory:
    phases = r.phases or {}
    totals = {name: total - phases[name].get("buffers", 0) for name, total in r.phase_totals.items()}
    peak_phase = max(totals, key=totals.get) if totals else None
    at_peak = phases.get(peak_phase, {}) if peak_phase else {}
    saved = r.activations if r.activations is not None and not pipeline else at_peak.get("activations", 0)
    peak = totals.get(peak_phase, 0) if peak_phase else 0
    activations_at_peak = at_peak.get("activations", 0)
    temporaries = max(0, peak - r.params - at_peak.get("grads", r.grads) - at_peak.get("optimizer", r.optimizer)
                      - activations_at_peak) if peak_phase else 0
    overhead = 0
    if r.device_used is not None and r.max_memory_allocated is not None:
        overhead = max(0, r.device_used - r.max_memory_allocated)
    return RankMemory(
        rank=r.rank, stage=stage,
        memory=Memory(params=r.params, grads=r.grads, optimizer=r.optimizer, activations=saved,
                      temporaries=temporaries, overhead=overhead, peak=peak, peak_phase=peak_phase),
        host=HostMemory(params=r.host_params, grads=r.host_grads, optimizer=r.host_optimizer,
                        per_rank=r.host_params + r.host_grads + r.host_optimizer),
        phases=totals, max_memory_allocated=r.max_memory_allocated, max_memory_reserved=r.max_memory_reserved,
        device_used=r.device_used,
    )


def measured_side(result: RunResult, est: Estimate) -> Side:
    t = result.train
    layout = RankLayout.of(t)
    ranks = [_measured_rank(r, layout.stage_of(r.rank), t.pp > 1) for r in result.ranks if r is not None]
    worst = max(ranks, key=lambda r: (r.max_memory_allocated or 0, r.memory.peak))
    simulated = result.simulated_world is not None
    tokens = None if simulated else result.tokens_per_s
    step = None if simulated else result.median_step_time_s
    mfu = None
    if step:
        mfu = est.throughput.mfu * est.throughput.step_time_s / step
    return Side(memory=worst.memory, ranks=ranks, step_time_s=step, tokens_per_s=tokens, mfu=mfu)


def compare(est: Estimate, result: RunResult, environment: dict[str, str]) -> ProfileReport:
    return build_report(est, measured_side(result, est), environment, result.device, result.simulated_world,
                        result.model_name, result.num_params)


def build_report(est: Estimate, measured: Side, environment: dict[str, str], device: str,
                 simulated_world: int | None, model_name: str, num_params: int) -> ProfileReport:
    """Rows for the most loaded measured rank against the prediction for that same rank.
    Also used to re-predict stored measurements with the current planner (validation/)."""
    predicted = predicted_side(est)
    m = measured.memory
    worst_rank = max(measured.ranks, key=lambda r: (r.max_memory_allocated or 0, r.memory.peak)).rank
    p_rank = predicted.ranks[worst_rank]
    p = p_rank.memory
    rows = [Row(quantity=key, unit="bytes", predicted=getattr(p, key), measured=getattr(m, key),
                error_pct=_error(getattr(p, key), getattr(m, key)))
            for key in ("params", "grads", "optimizer", "activations")]
    if m.peak_phase and not est.train.compile:
        phase_tmp = est.stages[p_rank.stage].phases[m.peak_phase].temporaries
        rows.append(Row(quantity=f"temporaries ({m.peak_phase})", unit="bytes", predicted=phase_tmp,
                        measured=m.temporaries, error_pct=_error(phase_tmp, m.temporaries)))
    allocated_peak = p.peak - p.overhead
    rows.append(Row(quantity="peak (allocated)", unit="bytes", predicted=allocated_peak, measured=m.peak,
                    error_pct=_error(allocated_peak, m.peak)))
    rank = next(r for r in measured.ranks if r.rank == worst_rank)
    if rank.max_memory_allocated is not None:
        rows.append(Row(quantity="max_memory_allocated", unit="bytes", predicted=allocated_peak,
                        measured=rank.max_memory_allocated, error_pct=_error(allocated_peak, rank.max_memory_allocated)))
    if rank.device_used is not None:
        rows.append(Row(quantity="device used (NVML)", unit="bytes", predicted=p.peak, measured=rank.device_used,
                        error_pct=_error(p.peak, rank.device_used)))
    for key in ("params", "grads", "optimizer"):
        hp, hm = getattr(p_rank.host, key), getattr(rank.host, key)
        if hp or hm:
            rows.append(Row(quantity=f"host {key}", unit="bytes", predicted=hp, measured=hm, error_pct=_error(hp, hm)))
    notes = []
    if device == "cpu" and measured.step_time_s is not None:
        notes.append(f"timings on a CPU are not comparable with the prediction for {est.gpu}; memory is")
    elif measured.step_time_s is not None:
        rows.append(Row(quantity="step time", unit="s", predicted=predicted.step_time_s,
                        measured=measured.step_time_s, error_pct=_error(predicted.step_time_s, measured.step_time_s)))
        rows.append(Row(quantity="tokens/s", unit="tokens/s", predicted=predicted.tokens_per_s,
                        measured=measured.tokens_per_s, error_pct=_error(predicted.tokens_per_s, measured.tokens_per_s)))
    else:
        notes.append(f"simulated world of {simulated_world}: one process holds rank 0's share with a fake "
                     f"process group, so memory is measured and communication time is not")
    if est.train.pp > 1:
        notes.append("pipeline: forward and backward interleave inside the schedule; measured activations are those "
                     "at the step's peak")
    if est.train.compile:
        notes.append("compiled (torch.compile): memory measured from the allocator's high-water mark per phase "
                     "(a dispatch-mode tracker would run the blocks eagerly); the peak's part beyond parameters, "
                     "gradients and optimizer state is reported as activations, temporaries are not split out")
    if device == "cpu":
        notes.append("CPU run: no CUDA context, communicators or allocator fragmentation; overhead is 0 on both sides")
    return ProfileReport(
        model=model_name, num_params=num_params, train=est.train.model_dump(), gpu=est.gpu,
        environment=environment, simulated_world=simulated_world, status="ok",
        predicted=predicted, measured=measured, rows=rows, notes=notes + list(est.notes),
    )


def failed_report(est: Estimate, environment: dict[str, str], status: str, message: str) -> ProfileReport:
    predicted = predicted_side(est)
    verdict = "fits" if est.fits else "does not fit"
    text = (f"predicted {predicted.memory.peak / 2**30:.1f} GiB per GPU ({verdict} in "
            f"{est.gpu_memory_bytes / 2**30:.1f} GiB); measured: {message}")
    return ProfileReport(model=est.model.name, num_params=est.model.num_params, train=est.train.model_dump(),
                         gpu=est.gpu, environment=environment, status=status, message=text, predicted=predicted)


class RecommendReport(_Checked):
    """``profile --recommend``: the planner's top candidates, each planned and measured."""

    reports: list[ProfileReport] = Field(min_length=1)
    recommended: int | None = Field(ge=0, description="index into reports of the fastest measured layout that fits")
    reason: str

    @classmethod
    def from_reports(cls, reports: list[ProfileReport]) -> RecommendReport:
        ok = [i for i, r in enumerate(reports) if r.status == "ok" and r.measured is not None]
        if not ok:
            return cls(reports=reports, recommended=None, reason="every candidate ran out of memory")
        best = max(ok, key=lambda i: reports[i].measured.tokens_per_s or 0.0)
        b = reports[best]
        reason = (f"candidate {best + 1} measured {b.measured.tokens_per_s:,.0f} tokens/s "
                  f"(predicted {b.predicted.tokens_per_s:,.0f})")
        others = [f"candidate {i + 1}: {reports[i].measured.tokens_per_s:,.0f}" for i in ok if i != best]
        failed = [f"candidate {i + 1}: {reports[i].status}" for i in range(len(reports)) if i not in ok]
        if others or failed:
            reason += "; " + ", ".join(others + failed)
        return cls(reports=reports, recommended=best, reason=reason)
