"""Calibration: the constants arithmetic cannot know, as data.

A calibration file holds memory overheads (CUDA context, communicators, fragmentation) and
throughput constants (compute efficiency per dtype, collective bandwidth efficiency and
latency, overlap contention, host-link efficiency, CPU Adam speed, optimizer-step HBM
efficiency), with its source, device, environment and date. ``presets/calibration/default.json``
holds documented, uncalibrated defaults; ``trainplan calibrate`` writes measured ones.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.allocator import CacheModel
from planner.configs import MAX_DEVICE_BYTES, GPUSpec
from planner.errors import ConfigFileError, shown
from planner.inputs import read_json_object

Efficiency = Annotated[float, Field(gt=0, le=1)]
DTYPES = ("fp32", "tf32", "bf16", "fp16")


class Overheads(BaseModel):
    """Memory the arithmetic of tensors does not see. Defaults are documented in
    ``presets/calibration/default.json``; ``trainplan calibrate`` measures them."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    cuda_context_bytes: int = Field(default=0, ge=0, le=MAX_DEVICE_BYTES,
                                    description="device memory of a process outside the caching allocator once its "
                                                "training kernels are loaded (NVML used - max_memory_reserved)")
    communicator_bytes: int = Field(default=0, ge=0, le=MAX_DEVICE_BYTES, description="per NCCL communicator")
    fragmentation: float | None = Field(
        default=0.0, ge=0.0, le=1.0, description="a flat fraction of allocated bytes the caching allocator holds "
        "beyond them; null: the caching-allocator model (``cache``, planner/allocator.py)")
    cache: CacheModel | None = Field(default=None, description="reserved - allocated at the peak, PyTorch's default "
                                     "allocator settings")
    cache_expandable: CacheModel | None = Field(default=None, description="the same with expandable_segments:True")
    inference_fragmentation: float = Field(default=0.0, ge=0.0, le=1.0, description="inference: the allocator's "
                                           "cache as a flat fraction of the allocated peak (not yet modelled)")
    calibrated: bool = False
    source: str = ""

    @model_validator(mode="after")
    def _a_cache_rule(self) -> Overheads:
        if self.fragmentation is None and (self.cache is None or self.cache_expandable is None):
            raise ValueError("fragmentation null (the caching-allocator model) needs cache and cache_expandable")
        return self

    @classmethod
    def none(cls) -> Overheads:
        """No context, no communicators, no allocator cache: CPU runs and exact comparisons."""
        return cls(source="none (CPU or exact comparison)")


