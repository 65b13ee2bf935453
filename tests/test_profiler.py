"""The profiler closes the loop on CPU: the planner's per-component prediction against
PyTorch's own memory trackers, per rank, for real gloo runs and simulated larger worlds.

Acceptance: parameters, gradients and optimizer state equal to the byte; activations within
5%; the whole-step peak (allocated bytes) within 5%.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import trainplan
from planner.calibration import Overheads, default_calibration, load_calibration
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from profiler.calibrate import (
    calibration_from,
    fit_compute_efficiency,
)
from profiler.report import ProfileReport
from profiler.run import profile_layout
from strategies.kernels.optim import make_optimizer
from strategies.model import build_model, materialize
from trainplan.cli import main

SPEC = load_model("tiny-llama")
GPU = load_gpu("h100-sxm-80gb")
CAL = default_calibration()

pytestmark = [pytest.mark.dist]


def _rows(report: ProfileReport) -> dict:
    return {row.quantity.split(" (")[0]: row for row in report.rows}


def _check(report: ProfileReport, peak_tolerance: float = 5.0) -> None:
    assert report.status == "ok"
    rows = _rows(report)
    for key in ("params", "grads", "optimizer"):
        assert rows[key].measured == rows[key].predicted, key
    assert abs(rows["activations"].error_pct) <= 5.0
    assert abs(rows["peak"].error_pct) <= peak_tolerance
    for predicted, measured in zip(report.predicted.ranks, report.measured.ranks):
        assert measured.memory.params == predicted.memory.params
        assert measured.memory.grads == predicted.memory.grads
        if report.train["zero_stage"] != 1:  # ZeRO-1's whole-tensor shares: the maximum is compared
            assert measured.memory.optimizer == predicted.memory.optimizer


WORLD_2 = {
    "ddp": dict(zero_stage=0),
    "zero1": dict(zero_stage=1),
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3, global_batch=4),
    "tp": dict(tp=2, sequence_parallel=True),
    "pp-1f1b": dict(pp=2, global_batch=8),
}


@pytest.mark.parametrize("name", list(WORLD_2))
def test_world_2_prediction_matches_measurement(name):
    fields = dict(gpus=2, seq_len=256, micro_batch=2, precision="fp32") | WORLD_2[name]
    report = profile_layout(SPEC, GPU, TrainConfig(**fields), CAL, timeout_s=300)
    _check(report)


@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2", "zero3", "zero1-fp16-mixed"])
def test_simulated_world_8(name):
    """One process holds rank 0 of 8 (fake process group, FakeTensorMode: no real memory).
    fp16-mixed: the loss scaler's overflow check has no values to look at; it assumes finite
    gradients and steps (issue 9, item 2: it used to stop the rank with
    DataDependentOutputException)."""
    strategy, _, precision = name.partition("-")
    zero = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[strategy]
    train = TrainConfig(gpus=8, zero_stage=zero, seq_len=256, micro_batch=2, precision=precision or "fp32")
    report = profile_layout(SPEC, GPU, train, CAL, simulate_world=8, timeout_s=300)
    _check(report)
    assert report.simulated_world == 8 and report.measured.step_time_s is None
    assert any("communication time is not" in note for note in report.notes)


def test_simulated_7b_zero3_per_rank_on_cpu():
    """A 7B ZeRO-3 rank of 8 GPUs, measured on this CPU under FakeTensorMode (DESIGN.md: ~14 s)."""
    train = TrainConfig(gpus=8, zero_stage=3, seq_len=1024, micro_batch=1, precision="bf16-mixed")
    report = profile_layout(load_model("llama-2-7b"), GPU, train, CAL, simulate_world=8, timeout_s=300)
    _check(report, peak_tolerance=2.0)


def test_simulated_tensor_parallel_on_cpu():
    """DTensor cannot run on fake tensors, so a simulated tensor-parallel rank holds its share
    for real (tiny-llama: a few MB); the fake process group still stands in for the world."""
    train = TrainConfig(gpus=8, tp=2, zero_stage=2, sequence_parallel=True, seq_len=256, micro_batch=2,
                        precision="fp32")
    report = profile_layout(SPEC, GPU, train, CAL, simulate_world=8, timeout_s=300)
    _check(report)


def test_a_simulated_pipeline_runs_on_cpu():
    """torch.distributed.pipelining on a fake process group: the stages are given their shapes
    (PipelineStage's static mode) and the start-up vote is answered (strategies/pipeline.py), so
    rank 0 -- the first stage, with FSDP2 keeping its units gathered across micro-batches -- runs
    on fake tensors. Full-size layouts are in validation/cpu.json (within 1%); here a small one,
    whose per-micro-batch buffers weigh more, against the planner."""
    train = TrainConfig(gpus=4, pp=2, zero_stage=3, seq_len=256, micro_batch=2, global_batch=16, precision="fp32")
    report = profile_layout(SPEC, GPU, train, CAL, simulate_world=4, timeout_s=300)
    assert report.status == "ok" and report.measured.ranks[0].stage == 0
    rows = {row.quantity: row for row in report.rows}
    for key in ("params", "grads", "optimizer"):
        assert rows[key].measured == rows[key].predicted
    assert abs(rows["peak (allocated)"].error_pct) < 8


def _cli(*args):
    return CliRunner().invoke(main, ["profile", "--model", "tiny-llama", "--seq-len", "64", "--precision", "fp32",
                                     *args])


def test_profile_cli_writes_report_and_compare_rerenders(tmp_path):
    out = tmp_path / "report.json"
    result = _cli("--nproc", "2", "--strategy", "zero2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "predicted" in result.stdout and "measured" in result.stdout
    data = json.loads(out.read_text())
    assert isinstance(data["predicted"]["memory"]["peak"], int)
    assert isinstance(data["measured"]["memory"]["params"], int)
    assert len(data["measured"]["ranks"]) == 2
    again = CliRunner().invoke(main, ["compare", str(out)])
    assert again.exit_code == 0 and "activations" in again.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # nothing half-written left


def test_profile_oom_is_a_result(tmp_path):
    out = tmp_path / "oom.json"
    result = _cli("--nproc", "2", "--strategy", "zero3", "--fail-rank", "1", "--fail-step", "1",
                  "--fail-kind", "oom", "--out", str(out), "--json")
    assert result.exit_code == 1
    report = ProfileReport.model_validate_json(out.read_text())
    assert report.status == "oom" and report.measured is None
    assert "predicted" in report.message and "out of memory at backward" in report.message
    assert result.stderr.startswith("error: predicted") and len(result.stderr.strip().splitlines()) == 1


def test_profile_failed_rank_leaves_no_report(tmp_path):
    out = tmp_path / "failed.json"
    result = _cli("--nproc", "2", "--strategy", "zero3", "--fail-rank", "1", "--fail-step", "1", "--out", str(out))
    assert result.exit_code == 1
    assert "rank 1: RuntimeError: deliberate failure" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_compare_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    result = CliRunner().invoke(main, ["compare", str(bad)])
    assert result.exit_code == 2 and "is not a trainplan profile report" in result.stderr


def test_track_api_on_a_users_loop():
    """The library API around a user's own loop (README example): exact states, peak within 1%."""
    torch.manual_seed(0)
    model = materialize(build_model(SPEC), "cpu")
    optimizer = make_optimizer(model.parameters())
    tokens = torch.randint(0, SPEC.vocab_size, (2, 128))
    with trainplan.track(model, optimizer) as t:
        for _ in range(3):
            model(tokens, tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
    cal = CAL.model_copy(update={"overheads": Overheads.none()})
    report = t.compare(trainplan.estimate(SPEC, GPU, TrainConfig(gpus=1, micro_batch=2, seq_len=128,
                                                                 precision="fp32"), cal))
    rows = _rows(report)
    for key in ("params", "grads", "optimizer"):
        assert rows[key].measured == rows[key].predicted
    assert abs(rows["peak"].error_pct) < 1.0


def test_calibration_fit_and_use(tmp_path):
    assert fit_compute_efficiency(4e14, 1.0, 1e15) == pytest.approx(0.4)
    measured = {"gpu": GPU.name, "driver": "x", "torch": "x", "cuda": "x", "model": "llama-3.2-1b", "seq_len": 2048,
                "micro_batch": 4, "precision": "bf16-mixed", "cuda_context_bytes": 600 * 2**20,
                "communicator_bytes": 64 * 2**20, "max_memory_allocated": 40 * 2**30,
                "max_memory_reserved": 41 * 2**30, "step_time_s": 0.6, "forward_backward_s": 0.5,
                "optimizer_step_s": 0.1, "executed_flops": 2.2e14, "num_params": 1_235_814_400,
                "date": "2026-11-23"}
    cal = calibration_from(measured, GPU, "h100-sxm-80gb")
    path = tmp_path / "h100.json"
    path.write_text(cal.model_dump_json())
    loaded = load_calibration(path)
    assert loaded.calibrated and loaded.overheads.cuda_context_bytes == 600 * 2**20
    # the allocator's cache is modelled (planner/allocator.py), not a calibrated flat fraction
    assert loaded.overheads.fragmentation is None and loaded.overheads.cache is not None
    # the flash attention is taken out at its own efficiency: the rest ran faster than the average
    assert loaded.throughput.efficiency(GPU.name, "bf16") > 2.2e14 / (0.5 * 989.4e12)
    from planner.flops import FLASH_BACKWARD_FACTOR, rank_attention_flops

    train = TrainConfig(gpus=1, seq_len=2048, micro_batch=4, precision="bf16-mixed")
    model = load_model("llama-3.2-1b")
    attention = (1 + FLASH_BACKWARD_FACTOR) * rank_attention_flops(model, train) * model.num_layers
    attention_s = attention / (989.4e12 * loaded.throughput.attention_efficiency)
    rest_s = (2.2e14 - attention) / (989.4e12 * loaded.throughput.efficiency(GPU.name, "bf16"))
    assert attention_s + rest_s == pytest.approx(0.5, rel=1e-3)
    plan = CliRunner().invoke(main, ["plan", "--model", "7b", "--gpus", "8", "--strategy", "zero3", "--tp", "1",
                                     "--pp", "1", "--calibration", str(path)])
    assert plan.exit_code == 0 and "calibrated" in plan.stdout and "uncalibrated" not in plan.stdout
    cli = CliRunner().invoke(main, ["calibrate"])
    if not torch.cuda.is_available():
        assert cli.exit_code == 1 and "no NVIDIA driver" in cli.stderr


def test_compiled_run_is_measured_compiled_and_matches_the_compile_prediction(tmp_path):
    # torch.compile'd blocks save less than eager ones (the partitioner recomputes silu(gate),
    # the residual sum and autocast's extra casts). The profiler measures them by the allocator's
    # high-water mark, since a dispatch-mode tracker would run them eagerly. Issue 11's goal:
    # peak within 5%; measured when written: within 1.1% (torch 2.13 CPU inductor). amp-bf16
    # exercises all three (fp32 and bf16: validation/clients.json).
    precision = "amp-bf16"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
                                  "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2,
                                  "vocab_size": 1024, "max_position_embeddings": 512}))
    spec = load_model(str(config))
    train = TrainConfig(gpus=1, precision=precision, micro_batch=4, global_batch=4, seq_len=512,
                        optimizer_impl="for-loop", compile=True)
    report = profile_layout(spec, GPU, train, CAL, timeout_s=600)
    assert report.status == "ok", report.message
    rows = {r.quantity: r for r in report.rows}
    assert abs(rows["peak (allocated)"].error_pct) < 2, rows["peak (allocated)"]
    assert abs(rows["activations"].error_pct) < 3, rows["activations"]
    assert any("compiled" in note for note in report.notes)
    # and the eager prediction would be off: compile changed what is saved
    eager = trainplan.estimate(spec, GPU, train.model_copy(update={"compile": False}), CAL)
    assert eager.stages[0].phases["forward"].activations > 1.1 * rows["activations"].measured


def test_fake_tensor_parallel_rank_measures_full_size_layouts():
    # --fake-tp: DTensor over FakeTensorMode. Parameters, gradients, optimizer state and the
    # activations a TP rank saves are measured as on real shards (llama-3-8b dp4 x tp2 + SP
    # ZeRO-3, seq 4096, full depth: all four exact in 42 s, validation/samples/); the forward
    # peak carries the known loss_parallel artefact (two fp32 vocabulary shards).
    train = TrainConfig(gpus=8, tp=2, zero_stage=3, sequence_parallel=True, seq_len=256, micro_batch=2,
                        precision="bf16-mixed")
    report = profile_layout(SPEC, GPU, train, CAL, simulate_world=8, timeout_s=300, fake_tp=True)
    assert report.status == "ok"
    rows = {r.quantity: r for r in report.rows}
    for key in ("params", "grads", "optimizer"):
        assert rows[key].measured == rows[key].predicted, key
    assert abs(rows["activations"].error_pct) < 0.01
    assert any("fake tensor parallelism" in note for note in report.notes)
