"""Fits planner/gemm.py's constants to published per-shape GEMM measurements, half of them,
and reports the other half (issue 23: hold out before fitting).

    python validation/gemm_fit.py          # fit, print both halves' errors
    python validation/gemm_fit.py --write  # also write presets/gemm.json

Data: validation/gemm_published.json's H100 bf16 rows from XLA's GEMM timing table (375
shapes, one method: tensorflow/tensorflow third_party/xla/xla/service/gpu/model/
matmul_interpolator_data.h, key sm_90). Split, declared here before fitting: the shapes sorted
by (batch, m, n, k), even positions fit, odd positions check. The GPU is taken as the H100 SXM
(989.4 dense bf16 TFLOP/s, 3,350 GB/s): the table's best figure, 810 TFLOP/s, is above the
PCIe card's peak. Its SM count (132) is the SXM5's (NVIDIA H100 Tensor Core GPU Architecture
whitepaper, Table 3).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.gemm import GEMM_PRESETS, GemmModel  # noqa: E402

DATA = ROOT / "validation" / "gemm_published.json"
PEAK, HBM, SMS = 989.4e12, 3350e9, 132


def rows() -> list[dict]:
    data = json.loads(DATA.read_text())
    found = [m for m in data["measurements"] if m["gpu"].startswith("H100 (XLA sm_90") and m["dtype"] == "bf16"]
    return sorted(found, key=lambda m: (m["batch"], m["m"], m["n"], m["k"]))


def split() -> tuple[list[dict], list[dict]]:
    ordered = rows()
    return ordered[0::2], ordered[1::2]


def errors(model: GemmModel, measured: list[dict], peak: float = PEAK, hbm: float = HBM) -> list[float]:
    """Predicted over measured TFLOP/s, minus one, per shape."""
    out = []
    for r in measured:
        seconds = model.seconds(r["m"], r["n"], r["k"], peak, hbm, 2, r["batch"])
        out.append(2 * r["batch"] * r["m"] * r["n"] * r["k"] / seconds / 1e12 / r["tflops"] - 1)
    return out


def fit(measured: list[dict], sms: int = SMS, peak: float = PEAK, hbm_bytes_s: float = HBM) -> GemmModel:
    """Grid search minimising the median |log error| (a shape 10x off counts as much as 10x)."""
    best, best_cost = None, math.inf
    for (tm, tn), ceiling, launch_us, hbm in itertools.product(
            [(128, 128), (128, 256), (256, 128)], [0.60 + 0.01 * i for i in range(36)],
            [2, 3, 4, 5, 6, 8, 10, 12, 15], [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]):
        model = GemmModel(sms, tm, tn, round(ceiling, 2), launch_us * 1e-6, hbm)
        cost = statistics.median(abs(math.log1p(e)) for e in errors(model, measured, peak, hbm_bytes_s))
        if cost < best_cost:
            best, best_cost = model, cost
    return best


def summary(errs: list[float]) -> dict:
    return {"shapes": len(errs), "median_abs_error": round(statistics.median(abs(e) for e in errs), 4),
            "within_10pct": sum(abs(e) <= 0.10 for e in errs), "within_25pct": sum(abs(e) <= 0.25 for e in errs),
            "worst_abs_error": round(max(abs(e) for e in errs), 4)}


def other_sources() -> list[dict]:
    """H100 SXM bf16 GEMMs measured by other methods (mamf-finder, torch.mm, our own
    benchmarks/int8_gemm.py): a check on data from outside the fitted table."""
    data = json.loads(DATA.read_text())
    return [m for m in data["measurements"] if m["gpu"].startswith("H100 SXM") and m["dtype"] == "bf16"]


def flat_errors(efficiency: float, measured: list[dict]) -> list[float]:
    """What one efficiency for every GEMM (the step-time model's gemm constant) gives."""
    return [PEAK * efficiency / 1e12 / r["tflops"] - 1 for r in measured]


H100_SXM_DIE = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 96GB HBM3", "NVIDIA H100 96GB HBM3 (500 W power limit)",
                "NVIDIA H100 NVL", "NVIDIA H200",
                "NVIDIA GH200 480GB", "NVIDIA GH200 120GB", "NVIDIA GH200 144G HBM3e"]
A100_SXM = ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB"]


def a100_model(h100: GemmModel) -> GemmModel:
    """The A100 (SXM4: 108 SMs, A100 whitepaper Table 1) is not fitted, for want of a
    per-shape table: its ceiling is Bekman's MAMF, 271.2 of 312 dense bf16 TFLOP/s
    (ml-engineering, compute/accelerator/README.md), the rest the H100 fit's constants."""
    return GemmModel(108, h100.tile_m, h100.tile_n, round(271.2 / 312, 3), h100.launch_s, h100.hbm_efficiency)


