"""planner/gemm.py: a GEMM's time from its shape, fitted on half of XLA's H100 bf16 GEMM table
and checked on the other half and on other sources (validation/gemm_fit.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "validation"))

import gemm_fit  # noqa: E402

from planner.gemm import GEMM_PRESETS, GemmModel, gemm_model, gemm_model_for  # noqa: E402

H100 = gemm_model("h100-sxm-80gb", "bf16")


def test_the_committed_constants_are_the_fit_on_the_declared_half():
    """presets/gemm.json is what validation/gemm_fit.py fits on the even-positioned shapes; the
    held-out odd ones and the shapes measured by other methods report their own errors."""
    fit_rows, check_rows = gemm_fit.split()
    assert not {id(r) for r in fit_rows} & {id(r) for r in check_rows}
    assert len(fit_rows) + len(check_rows) == 375
    assert gemm_fit.fit(fit_rows) == H100
    entry = json.loads(GEMM_PRESETS.read_text())["models"]["h100-sxm-80gb/bf16"]
    assert entry["check"] == gemm_fit.summary(gemm_fit.errors(H100, check_rows))
    assert entry["check"]["median_abs_error"] <= 0.10
    assert entry["other_sources"]["median_abs_error"] <= 0.05
    # one efficiency for every GEMM (today's step-time model) is far off on the same shapes
    assert entry["one_efficiency"]["check"]["median_abs_error"] > 4 * entry["check"]["median_abs_error"]


def test_the_ceiling_is_the_maximum_achievable_matmul_flops():
    """Fitted without them, the ceiling agrees with Bekman's MAMF on the H100 SXM: 794.5 of the
    989.4 dense bf16 TFLOP/s (stas00/ml-engineering, compute/accelerator/README.md)."""
    assert H100.ceiling == pytest.approx(794.5 / 989.4, abs=0.02)


def test_wave_quantisation():
    """NVIDIA's Matrix Multiplication Background guide: a last, partly filled wave costs a full
    one. 132 SMs and 128 x 128 tiles: [1536, 8192] @ [8192, 1408] is 12 x 11 = 132 tiles, one
    wave; one more row makes 13 x 11 = 143 tiles, two waves, twice the time (compute-bound)."""
    model = GemmModel(sms=132, tile_m=128, tile_n=128, ceiling=0.8, launch_s=0.0, hbm_efficiency=1.0)
    one = model.seconds(1536, 1408, 8192, 989.4e12, 3.35e12)
    two = model.seconds(1537, 1408, 8192, 989.4e12, 3.35e12)
    assert one == pytest.approx(2 * 1536 * 1408 * 8192 / (989.4e12 * 0.8))
    assert two == pytest.approx(2 * one)


def test_small_gemms_are_bound_by_memory_and_launch():
    """[4096, 4096] @ [4096, 16] reads 32 MiB for 0.5 GFLOP: HBM-bound, far below the ceiling."""
    assert H100.efficiency(4096, 16, 4096, 989.4e12, 3.35e12) < 0.1
    assert H100.efficiency(8192, 8192, 8192, 989.4e12, 3.35e12) == pytest.approx(0.78, abs=0.02)


def test_models_by_gpu_name():
    """An entry applies to the GPUs it lists by name: every GH100 board with 132 SMs takes the
    H100 fit (fp16 as bf16: the same tensor cores and peak); the A100 its own (108 SMs, MAMF
    ceiling), checked on the A100 mamf-finder rows; a GPU with none falls back to the
    calibration's one efficiency (None here)."""
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100 96GB HBM3"):
        assert gemm_model_for(name, "bf16") == H100 == gemm_model_for(name, "fp16")
    a100 = gemm_model_for("NVIDIA A100-SXM4-80GB", "bf16")
    assert a100.sms == 108 and a100.ceiling == pytest.approx(271.2 / 312, abs=1e-3)
    entry = json.loads(GEMM_PRESETS.read_text())["models"]["a100-80gb/bf16"]
    assert entry["check"] == gemm_fit.summary(gemm_fit.a100_errors(a100))
    assert entry["check"]["median_abs_error"] <= 0.05
    b200 = gemm_model_for("NVIDIA B200", "bf16")
    entry = json.loads(GEMM_PRESETS.read_text())["models"]["b200/bf16"]
    b_fit, b_check = gemm_fit.b200_split()
    assert b200 == gemm_fit.fit(b_fit, gemm_fit.B200_SMS, gemm_fit.B200_PEAK, gemm_fit.B200_HBM)
    assert entry["check"] == gemm_fit.summary(gemm_fit.errors(b200, b_check, gemm_fit.B200_PEAK, gemm_fit.B200_HBM))
    assert entry["check"]["median_abs_error"] <= 0.10  # XLA's sm_100 shapes only reach 4096
    assert gemm_model_for("NVIDIA H100 PCIe", "bf16") is None  # 114 SMs: not fitted
    assert gemm_model_for("NVIDIA L4", "bf16") is None
    assert gemm_model_for("NVIDIA H100 80GB HBM3", "fp32") is None
