"""Allocation traces: every device allocation a run makes and frees, in order, with its stream,
for the caching-allocator replay (``planner/allocator.py``).

``AllocationTrace`` is a dispatch mode that sees every storage an op creates (real or fake
tensors, so a full-size rank simulated with FakeTensorMode on a CPU is traced too) and, through
a weak reference, when it dies; ``UntypedStorage.resize_`` (which FSDP2 uses to allocate and free
unsharded parameters, and which no dispatch mode sees) is followed by a patch, as PyTorch's own
``MemTracker`` does. Each allocation records the stream current when it was made: FSDP2 runs
its all-gather copy-in, all-gather and reduce-scatter on streams of their own
(``torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py``, ``FSDPCommContext``), through the
device-agnostic ``torch.<device>.stream`` API, which on a CPU selects ``torch.cpu.Stream``
objects -- so a CPU trace knows which CUDA stream each block would come from.

What a CPU trace cannot see, CUDA kernels allocate through the caching allocator themselves;
the trace adds them where the op runs (``CUDA_WORKSPACES``):

- FlashAttention-2's backward (``mha_bwd`` in PyTorch's ``flash_api.cpp``): ``softmax_d``
  (fp32, batch x heads x seq rounded up to 128), ``dq_accum`` (fp32, batch x seq rounded to 128
  x heads x head dim rounded to 32, or 64 above 128) and, with fewer key/value heads than query
  heads, ``dk_expanded`` and ``dv_expanded`` (batch x seq x heads x head dim, input dtype),
  allocated after the gradients and freed when the kernel returns;
- cuBLAS's workspace: 32 MiB per stream that runs a matmul, on Hopper and Blackwell, kept for
  the life of the process (``parseChosenWorkspaceSize`` in ``CublasHandlePool.cpp``).
"""

from __future__ import annotations

import weakref
from functools import wraps

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUBLAS_WORKSPACE_BYTES = 32 << 20  # 4096 * 8 * 1024 on sm90 / sm100 (CublasHandlePool.cpp)
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm", "_grouped_mm"}
_FLASH_BACKWARD = {"_scaled_dot_product_flash_attention_for_cpu_backward",
                   "_scaled_dot_product_flash_attention_backward"}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flash_backward_workspace(q_shape, kv_heads: int, itemsize: int) -> list[int]:
    """Bytes of FlashAttention-2's backward workspace for q of shape [batch, heads, seq, dim]
    (SDPA's layout), in allocation order."""
    batch, heads, seq, dim = q_shape
    seq_rounded = _round_up(seq, 128)
    dim_rounded = _round_up(dim, 32 if dim <= 128 else 64)
    sizes = [4 * batch * heads * seq_rounded, 4 * batch * seq_rounded * heads * dim_rounded]
    if kv_heads != heads:
        sizes += [itemsize * batch * seq * heads * dim] * 2
    return sizes


class ShardingPropagation:
    """Marks DTensor's sharding propagation while it runs. To learn an op's output shape, DTensor
    runs the op on global-shape fake tensors under the active fake mode
    (``ShardingPropagator._propagate_tensor_meta_non_cached``, torch 2.13) -- on a simulated rank,
    the very FakeTensorMode the rank's own tensors live in, so a tracker sees a full-vocabulary
    fp32 logits tensor that no real rank ever allocates. Trackers skip ops while ``active``."""

    def __init__(self):
        self.active = 0
        self._original = None

    def __enter__(self):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._original = original = ShardingPropagator._propagate_tensor_meta_non_cached
        guard = self

        @wraps(original)
        def propagate(*args, **kwargs):
            guard.active += 1
            try:
                return original(*args, **kwargs)
            finally:
                guard.active -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        return self

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        ShardingPropagator._propagate_tensor_meta_non_cached = self._original


