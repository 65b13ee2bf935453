"""Inference measured against the plan: per component (weights, KV cache, activations, swap
buffers, overhead), time to first token and decode tokens/s.

Weights, cache and swap slots are counted from the tensors the executor holds (exact bytes: the
prediction must equal them). Activations are the peak of the tensors a forward pass creates:
``torch.cuda.max_memory_allocated`` over what was allocated before, per phase, on a GPU; on a CPU
``LivePeak``, a dispatch mode that follows every storage an op creates until it is freed (the
caching allocator's rounding does not exist there, so bytes are exact). On a GPU a smaller card can
be emulated with ``torch.cuda.set_per_process_memory_fraction`` (``memory_limit``).
"""

from __future__ import annotations

import platform
import weakref
from contextlib import nullcontext
from datetime import date

import torch
from pydantic import BaseModel, Field
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from planner.calibration import Calibration, Overheads
from planner.configs import GPUSpec, ModelSpec
from planner.inference import InferenceConfig, InferenceEstimate, estimate_inference

COMPONENTS = ("weights", "kv_cache", "activations", "swap_buffers", "overhead", "peak")


class LivePeak(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode (outputs that are views of an input's
    storage are not new), each counted until its storage is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _drop(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if nbytes == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = nbytes
            self.now += nbytes
            weakref.finalize(storage, self._drop, key)
        self.peak = max(self.peak, self.now)
        return out


class _Phases:
    """Restarts the activation peak at each phase (prefill, decode)."""

    def __init__(self, device: torch.device):
        self.device, self.peaks, self._name, self._mode, self._base = device, {}, None, None, 0

    def __call__(self, name: str) -> None:
        self.close()
        self._name = name
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = LivePeak()
            self._mode.__enter__()

    def close(self) -> None:
        if self._name is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peaks[self._name] = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(None, None, None)
            self.peaks[self._name] = self._mode.peak
        self._name = None


class InferenceSide(BaseModel):
    weights: int | None = None
    kv_cache: int | None = None
    activations: int | None = None
    swap_buffers: int | None = None
    overhead: int | None = None
    peak: int | None = None
    prefill_activations: int | None = None
    decode_activations: int | None = None
    host_bytes: int | None = None
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None


class InferenceReport(BaseModel):
    model: str
    gpu: str
    device: str
    config: InferenceConfig
    predicted: InferenceSide
    measured: InferenceSide
    error: dict[str, float | None]
    tokens: list[list[int]]
    implied: dict[str, float] = Field(default_factory=dict, description="on a GPU: the calibration constants that "
                                      "would make the prediction match (decode_hbm_efficiency of a memory-bound "
                                      "decode without offload)")
    environment: dict[str, str]
    estimate: InferenceEstimate


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _error(predicted, measured) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def profile_inference(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration,
                      device: torch.device, seed: int = 0, memory_limit: int | None = None,
                      simulate: bool = False) -> InferenceReport:
    """Generate with ``cfg`` on ``device`` and compare with the planner's estimate (``cfg.kernels``
    must be ``dequant``: what the executor runs). ``simulate``: fake tensors (sizes without values,
    on a CPU): a full-size model's memory measured in seconds; no tokens, no time."""
    if simulate:
        from torch._subclasses.fake_tensor import FakeTensorMode

        return _profile(model, gpu, cfg, cal, torch.device("cpu"), seed, None, FakeTensorMode(allow_non_fake_inputs=True))
    return _profile(model, gpu, cfg, cal, device, seed, memory_limit, None)


def _profile(model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, cal: Calibration, device: torch.device, seed: int,
             memory_limit: int | None, fake) -> InferenceReport:
    from strategies.inference import build_inference_model

    simulated = fake is not None

    on_gpu = device.type == "cuda"
    if memory_limit is not None:
        gpu = gpu.model_copy(update={"memory_bytes": memory_limit})  # what is planned for
    if memory_limit is not None and on_gpu:
        # the emulated card holds the CUDA context too: the caching allocator gets the rest
        from strategies.train import _device_used

        torch.cuda.init()
        torch.empty(1, device=device)  # creates the context
        context = _device_used(device) or 0
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, (memory_limit - context) / total)), device)
    overheads = cal.overheads if on_gpu else Overheads.none()
    estimate = estimate_inference(model, gpu, cfg, cal, overheads)
    if cfg.quantised and cfg.dtype == "auto":  # the dtype the plan chose for this GPU runs
        cfg = cfg.model_copy(update={"dtype": estimate.compute_dtype})
    if cfg.offload == "layers" and not cfg.swapped_layers:
        cfg = cfg.model_copy(update={"swapped_layers": estimate.offload.swapped_layers})
    net = build_inference_model(model, cfg, "cpu", seed, fake)
    with fake if simulated else nullcontext():
        return _measure(net, model, gpu, cfg, estimate, device, seed, memory_limit, simulated)


