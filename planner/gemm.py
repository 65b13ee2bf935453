"""A GEMM's time from its shape (issue 23, item 1): wave quantisation of output tiles over the
GPU's streaming multiprocessors, against the bytes the GEMM must move through HBM.

cuBLAS (and CUTLASS) compute ``C[m, n] = A[m, k] @ B[k, n]`` in output tiles of ``tile_m x
tile_n``; each SM works on one tile at a time, so ``ceil(m / tile_m) * ceil(n / tile_n)`` tiles
run in ``ceil(tiles / SMs)`` waves, and a last, partly filled wave costs a full one (NVIDIA,
"Matrix Multiplication Background User's Guide": tile and wave quantisation). A full wave
sustains ``ceiling`` of the dense peak (the maximum achievable matmul FLOPS, Bekman's MAMF); a
GEMM too small to fill its tiles' arithmetic is bound by reading A and B and writing C once;
each call costs ``launch_s``. The constants are data per GPU (``presets/gemm.json``), fitted by
``validation/gemm_fit.py`` on one half of published per-shape measurements and checked on the
other (``validation/gemm_published.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from math import ceil

GEMM_PRESETS = resources.files("presets").joinpath("gemm.json")


@dataclass(frozen=True)
class GemmModel:
    sms: int  # streaming multiprocessors (H100 SXM5: 132)
    tile_m: int
    tile_n: int
    ceiling: float  # share of the dense peak a full wave of tiles sustains
    launch_s: float  # per call
    hbm_efficiency: float  # share of the HBM bandwidth a memory-bound GEMM streams at

    def seconds(self, m: int, n: int, k: int, peak_flops: float, hbm_bytes_s: float, itemsize: int = 2,
                batch: int = 1) -> float:
        """One ``batch`` of ``[m, k] @ [k, n]`` GEMMs on a GPU of ``peak_flops`` dense FLOP/s."""
        tiles = batch * ceil(m / self.tile_m) * ceil(n / self.tile_n)
        waves = ceil(tiles / self.sms)
        compute = waves * self.sms * 2 * self.tile_m * self.tile_n * k / (peak_flops * self.ceiling)
        memory = itemsize * batch * (m * k + k * n + m * n) / (hbm_bytes_s * self.hbm_efficiency)
        return max(compute, memory) + self.launch_s

    def efficiency(self, m: int, n: int, k: int, peak_flops: float, hbm_bytes_s: float, itemsize: int = 2,
                   batch: int = 1) -> float:
        """Achieved FLOP/s over the dense peak."""
        seconds = self.seconds(m, n, k, peak_flops, hbm_bytes_s, itemsize, batch)
        return 2 * batch * m * n * k / seconds / peak_flops


def _model(entry: dict) -> GemmModel:
    return GemmModel(**{name: entry[name] for name in GemmModel.__dataclass_fields__})


@lru_cache(maxsize=64)
def gemm_model(gpu_id: str, dtype: str = "bf16") -> GemmModel | None:
    """The fitted model of a GPU preset and dtype, or None where none is fitted yet."""
    entry = json.loads(GEMM_PRESETS.read_text())["models"].get(f"{gpu_id}/{dtype}")
    return None if entry is None else _model(entry)


# fp16 runs on the same tensor cores at the same dense peak as bf16 (every GPU in gemm.json)
_SAME_PEAK = {"fp16": "bf16"}


@lru_cache(maxsize=64)
def gemm_model_for(gpu_name: str, dtype: str) -> GemmModel | None:
    """The model for a GPU by its name (``GPUSpec.name``): each entry of gemm.json lists the
    GPUs with its SM count and tensor cores (an H200 is an H100's GH100 die with faster HBM,
    which the model takes from the GPU's spec); None where none applies."""
    dtype = _SAME_PEAK.get(dtype, dtype)
    for key, entry in json.loads(GEMM_PRESETS.read_text())["models"].items():
        if key.endswith(f"/{dtype}") and gpu_name in entry.get("gpus", ()):
            return _model(entry)
    return None