class AllocationTrace(TorchDispatchMode):
    """Records ``events``: ``("a", id, nbytes, stream)`` and ``("f", id)``, plus ``("m", name)``
    markers (``mark``). Streams are numbered in order of first use; 0 is the default stream.
    Enter it inside a FakeTensorMode to trace fake tensors; it can be entered several times."""

    def __init__(self, device_type: str = "cpu", cuda_workspaces: bool = True):
        super().__init__()
        self.events: list[tuple] = []
        self.device_type = device_type
        self.cuda_workspaces = cuda_workspaces
        self._live: dict[int, int] = {}  # storage key -> allocation id
        self._next_id = 0
        self._streams: dict[int, int] = {}
        self._workspace_streams: set[int] = set()
        self._fake_on_entry = None
        self._depth = 0
        self._orig_resize = None
        self._propagation = ShardingPropagation()

    # ------------------------------------------------------------------ streams, ids
    def _stream(self) -> int:
        handle = getattr(torch, self.device_type, None)
        current = handle.current_stream() if handle is not None and hasattr(handle, "current_stream") else None
        default = getattr(torch.cpu, "_default_cpu_stream", None) if self.device_type == "cpu" else None
        key = 0 if current is None or current is default else id(current)
        if key not in self._streams:
            self._streams[key] = 0 if key == 0 else sum(1 for k in self._streams if k != 0) + 1
        return self._streams[key]

    def _alloc(self, nbytes: int, stream: int | None = None) -> int:
        ident = self._next_id
        self._next_id += 1
        self.events.append(("a", ident, int(nbytes), self._stream() if stream is None else stream))
        return ident

    def _free(self, ident: int) -> None:
        self.events.append(("f", ident))

    def _dead(self, key: int, ident: int) -> None:
        if self._live.get(key) == ident:
            del self._live[key]
            self._free(ident)

    def _track(self, storage) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        ident = self._alloc(nbytes)
        self._live[key] = ident
        weakref.finalize(storage, self._dead, key, ident)

    def mark(self, name: str) -> None:
        self.events.append(("m", name))

    def host(self, tensors) -> None:
        """Flag the storages behind ``tensors`` as host memory (offloaded state: on a GPU they
        live in the host's memory, on a CPU run nothing tells them apart): ``("h", id)``."""
        from strategies.train import _local_tensors

        for local in _local_tensors(tensors):
            ident = self._live.get(local.untyped_storage()._cdata)
            if ident is not None:
                self.events.append(("h", ident))

    # ------------------------------------------------------------------ the mode
    def __enter__(self):
        if self._depth == 0:
            from torch._guards import active_fake_mode

            self._fake_on_entry = active_fake_mode()
            self._patch_resize()
            self._propagation.__enter__()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            torch.UntypedStorage.resize_ = self._orig_resize
            self._propagation.__exit__(*exc)
        return super().__exit__(*exc)

    def _patch_resize(self) -> None:
        self._orig_resize = original = torch.UntypedStorage.resize_
        trace = self

        @wraps(original)
        def resize_(storage, size):
            key = storage._cdata
            ident = trace._live.pop(key, None)
            if ident is not None:
                trace._free(ident)
            result = original(storage, size)
            if storage.nbytes():
                trace._track(storage)
            return result

        torch.UntypedStorage.resize_ = resize_

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._guards import active_fake_mode
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops, which this mode then sees
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode():
            out = args[0]  # a fake wait returns a new tensor; a real one returns its input
        else:
            out = func(*args, **(kwargs or {}))
        if active_fake_mode() is not self._fake_on_entry or self._propagation.active:
            return out  # DTensor's sharding propagation: global shapes, no rank's memory
        name = func.overloadpacket.__name__
        if self.cuda_workspaces and name in _MATMULS:
            stream = self._stream()
            if stream not in self._workspace_streams:
                self._workspace_streams.add(stream)
                self._alloc(CUBLAS_WORKSPACE_BYTES, stream)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t.untyped_storage())
        if self.cuda_workspaces and name in _FLASH_BACKWARD:
            q, k = args[1], args[2]
            ids = [self._alloc(n) for n in flash_backward_workspace(tuple(q.shape), k.shape[1], q.element_size())]
            for ident in reversed(ids):
                self._free(ident)
        return out


def device_events(events, offload: str = "none") -> list[tuple]:
    """The events of ``events`` that are device memory on a GPU: without the storages flagged as
    host memory (``AllocationTrace.host``) and, when state is offloaded, without what the
    optimizer step allocates -- it steps on the host (ZeRO-Offload, FSDP2's CPUOffloadPolicy)."""
    host = {event[1] for event in events if event[0] == "h"}
    dropped, kept, in_step = set(), [], False
    for event in events:
        kind = event[0]
        if kind == "m":
            in_step = event[1] == "optimizer"
            kept.append(tuple(event))
        elif kind == "a":
            if event[1] in host or (in_step and offload != "none"):
                dropped.add(event[1])
            else:
                kept.append(tuple(event))
        elif kind == "f" and event[1] not in dropped:
            kept.append(tuple(event))
    return kept


def pool_peaks(events) -> dict:
    """Per stream (as a string: JSON keys): the largest bytes it held at once, the bytes it held
    when the whole device peaked, and what the replay reserved for it -- how far the pools of
    FSDP2's streams add to the default stream's reservation."""
    from planner.allocator import replay, round_size

    live, current, peak, at_peak, total, top = {}, {}, {}, {}, 0, 0
    for event in events:
        if event[0] == "a":
            size, stream = round_size(event[2]), event[3]
            live[event[1]] = (size, stream)
            current[stream] = current.get(stream, 0) + size
            peak[stream] = max(peak.get(stream, 0), current[stream])
            total += size
            if total > top:
                top, at_peak = total, dict(current)
        elif event[0] == "f" and event[1] in live:
            size, stream = live.pop(event[1])
            current[stream] -= size
            total -= size
    reserved = replay(events).reserved_by_stream
    return {str(s): {"peak": peak[s], "at_device_peak": at_peak.get(s, 0), "reserved": reserved.get(s, 0)}
            for s in sorted(peak)}