class ThroughputConstants(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    compute_efficiency: dict[str, Efficiency] = Field(
        description="fraction of the dense peak that a transformer's compute sustains, per dtype")
    compute_efficiency_by_gpu: dict[str, dict[str, Efficiency]] = Field(
        default_factory=dict, description="per GPU name (GPUSpec.name), overriding compute_efficiency")
    collective_bandwidth_efficiency: float = Field(gt=0, le=1, description="NCCL bus bandwidth / NVLink bandwidth")
    inter_node_bandwidth_efficiency: float = Field(gt=0, le=1, description="NCCL bus bandwidth / network bandwidth")
    intra_node_latency_s: float = Field(ge=0, le=1, description="per ring step inside a node")
    inter_node_latency_s: float = Field(ge=0, le=1, description="per ring step across nodes")
    collective_base_latency_s: float = Field(default=8.4e-6, ge=0, le=1, description="fixed cost of one collective "
                                             "(NCCL's baseLat, Simple protocol)")
    tree_bandwidth_efficiency: float = Field(default=0.74, gt=0, le=1, description="tree all-reduce bus bandwidth "
                                             "/ ring bus bandwidth across nodes (NCCL's tree caps)")
    overlap_contention: float = Field(ge=0, le=1, description="fraction of overlapped communication time that "
                                                              "still slows compute (SMs and HBM shared)")
    host_link_efficiency: float = Field(gt=0, le=1, description="achieved / nominal PCIe bandwidth")
    cpu_adam_params_per_s: float = Field(gt=0, le=1e15, description="CPU Adam update rate per GPU's share of "
                                         "host cores")
    optimizer_hbm_efficiency: float = Field(gt=0, le=1, description="achieved / peak HBM bandwidth of the step")
    small_collective_base_latency_s: float = Field(
        default=6.6e-6, ge=0, le=1, description="fixed cost of one small (latency-bound) collective: NCCL's LL "
        "protocol, ring baseLat (src/graph/tuning.cc)")
    small_collective_step_latency_s: float = Field(
        default=0.6e-6, ge=0, le=1, description="per ring step of a small collective inside a node: NCCL's LL "
        "hwLat over NVLink (src/graph/tuning.cc)")
    attention_efficiency: float = Field(
        default=0.35, gt=0, le=1, description="fraction of the dense 16-bit peak that fused (flash) attention "
        "sustains: FlashAttention-2 reaches 35% on an H100 (Shah et al. 2024, FlashAttention-3, abstract)")
    alibi_attention_factor: float = Field(
        default=1.0, gt=0, le=1, description="share of the fused attention's rate an ALiBi model's attention "
        "sustains (MPT: llm-foundry's attention kernels add the per-head linear bias to every score); fitted by "
        "validation/step_fit.py on the fit half of the published llm-foundry runs")
    attention_half_seq: float = Field(
        default=90.0, ge=0, le=1e6, description="sequence length at which fused attention reaches half its plateau "
        "(attention_efficiency), in the per-operation model (planner/op_time.py, flash_efficiency): 90 fits "
        "FlashAttention-2's forward on an H100 SXM5, head dim 128 (Shah et al. 2024, FlashAttention-3, Figure 5)")
    gemm_sustained: float = Field(
        default=1.0, gt=0, le=1, description="share of its benchmarked rate (planner/gemm.py, fitted on isolated "
        "GEMMs) a GEMM sustains inside a training step, in the per-operation model: clocks under sustained power, "
        "caches shared with the ops around it, communication kernels on the same SMs")
    compute_time_scale_by_gpu: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per GPU name and dtype: the measured compute time of `trainplan "
        "calibrate`'s run over what the per-operation model predicts for it (a machine factor: clocks, power "
        "limit, library versions); 1 where not measured")
    elementwise_hbm_efficiency: float = Field(
        default=0.7, gt=0, le=1, description="achieved / peak HBM bandwidth of the memory-bound ops between the "
        "GEMMs (norms, rotary, activations, residual adds, the loss) in the per-operation model "
        "(planner/op_time.py)")
    attention_efficiency_by_gpu: dict[str, Efficiency] = Field(
        default_factory=dict, description="per GPU name, overriding attention_efficiency")
    gemm_efficiency: dict[str, Efficiency] = Field(
        default_factory=lambda: {"bf16": 0.803, "fp16": 0.803, "fp8": 0.709},
        description="share of the dense peak one large GEMM sustains (no elementwise work around it), per dtype: "
        "what Float8 linears save is measured in it. Default: the H100 SXM's Maximum Achievable Matmul FLOPS, 794.5 "
        "of 989 TFLOPS in bf16 and 1,402.6 of 1,979 in fp8 e4m3 (ml-engineering, compute/accelerator/README.md, "
        "torch 2.7, cuBLAS)")
    gemm_efficiency_by_gpu: dict[str, dict[str, Efficiency]] = Field(
        default_factory=lambda: {"NVIDIA H200": {"bf16": 0.803, "fp16": 0.803, "fp8": 0.734},
                                 "NVIDIA GH200 480GB": {"bf16": 0.838, "fp16": 0.838, "fp8": 0.776},
                                 "NVIDIA B200": {"bf16": 0.776, "fp16": 0.776, "fp8": 0.763}},
        description="per GPU name, overriding gemm_efficiency (the same table: H200 fp8 73.4%, bf16 as the H100's; "
        "GH200 83.8% and 77.6%; B200 77.6% and 76.3%)")
    decode_hbm_efficiency: float = Field(default=0.7, gt=0, le=1, description="achieved / peak HBM bandwidth of an "
                                         "inference decode step (weights and KV cache streamed once per token)")
    compile_compute_speedup: float = Field(
        default=6667 / 5762, ge=1, le=10,
        description="compute-time speedup of torch.compile'd blocks (inductor fuses the memory-bound ops around "
                    "the matmuls); default: torchtitan docs/performance.md Table 1, Llama 3.1 8B FSDP on 8 H100, "
                    "selective AC: 5,762 -> 6,667 tokens/s per GPU")
    eager_attention_passes: float = Field(default=20.0, ge=0, le=1e4, description="memory passes over the s x s scores "
                                          "per layer (forward + backward) of unfused attention, at HBM speed")

    @field_validator("compute_efficiency")
    @classmethod
    def _every_dtype(cls, value: dict[str, float]) -> dict[str, float]:
        missing = [d for d in DTYPES if d not in value]
        if missing:
            raise ValueError(f"needs an efficiency for {', '.join(missing)}")
        return value

    def efficiency(self, gpu_name: str, dtype: str) -> float:
        return self.compute_efficiency_by_gpu.get(gpu_name, {}).get(dtype, self.compute_efficiency[dtype])

    def gemm(self, gpu_name: str, dtype: str, default: float | None = None) -> float:
        """Share of the ``dtype`` peak one large GEMM sustains on this GPU (``default`` where
        neither table has the dtype, e.g. fp32)."""
        value = self.gemm_efficiency_by_gpu.get(gpu_name, {}).get(dtype, self.gemm_efficiency.get(dtype, default))
        if value is None:
            raise KeyError(dtype)
        return value