def a100_rows() -> list[dict]:
    """A100 bf16 GEMMs measured with mamf-finder (SXM and PCIe, ml-engineering): the check of
    the derived A100 model."""
    data = json.loads(DATA.read_text())
    return [m for m in data["measurements"] if m["gpu"] in ("A100 SXM", "A100 PCIe") and m["dtype"] == "bf16"]


def a100_errors(model: GemmModel) -> list[float]:
    return [2 * r["m"] * r["n"] * r["k"] / model.seconds(r["m"], r["n"], r["k"], 312e12, 1935e9) / 1e12
            / r["tflops"] - 1 for r in a100_rows()]


B200_PEAK, B200_HBM, B200_SMS = 2250e12, 7700e9, 148


def b200_split() -> tuple[list[dict], list[dict]]:
    """XLA's sm_100 bf16 table (48 shapes transcribed, validation/gemm_published.json), split as the
    H100's: sorted by (batch, m, n, k), even positions fit, odd check. The B200 (presets/gpus/
    b200.json: 2,250 dense bf16 TFLOP/s, 7.7 TB/s) with 148 SMs (NVIDIA Blackwell architecture
    technical brief: 148 SMs over its two dies)."""
    data = json.loads(DATA.read_text())
    ordered = sorted((m for m in data["measurements"] if m["gpu"].startswith("B200-class (XLA sm_100")
                      and m["dtype"] == "bf16"), key=lambda m: (m["batch"], m["m"], m["n"], m["k"]))
    return ordered[0::2], ordered[1::2]


def b200_other_rows() -> list[dict]:
    """The B200 SXM's mamf-finder row (ml-engineering), outside XLA's table."""
    data = json.loads(DATA.read_text())
    return [m for m in data["measurements"] if m["gpu"] == "B200 SXM" and m["dtype"] == "bf16"]


def main() -> int:
    fit_rows, check_rows = split()
    model = fit(fit_rows)
    # the best single efficiency on the fit half, for comparison
    flat = min((0.30 + 0.01 * i for i in range(60)),
               key=lambda e: statistics.median(abs(math.log1p(x)) for x in flat_errors(e, fit_rows)))
    result = {"fit": summary(errors(model, fit_rows)), "check": summary(errors(model, check_rows)),
              "one_efficiency": {"efficiency": round(flat, 2), "check": summary(flat_errors(flat, check_rows))},
              "other_sources": summary(errors(model, other_sources()))}
    print(f"{model}\nfit: {result['fit']}\ncheck: {result['check']}\none efficiency {flat:.2f}, check: "
          f"{result['one_efficiency']['check']}\nother H100 SXM sources: {result['other_sources']}\n"
          f"A100 (derived, mamf-finder rows): {summary(a100_errors(a100_model(model)))}")
    if "--write" in sys.argv:
        from strategies.files import write_atomic

        entry = {name: getattr(model, name) for name in GemmModel.__dataclass_fields__}
        entry |= {"source": "validation/gemm_fit.py on XLA's sm_90 bf16 GEMM table (half the shapes)",
                  "fit": result["fit"], "check": result["check"], "one_efficiency": result["one_efficiency"],
                  "other_sources": result["other_sources"]}
        entry["gpus"] = H100_SXM_DIE
        a100 = a100_model(model)
        a100_entry = {name: getattr(a100, name) for name in GemmModel.__dataclass_fields__}
        a100_entry |= {"source": "108 SMs (A100 whitepaper); ceiling: MAMF 271.2 of 312 TFLOP/s (ml-engineering); "
                                 "tiles, launch and HBM efficiency: the H100 fit's (not fitted on A100 data)",
                       "check": summary(a100_errors(a100)), "gpus": A100_SXM}
        b_fit, b_check = b200_split()
        b200 = fit(b_fit, B200_SMS, B200_PEAK, B200_HBM)
        b200_entry = {name: getattr(b200, name) for name in GemmModel.__dataclass_fields__}
        b200_entry |= {"source": "validation/gemm_fit.py on XLA's sm_100 bf16 GEMM table (half the 48 shapes)",
                       "fit": summary(errors(b200, b_fit, B200_PEAK, B200_HBM)),
                       "check": summary(errors(b200, b_check, B200_PEAK, B200_HBM)),
                       "other_sources": summary(errors(b200, b200_other_rows(), B200_PEAK, B200_HBM)),
                       "gpus": ["NVIDIA B200"]}
        presets = {"description": "planner/gemm.py's constants per GPU preset and dtype; gpus: the GPU names "
                                  "(GPUSpec.name) each model applies to",
                   "models": {"h100-sxm-80gb/bf16": entry, "a100-80gb/bf16": a100_entry, "b200/bf16": b200_entry}}
        write_atomic(Path(str(GEMM_PRESETS)), json.dumps(presets, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
