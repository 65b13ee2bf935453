"""Calibration files: measured constants override the defaults; the rest follow today's
documented defaults (presets/calibration/default.json)."""

from __future__ import annotations

import json

import pytest

from planner.calibration import default_calibration, load_calibration
from planner.errors import ConfigFileError


def test_only_measured_constants_come_from_a_calibrate_file(tmp_path):
    """A file from `trainplan calibrate` lists what it measured; its copies of the other
    constants (the defaults of the day it was written) give way to today's defaults."""
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({
        "id": "mine", "source": "test", "calibrated": True, "overheads": {"cuda_context_bytes": 1},
        "throughput": {"optimizer_hbm_efficiency": 0.3, "inter_node_bandwidth_efficiency": 0.5,
                       "compute_efficiency_by_gpu": {"My GPU": {"bf16": 0.42, "fp16": 0.9}}},
        "calibrated_constants": ["optimizer_hbm_efficiency", "compute_efficiency[My GPU][bf16]"],
    }))
    cal = load_calibration(path)
    defaults = default_calibration().throughput
    assert cal.throughput.optimizer_hbm_efficiency == 0.3
    assert cal.throughput.inter_node_bandwidth_efficiency == defaults.inter_node_bandwidth_efficiency
    assert cal.throughput.efficiency("My GPU", "bf16") == 0.42
    assert cal.throughput.efficiency("My GPU", "fp16") == defaults.compute_efficiency["fp16"]


def test_a_hand_written_file_is_taken_as_written(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"id": "mine", "source": "by hand", "overheads": {},
                                "throughput": {"inter_node_bandwidth_efficiency": 0.5}}))
    assert load_calibration(path).throughput.inter_node_bandwidth_efficiency == 0.5


def test_bad_throughput_is_one_clear_error(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"id": "mine", "source": "by hand", "overheads": {}, "throughput": [1]}))
    with pytest.raises(ConfigFileError, match="throughput must be a JSON object"):
        load_calibration(path)


def test_shipped_h100_calibration_predicts_its_own_step():
    """The shipped H100 calibration, refit from its own measurements (llama-3.2-1b, seq 2048 x 4,
    bf16-mixed), predicts that step's forward + backward as measured: the fit takes the flash
    attention out at attention_efficiency, as planner.step_time times it."""
    import json
    from pathlib import Path

    from planner.catalog import load_gpu, load_model
    from planner.configs import TrainConfig
    from planner.step_time import estimate_step
    from profiler.calibrate import calibration_from

    shipped = json.loads((Path(__file__).resolve().parent.parent / "presets/calibration/h100-sxm-80gb.json").read_text())
    measured, gpu = shipped["measurements"], load_gpu("h100-sxm-80gb")
    cal = calibration_from(measured, gpu, "h100-sxm-80gb")
    name = gpu.name
    assert cal.throughput.compute_efficiency_by_gpu[name]["bf16"] == \
        shipped["throughput"]["compute_efficiency_by_gpu"][name]["bf16"]
    train = TrainConfig(gpus=1, seq_len=measured["seq_len"], micro_batch=measured["micro_batch"],
                        precision=measured["precision"])
    step = estimate_step(load_model(measured["model"]), gpu, train, cal)
    assert step.breakdown.compute_s == pytest.approx(measured["forward_backward_s"], rel=1e-3)
