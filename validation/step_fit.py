"""Fits the per-operation step-time model's constants on the fit half of the published runs
only (issue 23: hold out before fitting), and reports both halves.

    python validation/step_fit.py           # fit, print the constants and both halves' errors
    python validation/step_fit.py --write   # also write them to presets/calibration/default.json
                                            # and presets/gpus/h100-sxm-96gb-500w.json

The runs are ``validation/published_steps.json``'s ``fit`` list, split from the ``check`` list
by the rule stated in that file before the planner ran on them. Three constants, fitted in
turn, each by a grid search minimising the median |log(predicted / published)| over the fit
runs the planner expresses:

1. ``gemm_sustained`` and ``elementwise_hbm_efficiency`` (``ThroughputConstants``): the share of
   its benchmarked rate a GEMM sustains in a training step, and the HBM efficiency of the
   memory-bound ops between GEMMs -- on the fit runs on GPUs at their datasheet power;
2. ``compute_derate`` of the ``h100-sxm-96gb-500w`` preset (Meta's Grand Teton H100 at 500 W,
   where torchtitan's H100 tables were measured): on the fit runs on that board, with 1 given;
3. ``alibi_attention_factor``: on the fit runs of ALiBi models (llm-foundry's MPT), with 1 given.

1 and 3 alternate twice (each with the other's latest value), then 2 is fitted with both given.

Everything else keeps its documented source (GEMM tiles: ``validation/gemm_fit.py``;
FlashAttention's curve: FlashAttention-3's Figure 5; collectives: NCCL's tuning model).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.calibration import default_calibration  # noqa: E402
from planner.catalog import load_gpu  # noqa: E402
from validation import step_accuracy  # noqa: E402

POWER_CAPPED = "h100-sxm-96gb-500w"
CALIBRATION = ROOT / "presets" / "calibration" / "default.json"
GPU_PRESET = ROOT / "presets" / "gpus" / f"{POWER_CAPPED}.json"

GEMM_SUSTAINED = [round(0.60 + 0.02 * i, 2) for i in range(21)]  # 0.60 .. 1.00
ELEMENTWISE = [round(0.30 + 0.05 * i, 2) for i in range(14)]  # 0.30 .. 0.95
DERATE = [round(0.50 + 0.02 * i, 2) for i in range(26)]  # 0.50 .. 1.00
ALIBI = [round(0.30 + 0.05 * i, 2) for i in range(15)]  # 0.30 .. 1.00


def _runs() -> tuple[dict, list[str]]:
    data = json.loads(step_accuracy.RUNS.read_text())
    return {r["id"]: r for r in data["runs"]}, data["fit"]


def _cost(errors: list[float]) -> float:
    return statistics.median(abs(math.log1p(e)) for e in errors) if errors else math.inf


def _errors(ids: list[str], runs: dict, calibration, gpu=None) -> list[float]:
    errors = []
    for i in ids:
        row = step_accuracy.compare(runs[i], "fit", calibration, gpu)
        if row.error is not None:
            errors.append(row.error)
    return errors


def _calibration(gemm_sustained: float, elementwise: float, alibi: float = 1.0):
    base = default_calibration()
    return base.model_copy(update={"throughput": base.throughput.model_copy(update={
        "gemm_sustained": gemm_sustained, "elementwise_hbm_efficiency": elementwise,
        "alibi_attention_factor": alibi})})


def fit(rounds: int = 2) -> dict:
    """Coordinate descent: (1) then (3), twice, each on the fit half; then (2) with them given."""
    runs, fit_ids = _runs()
    datasheet = [i for i in fit_ids if runs[i].get("gpu_preset") != POWER_CAPPED]
    capped = [i for i in fit_ids if runs[i].get("gpu_preset") == POWER_CAPPED]
    alibi = [i for i in datasheet if str(runs[i]["model"]).lower().startswith("mpt")]
    alibi_factor = 1.0
    for _ in range(rounds):
        cost, sustained, elementwise = min(
            (_cost(_errors(datasheet, runs, _calibration(g, e, alibi_factor))), g, e)
            for g in GEMM_SUSTAINED for e in ELEMENTWISE)
        alibi_cost, alibi_factor = min(
            (_cost(_errors(alibi, runs, _calibration(sustained, elementwise, a))), a) for a in ALIBI)
    cal = _calibration(sustained, elementwise, alibi_factor)
    board = load_gpu(POWER_CAPPED)
    derate_cost, derate = min(
        (_cost(_errors(capped, runs, cal, board.model_copy(update={"compute_derate": d}))), d) for d in DERATE)
    return {"gemm_sustained": sustained, "elementwise_hbm_efficiency": elementwise, "compute_derate": derate,
            "alibi_attention_factor": alibi_factor,
            "fit_runs": {"datasheet_power": len(datasheet), "power_capped": len(capped), "alibi": len(alibi)},
            "cost": {"datasheet_power": round(cost, 4), "power_capped": round(derate_cost, 4),
                     "alibi": round(alibi_cost, 4)}}


def refresh_machine_factors() -> None:
    """The shipped calibrations' measured compute-time factors are measured / modelled: with
    new constants, the same measurement gives a new factor (profiler/calibrate.py)."""
    from planner import clear_caches
    from planner.catalog import gpu_preset_for_device
    from profiler.calibrate import compute_time_scale, measured_layout
    from strategies.files import write_atomic

    clear_caches()  # default_calibration() reads the file just written
    for path in sorted(CALIBRATION.parent.glob("*.json")):
        raw = json.loads(path.read_text())
        scales = raw.get("throughput", {}).get("compute_time_scale_by_gpu")
        measured = raw.get("measurements")
        if not scales or not measured:
            continue
        model, train = measured_layout(measured)
        scale = compute_time_scale(model, load_gpu(gpu_preset_for_device(raw["device"])), train,
                                   measured["forward_backward_s"], default_calibration())
        dtype = next(iter(scales[raw["device"]]))
        scales[raw["device"]][dtype] = round(scale, 4)
        write_atomic(path, json.dumps(raw, indent=2) + "\n")


def main() -> int:
    result = fit()
    if "--write" in sys.argv:
        from strategies.files import write_atomic

        cal = json.loads(CALIBRATION.read_text())
        cal["throughput"]["gemm_sustained"] = result["gemm_sustained"]
        cal["throughput"]["elementwise_hbm_efficiency"] = result["elementwise_hbm_efficiency"]
        cal["throughput"]["alibi_attention_factor"] = result["alibi_attention_factor"]
        write_atomic(CALIBRATION, json.dumps(cal, indent=2, ensure_ascii=False) + "\n")
        gpu = json.loads(GPU_PRESET.read_text())
        gpu["spec"]["compute_derate"] = result["compute_derate"]
        write_atomic(GPU_PRESET, json.dumps(gpu, indent=2) + "\n")
        refresh_machine_factors()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
