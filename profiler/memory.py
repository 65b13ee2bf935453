"""Per-phase memory with PyTorch's own trackers, in the planner's vocabulary.

``MemTracker`` (or ``FSDPMemTracker`` for FSDP2 models) follows every tensor a step creates
and tags it (parameter, gradient, activation, temporary, optimizer state...). It keeps one
running peak; ``PhaseMemory`` restarts that peak at each phase boundary -- forward, backward,
optimizer step -- so each phase has its own peak and the breakdown at that moment. Categories
map onto the planner's component keys:

| tracker category | planner key |
|---|---|
| Parameter, Sharded Param | params |
| Gradient, Sharded Grad | grads |
| Optstate, OptState | optimizer |
| Activation | activations |
| Temp, Unsharded Param, Unsharded Grad, All-Gather, Reduce-Scatter, Input, Other | temporaries |
| Buffer | buffers (not a planner component; reported apart) |

On CUDA the trackers round every storage up to the caching allocator's 512-byte block (the
documented allocator rounding rule); on CPU they count exact bytes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from copy import deepcopy

import torch

KEYS = ("params", "grads", "optimizer", "activations", "temporaries", "buffers")
PHASES = ("forward", "backward", "optimizer")

_CATEGORY_TO_KEY = {
    "Parameter": "params",
    "Sharded Param": "params",
    "Gradient": "grads",
    "Sharded Grad": "grads",
    "Optstate": "optimizer",
    "OptState": "optimizer",  # FSDPMemTracker's spelling
    "Activation": "activations",
    "Buffer": "buffers",  # RoPE tables: not a planner component, reported apart
}


def to_components(snapshot: dict, device_type: str | None = None) -> dict[str, int]:
    """A tracker snapshot ({device: {category: bytes}}) in planner keys, for the devices of
    ``device_type`` (the GPU; offloaded host tensors are not GPU memory), or all devices."""
    components = dict.fromkeys(KEYS, 0)
    for device, device_snapshot in snapshot.items():
        if device_type is not None and getattr(device, "type", str(device)) != device_type:
            continue
        for category, nbytes in device_snapshot.items():
            name = getattr(category, "value", category)
            if name == "Total":
                continue
            components[_CATEGORY_TO_KEY.get(name, "temporaries")] += int(nbytes)
    return components


class _ParamGroups:
    """Every parameter group of one FSDP2 state as the one group FSDPMemTracker reads: torch
    2.13's tracker asks ``FSDPState._fsdp_param_group``, which refuses a state with a
    per-parameter mesh -- an MoE block whose routed experts shard over their own group
    (strategies/expert_parallel.py, as torchtitan's apply_fsdp_to_decoder). The tracker reads
    ``fsdp_params`` and wraps ``pre_backward`` / ``post_backward``: its wrapper is installed on
    the first real group and calls every group's own method once; the others' calls are
    absorbed."""

    _HOOKS = ("pre_backward", "post_backward")

    def __init__(self, groups):
        self.__dict__["_groups"] = groups
        self.__dict__["fsdp_params"] = [p for g in groups for p in g.fsdp_params]
        self.__dict__["_all"] = {name: self._calls_all([getattr(g, name) for g in groups]) for name in self._HOOKS}
        self.__dict__.update(self._all)

    @staticmethod
    def _calls_all(methods):
        def call(*args, **kwargs):
            for method in methods:
                method(*args, **kwargs)
        return call

    def __setattr__(self, name, fn):
        self.__dict__[name] = fn
        if name not in self._HOOKS:
            return
        for i, group in enumerate(self._groups):
            if fn is self._all[name]:  # the tracker restores: each group's own method again
                group.__dict__.pop(name, None)
            else:
                setattr(group, name, fn if i == 0 else (lambda *a, **k: None))


@contextmanager
def _merged_param_groups():
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    original = FSDPState._fsdp_param_group
    merged: dict[int, _ParamGroups] = {}

    def group(state):
        groups = state._fsdp_param_groups
        if len(groups) <= 1:
            return original.fget(state)
        if id(state) not in merged:
            merged[id(state)] = _ParamGroups(groups)
        return merged[id(state)]

    FSDPState._fsdp_param_group = property(group)
    try:
        yield
    finally:
        FSDPState._fsdp_param_group = original


def _repeatable(tracker_class):
    """A tracker that accepts the root module running forward again in the same step (gradient
    accumulation, pipeline micro-batches): its per-module statistics restart, the per-tensor
    accounting -- all we read -- goes on."""

    class Repeatable(tracker_class):
        def __enter__(self):
            from profiler.alloc_trace import ShardingPropagation

            if getattr(self, "_propagation", None) is None:
                self._propagation = ShardingPropagation().__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            if self._depth == 0 and getattr(self, "_propagation", None) is not None:
                self._propagation.__exit__(*exc)
                self._propagation = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # DTensor's sharding propagation runs ops on global-shape fake tensors under the
            # simulated rank's own fake mode: no rank allocates them (alloc_trace.ShardingPropagation)
            if getattr(self, "_propagation", None) is not None and self._propagation.active:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                parents = set(self._mod_tracker.parents) - {name}
                if len(parents) == 1 and "Global" in parents:
                    self.memory_tracking.clear()
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # torch 2.13's MemTracker hooks every parameter's gradient and fails on a frozen one
            # (a LoRA fine-tune's base): mark those as hooked already, with handles that do nothing
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(param, (_NO_HANDLE, _NO_HANDLE))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return Repeatable


class _NoHandle:
    def remove(self) -> None:
        pass


_NO_HANDLE = _NoHandle()


def _optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizer and those it wraps (ZeroRedundancyOptimizer's local one, a master-weight
    optimizer's inner one): their state is what the tracker must see as optimizer state."""
    found, queue = [], [optimizer]
    while queue:
        opt = queue.pop()
        if isinstance(opt, torch.optim.Optimizer) and opt not in found:
            found.append(opt)
            queue += [getattr(opt, "optim", None), getattr(opt, "_inner", None)]
            queue += getattr(opt, "inner_optimizers", list)()
    return found


class _PhaseRecorder:
    """Phase bookkeeping shared by the trackers: ``phase(name)`` marks a region; each phase
    keeps its largest total over the steps it saw and the components at that moment."""

    def _init_phases(self) -> None:
        self.peaks: dict[str, dict[str, int]] = {}
        self.totals: dict[str, int] = {}
        self.current_phase: str | None = None
        self.forward_end: dict[str, int] = {}  # what forward leaves saved (largest micro-batch)

    @contextmanager
    def phase(self, name: str):
        self.begin(name)
        yield
        self.end()

    def begin(self, name: str) -> None:
        if self.current_phase is not None:
            self.end()
        self._before_phase()
        self.current_phase = name
        self._restart_peak()

    def _before_phase(self) -> None:
        pass

    def _record(self, name: str, total: int, components) -> None:
        if total >= self.totals.get(name, -1):
            self.totals[name] = total
            self.peaks[name] = components()
        if name == "forward":
            end = self.current()
            if end["activations"] >= self.forward_end.get("activations", -1):
                self.forward_end = end

    def reset_peaks(self) -> None:
        """Forget earlier steps' phase peaks (the tracker measures the latest step)."""
        self.peaks.clear()
        self.totals.clear()
        self.forward_end = {}


class PhaseMemory(_PhaseRecorder):
    """Context manager around a training step; ``phase(name)`` marks each region."""

    def __init__(self, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer, fsdp: bool = False,
                 device_type: str | None = None):
        optimizers = _optimizers(optimizer)
        self.device_type = device_type
        if fsdp:
            from torch.distributed._tools.fsdp2_mem_tracker import (
                FSDPMemTracker,
                _FSDPRefType,
            )

            root = modules[0] if len(modules) == 1 else torch.nn.ModuleList(modules)
            self.tracker = _repeatable(FSDPMemTracker)(root, optimizer)
            # FSDPMemTracker.track_external is a no-op: register wrapped optimizers' state directly
            for inner in optimizers[1:]:
                self.tracker._track_optimizer_states(_FSDPRefType.OPT, inner)
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            self.tracker = _repeatable(MemTracker)()
            self.tracker.track_external(*modules, *optimizers)
        self._init_phases()

    def __enter__(self) -> PhaseMemory:
        self._groups = _merged_param_groups()
        self._groups.__enter__()
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.tracker.__exit__(*exc)
        finally:
            self._groups.__exit__(*exc)

    def _restart_peak(self) -> None:
        # MemTracker keeps one running peak; start it again from the current state.
        current = self.tracker.get_tracker_snapshot("current")
        self.tracker._peak_mem_snap = deepcopy(current)
        self.tracker._peak_mem = {dev: snap.get("Total", sum(snap.values())) for dev, snap in current.items()}

    def end(self) -> None:
        name, self.current_phase = self.current_phase, None
        if name is None:
            return
        components = to_components(self.tracker.get_tracker_snapshot("peak"), self.device_type)
        self._record(name, sum(components.values()), lambda: components)

    def current(self) -> dict[str, int]:
        return to_components(self.tracker.get_tracker_snapshot("current"), self.device_type)


_mmap_fixed = False


def fix_mmap_threshold() -> bool:
    """glibc: serve every allocation of 64 KiB or more by its own mapping, returned to the OS
    when freed, so the resident high-water mark follows the live tensors (``HighWaterMemory``).
    Must run before the process allocates and frees large blocks: malloc reuses freed heap
    chunks before it maps new ones. False where there is no glibc."""
    global _mmap_fixed
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        _mmap_fixed = bool(libc.mallopt(-3, HighWaterMemory.MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        _mmap_fixed = False
    return _mmap_fixed


class HighWaterMemory(_PhaseRecorder):
    """Per-phase peaks of a torch.compile'd run, from the allocator's high-water mark.

    A TorchDispatchMode tracker (``PhaseMemory``) cannot measure compiled code: while a
    dispatch mode is active, a torch.compile'd module runs its eager ops instead of the
    compiled graph (checked on torch 2.13: silu_backward dispatches under the mode). So this
    tracker installs no mode. On CUDA it reads ``torch.cuda.max_memory_allocated`` per phase;
    on CPU (Linux) the process's resident high-water mark (VmHWM, reset through
    /proc/self/clear_refs) with glibc's mmap threshold fixed at 64 KiB, so every tensor larger
    than that is its own mapping, returned when freed. Offsets are anchored when the step's
    forward begins, where the live tensors are exactly parameters, gradients and optimizer
    state. Checked against ``PhaseMemory`` on eager runs of the reference model: peak within
    0.07%. Components: parameters, gradients and optimizer state are counted from their
    tensors; the rest of a phase's peak is reported as activations (no finer breakdown)."""

    MMAP_THRESHOLD = 64 * 1024

    def __init__(self, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer, fsdp: bool = False,
                 device_type: str | None = None):
        self.modules, self.optimizer = modules, optimizer
        self.device_type = device_type or next(modules[0].parameters()).device.type
        if self.device_type == "cpu" and not (_mmap_fixed or os.environ.get("MALLOC_MMAP_THRESHOLD_")):
            raise RuntimeError("measuring a compiled model on CPU needs MALLOC_MMAP_THRESHOLD_=65536 in the "
                               "environment when Python starts (glibc reuses freed memory otherwise); "
                               "`trainplan profile` sets it for its workers")
        self._init_phases()
        self._offset: int | None = None

    def __enter__(self) -> HighWaterMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def _resident(self) -> dict[str, int]:
        from strategies.kernels.optim import state_tensors
        from strategies.train import _unique_bytes

        params = [p for m in self.modules for p in m.parameters()]
        return {"params": _unique_bytes(params), "grads": _unique_bytes(p.grad for p in params),
                "optimizer": _unique_bytes(state_tensors(self.optimizer))}

    def _status(self, key: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))

    def _allocated(self) -> int:
        if self.device_type == "cuda":
            return torch.cuda.memory_allocated()
        return self._status("VmRSS:")

    def _restart_peak(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def _high(self) -> int:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM:")

    def _before_phase(self) -> None:
        if self._offset is None:  # the step's start: live tensors are the resident ones
            import gc

            gc.collect()
            self._offset = self._allocated() - sum(self._resident().values())

    def _components(self, total: int) -> dict[str, int]:
        resident = self._resident()
        return resident | {"activations": max(0, total - sum(resident.values())), "temporaries": 0, "buffers": 0}

    def end(self) -> None:
        name, self.current_phase = self.current_phase, None
        if name is None:
            return
        total = self._high() - self._offset
        self._record(name, total, lambda: self._components(total))

    def reset_peaks(self) -> None:
        super().reset_peaks()
        self._offset = None

    def current(self) -> dict[str, int]:
        return self._components(self._allocated() - self._offset)


def phase_memory(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer, fsdp: bool = False,
                 device_type: str | None = None, compiled: bool = False):
    """The profiler's per-phase tracker: ``HighWaterMemory`` for torch.compile'd runs (a
    dispatch-mode tracker would run them eagerly), ``PhaseMemory`` otherwise."""
    return (HighWaterMemory if compiled else PhaseMemory)(modules, optimizer, fsdp=fsdp, device_type=device_type)