class Calibration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    source: str
    calibrated: bool = False
    device: str | None = None
    chip: str = Field(default="", description="the measured GPU's die (GPUSpec.chip): GPUs of the same chip "
                                              "without a calibration of their own use this one")
    used_for: str = Field(default="", description="how this calibration was chosen for the planned GPU: empty "
                                                  "(its own device, or a file the user named), or the reason")
    environment: dict[str, str] = {}
    date: str | None = None
    overheads: Overheads
    throughput: ThroughputConstants
    calibrated_constants: list[str] = Field(default_factory=list, description="which constants were measured")

    @property
    def label(self) -> str:
        """The calibration's id, and why it applies when it was measured on another GPU."""
        return f"{self.id} ({self.used_for})" if self.used_for else self.id


@cache
def default_calibration() -> Calibration:
    raw = json.loads(resources.files("presets").joinpath("calibration/default.json").read_text())
    return _parse(raw, "presets/calibration/default.json")


def default_overheads() -> Overheads:
    return default_calibration().overheads


def _parse(raw: dict, where: str) -> Calibration:
    overheads = raw.get("overheads")
    if not isinstance(overheads, dict):
        raise ConfigFileError(f"calibration {where}: overheads must be a JSON object")
    overheads = dict(overheads)
    overheads.setdefault("source", str(raw.get("overheads_source", raw.get("source", where))))
    overheads.setdefault("calibrated", raw.get("calibrated", False) is True)
    try:
        return Calibration(**{**raw, "overheads": overheads})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigFileError(f"calibration {where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file (``trainplan calibrate`` output); missing throughput constants fall
    back to the defaults, so a memory-only calibration is valid."""
    where = shown(str(path))
    raw = read_json_object(path, "calibration file")
    if "overheads" not in raw and "throughput" not in raw:
        raise ConfigFileError(f"calibration {where}: has neither overheads nor throughput: not a calibration file "
                              "(trainplan calibrate writes one)")
    for key in ("overheads", "throughput"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigFileError(f"calibration {where}: {key} must be a JSON object")
    if not isinstance(raw.get("calibrated_constants", []), list):
        raise ConfigFileError(f"calibration {where}: calibrated_constants must be a list of names")
    base = default_calibration().model_dump()
    merged = {**base, **raw}
    merged["throughput"] = _throughput(base["throughput"], raw, where)
    merged["overheads"] = {**{k: v for k, v in base["overheads"].items() if k != "source"}, **raw.get("overheads", {})}
    return _parse(merged, where)


def _throughput(defaults: dict, raw: dict, where: str) -> dict:
    """The file's throughput constants over the defaults. A file that lists its
    ``calibrated_constants`` (``trainplan calibrate`` writes them) contributes only those: the
    rest are today's documented defaults, not the copies it was written with."""
    given = raw.get("throughput", {})
    if not isinstance(given, dict):
        raise ConfigFileError(f"{where}: throughput must be a JSON object of constants")
    measured = raw.get("calibrated_constants")
    by_gpu = {name: dict(values) for name, values in defaults["compute_efficiency_by_gpu"].items()}
    file_by_gpu = given.get("compute_efficiency_by_gpu", {})
    if not isinstance(file_by_gpu, dict) or not all(isinstance(v, dict) for v in file_by_gpu.values()):
        raise ConfigFileError(f"{where}: compute_efficiency_by_gpu must map GPU names to objects of efficiencies")
    per_dtype = given.get("compute_efficiency", {})
    if not isinstance(per_dtype, dict):
        raise ConfigFileError(f"{where}: compute_efficiency must be a JSON object of efficiencies per dtype")
    if measured is None:
        for name, values in file_by_gpu.items():
            by_gpu[name] = {**by_gpu.get(name, {}), **values}
        return {**defaults, **given, "compute_efficiency": {**defaults["compute_efficiency"], **per_dtype},
                "compute_efficiency_by_gpu": by_gpu}
    kept = {key: value for key, value in given.items() if key in measured and key != "compute_efficiency_by_gpu"}
    if "compute_efficiency" in kept:
        kept["compute_efficiency"] = {**defaults["compute_efficiency"], **per_dtype}
    scales: dict[str, dict[str, float]] = {}
    file_scales = given.get("compute_time_scale_by_gpu", {})
    if not isinstance(file_scales, dict) or not all(isinstance(v, dict) for v in file_scales.values()):
        raise ConfigFileError(f"{where}: compute_time_scale_by_gpu must map GPU names to objects of scales")
    for entry in measured:  # "compute_efficiency[<GPU name>][<dtype>]", "compute_time_scale[...][...]"
        for key, source, target in (("compute_efficiency", file_by_gpu, by_gpu),
                                    ("compute_time_scale", file_scales, scales)):
            if isinstance(entry, str) and entry.startswith(f"{key}[") and entry.count("][") == 1:
                name, dtype = entry[len(key) + 1:-1].split("][")[:2]
                if dtype in source.get(name, {}):
                    target.setdefault(name, {})[dtype] = source[name][dtype]
    return {**defaults, **kept, "compute_efficiency_by_gpu": by_gpu, "compute_time_scale_by_gpu": scales}


def calibration_for_gpu(gpu: GPUSpec) -> Calibration:
    """The shipped calibration measured on this GPU model; else one measured on the same chip
    (an H200 takes the H100's: the same GH100 die, so the same kernels reach the same fraction
    of its peak), with its measured compute efficiency carried over to this GPU's name and
    ``used_for`` saying so; else the documented defaults."""
    folder = resources.files("presets").joinpath("calibration")
    same_chip = None
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json") and entry.name != "default.json":
            raw = json.loads(entry.read_text())
            if raw.get("device") == gpu.name:
                return load_calibration(Path(str(entry)))
            if gpu.chip and raw.get("chip") == gpu.chip and same_chip is None:
                same_chip = Path(str(entry))
    if same_chip is None:
        return default_calibration()
    cal = load_calibration(same_chip)
    by_gpu = dict(cal.throughput.compute_efficiency_by_gpu)
    by_gpu[gpu.name] = by_gpu.get(cal.device or "", by_gpu.get(gpu.name, {}))
    scales = dict(cal.throughput.compute_time_scale_by_gpu)
    if cal.device in scales:
        scales[gpu.name] = scales[cal.device]
    return cal.model_copy(update={
        "throughput": cal.throughput.model_copy(update={"compute_efficiency_by_gpu": by_gpu,
                                                        "compute_time_scale_by_gpu": scales}),
        "used_for": f"measured on {cal.device}, the same {gpu.chip} chip as {gpu.name}",
    })