def _measure(net, model: ModelSpec, gpu: GPUSpec, cfg: InferenceConfig, estimate: InferenceEstimate,
             device: torch.device, seed: int, memory_limit: int | None, simulated: bool) -> InferenceReport:
    from strategies.inference import KVCache, generate, place

    on_gpu = device.type == "cuda"
    offload = place(net, cfg, model, device)
    weights = _nbytes(t for name, t in list(net.named_parameters()) + list(net.named_buffers())
                      if "rope" not in name and t.device.type == device.type)
    cache = KVCache.allocate(model, cfg, device)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.vocab_size, (cfg.batch, cfg.prompt_len), generator=generator).to(device)
    phases = _Phases(device)
    result = generate(net, prompt, cfg, cache, offload, on_phase=phases)
    phases.close()
    slots, host = offload.nbytes() if offload else (0, 0)
    kv = _nbytes(cache.tensors())
    activations = max(phases.peaks.values())
    measured = InferenceSide(
        weights=weights, kv_cache=kv, activations=activations, swap_buffers=slots, host_bytes=host,
        prefill_activations=phases.peaks["prefill"], decode_activations=phases.peaks["decode"],
        time_to_first_token_s=None if simulated else result.prefill_s,
        decode_tokens_per_s=cfg.batch * (cfg.new_tokens - 1) / result.decode_s
        if cfg.new_tokens > 1 and not simulated else None)
    if on_gpu:
        from strategies.train import _device_used

        used = _device_used(device)  # NVML: context and allocator together
        reserved = torch.cuda.memory_reserved(device)
        measured.overhead = used - reserved if used is not None else None
        measured.peak = torch.cuda.max_memory_reserved(device) + (measured.overhead or 0)
    else:
        measured.peak = weights + kv + activations + slots
    mem = estimate.memory
    predicted = InferenceSide(
        weights=mem.weights, kv_cache=mem.kv_cache, activations=mem.activations, swap_buffers=mem.swap_buffers,
        overhead=mem.overhead, peak=mem.peak, prefill_activations=mem.prefill_activations,
        decode_activations=mem.decode_activations, host_bytes=mem.host_bytes,
        time_to_first_token_s=estimate.time.time_to_first_token_s,
        decode_tokens_per_s=estimate.time.decode_tokens_per_s)
    implied = {}
    t = estimate.time
    if on_gpu and measured.decode_tokens_per_s and t.decode_bound == "memory" and cfg.offload == "none":
        measured_step = cfg.batch / measured.decode_tokens_per_s
        implied["decode_hbm_efficiency"] = t.hbm_efficiency * t.decode_memory_s / measured_step
    keys = ("weights", "kv_cache", "activations", "swap_buffers", "host_bytes", "prefill_activations",
            "decode_activations", "peak", "time_to_first_token_s", "decode_tokens_per_s")
    error = {key: _error(getattr(predicted, key), getattr(measured, key)) for key in keys}
    environment = {"torch": torch.__version__, "python": platform.python_version(), "date": date.today().isoformat(),
                   "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu"}
    if on_gpu:
        environment["cuda"] = str(torch.version.cuda)
    if memory_limit is not None:
        environment["memory_limit_bytes"] = str(memory_limit)
    if simulated:
        environment["simulated"] = "fake tensors: sizes measured, no values, no time"
    return InferenceReport(model=model.name, gpu=gpu.name, device=device.type, config=cfg, predicted=predicted,
                           measured=measured, error=error, tokens=[] if simulated else result.tokens.tolist(), implied=implied,
                           environment=environment,
                           estimate=estimate)
