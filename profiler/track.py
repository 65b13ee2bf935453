"""Profile your own training loop: ``trainplan.track``.

    import trainplan
    from planner.estimate import estimate

    with trainplan.track(model, optimizer) as t:
        for batch in batches[:3]:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    report = t.compare(estimate(spec, gpu, train))   # predicted vs measured, per component

Phases are found from hooks: the model's forward (forward), from its end to the optimizer
step (the loss and backward: backward), the step (optimizer). The last full step is
measured, after the earlier ones created the optimizer state.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from profiler.memory import PhaseMemory
from strategies.kernels.optim import state_tensors
from strategies.train import RankBytes, RunResult, StepRecord, _unique_bytes


class Tracker:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        fsdp = any(type(m).__name__.startswith("FSDP") for m in model.modules())
        self.memory = PhaseMemory([model], optimizer, fsdp=fsdp)
        self._handles = []
        self._step_start: float | None = None
        self.step_times: list[float] = []
        self.resident: RankBytes | None = None

    def __enter__(self) -> Tracker:
        self.memory.__enter__()
        self._handles = [
            self.model.register_forward_pre_hook(lambda *_: self._begin("forward")),
            self.model.register_forward_hook(lambda *_: self.memory.begin("backward")),
            self.optimizer.register_step_pre_hook(lambda *_: self.memory.begin("optimizer")),
            self.optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]
        return self

    def __exit__(self, *exc) -> None:
        self.memory.end()
        for handle in self._handles:
            handle.remove()
        self.memory.__exit__(*exc)

    def _begin(self, name: str) -> None:
        if self.memory.current_phase is None:  # a new step begins with the forward
            self.memory.reset_peaks()
            self._step_start = time.perf_counter()
        self.memory.begin(name)

    def _after_step(self) -> None:
        params = list(self.model.parameters())
        self.resident = RankBytes(
            rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
            params=_unique_bytes(params), grads=_unique_bytes(p.grad for p in params),
            optimizer=_unique_bytes(state_tensors(self.optimizer)),
        )
        self.memory.end()
        if self._step_start is not None:
            self.step_times.append(time.perf_counter() - self._step_start)

    def result(self) -> RankBytes:
        """Resident bytes after the last step, and per phase the components at its peak."""
        if self.resident is None:
            raise RuntimeError("trainplan.track saw no optimizer step")
        record = self.resident.model_copy()
        record.phases, record.phase_totals = dict(self.memory.peaks), dict(self.memory.totals)
        record.activations = self.memory.forward_end.get("activations")
        return record

    def compare(self, estimate, tokens_per_step: int | None = None):
        """A ProfileReport: the planner's ``Estimate`` for this layout against what was measured."""
        from profiler.report import compare
        from profiler.run import environment

        train = estimate.train
        step = min(self.step_times) if self.step_times else 0.0
        tokens = tokens_per_step or train.global_batch * train.seq_len
        result = RunResult(
            model_name=estimate.model.name, num_params=estimate.model.num_params, train=train, world=1,
            backend="none", device=str(next(self.model.parameters()).device),
            torch_version=torch.__version__, steps=[StepRecord(step=i, loss=None, step_time_s=t,
                                                               tokens_per_s=tokens / t if t else 0.0)
                                                    for i, t in enumerate(self.step_times)],
            ranks=[self.result()], median_step_time_s=step, tokens_per_s=tokens / step if step else 0.0,
        )
        return compare(estimate, result, environment(result))


def track(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tracker:
    return Tracker(model, optimizer)
