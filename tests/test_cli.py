"""The command-line surface: tables render, JSON round-trips, user mistakes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.estimate import Estimate
from planner.search import PlanResult
from trainplan.cli import main, plan_command

ROOT = Path(__file__).resolve().parent.parent


def _plan(*args):
    return CliRunner().invoke(plan_command, list(args))


def test_plan_search_table_renders():
    result = _plan("--model", "7b", "--gpus", "8")
    assert result.exit_code == 0, result.output
    for label in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-2+offload", "ZeRO-3", "ZeRO-3+offload", "8·1·1", "fits",
                  "recommended:", "tok/s", "MFU"):
        assert label in result.stdout
    assert "GiB" in result.stdout
    # pure data parallelism only: plain DDP of 7B (112 GB of states) cannot fit 80 GB
    result = _plan("--model", "7b", "--gpus", "8", "--tp", "1", "--pp", "1")
    assert result.exit_code == 0, result.output
    assert "OOM" in result.stdout and "DDP does not fit" in result.stdout


def test_plan_fixed_prints_breakdown_per_phase():
    result = _plan("--model", "7b", "--gpus", "8", "--strategy", "zero3", "--tp", "1", "--pp", "1", "--ac", "none",
                   "--micro-batch", "1", "--seq-len", "4096")
    assert result.exit_code == 0, result.output
    for word in ("forward", "backward", "optimizer", "activations", "temporaries", "overhead", "peak"):
        assert word in result.stdout


def test_plan_fixed_pipeline_shows_stages_and_host():
    result = _plan("--model", "13b", "--gpus", "8", "--strategy", "zero1", "--tp", "2", "--pp", "2",
                   "--global-batch", "32", "--micro-batch", "1")
    assert result.exit_code == 0, result.output
    assert "stage 0" in result.stdout and "stage 1" in result.stdout
    result = _plan("--model", "7b", "--gpus", "8", "--strategy", "zero3", "--offload", "params", "--tp", "1", "--pp", "1")
    assert "host memory" in result.stdout


def test_plan_json_fixed_round_trips():
    result = _plan("--model", "7b", "--gpus", "8", "--strategy", "zero2", "--tp", "1", "--pp", "2",
                   "--global-batch", "16", "--micro-batch", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("params", "grads", "optimizer", "activations", "temporaries", "overhead", "peak"):
        assert isinstance(data["memory"][key], int)
        assert all(isinstance(stage[key], int) for stage in data["stages"])
    assert len(data["stages"]) == 2
    assert data["model"]["num_params"] == 6_738_415_616
    assert "host" in data
    for key in ("step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "mfu"):
        assert data["throughput"][key] > 0
    for key in ("compute_s", "bubble_s", "offload_s", "dp_communication_exposed_s"):
        assert key in data["throughput"]["breakdown"]
    assert Estimate.model_validate_json(result.stdout).model_dump() == data


def test_plan_json_search_has_candidates_and_recommendation():
    result = _plan("--model", "7b", "--gpus", "8", "--json")
    assert result.exit_code == 0, result.output
    parsed = PlanResult.model_validate_json(result.stdout)
    assert len(parsed.candidates) == 10 and parsed.num_candidates > 100
    assert all(isinstance(c.memory.peak, int) and c.throughput.tokens_per_s > 0 for c in parsed.candidates)
    assert parsed.recommended is not None and parsed.recommended == parsed.candidates[0]
    data = json.loads(result.stdout)
    assert data["recommended"]["throughput"]["breakdown"]["compute_s"] > 0


def test_presets_lists_models_and_gpus():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0, result.output
    assert "llama-2-7b" in result.stdout and "h100-sxm-80gb" in result.stdout
    data = json.loads(CliRunner().invoke(main, ["presets", "--json"]).stdout)
    assert {m["id"] for m in data["models"]} >= {"llama-3-8b", "cpm-2"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "llama-7b", "--gpus", "8"], "unknown model 'llama-7b'; did you mean"),
        (["--model", "7b", "--gpus", "0"], "Invalid value for '--gpus'"),
        (["--model", "7b", "--gpus", "8", "--tp", "3"], "tp=3 does not divide the 8 GPUs"),
        (["--model", "7b", "--gpus", "3", "--tp", "3"], "tp=3 does not divide the 32 attention heads"),
        (["--model", "7b", "--gpus", "8", "--micro-batch", "-2"], "Invalid value for '--micro-batch'"),
        (["--model", "7b", "--gpus", "8", "--global-batch", "12", "--micro-batch", "1", "--strategy", "ddp",
          "--tp", "1", "--pp", "1"], "global batch 12 is not divisible"),
        (["--model", "7b", "--gpus", "8", "--gpu", "h1000"], "unknown gpu 'h1000'"),
        (["--model", "7b", "--gpus", "8", "--strategy", "zero5"], "Invalid value for '--strategy'"),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = _plan(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output


def test_malformed_config_json_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,')
    result = _plan("--model", str(bad), "--gpus", "1")
    assert result.exit_code == 2
    assert "is not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_real_subprocess_error_and_success(tmp_path):
    """Once through a real process: the console script's module, exit codes, stderr."""
    bad = subprocess.run([sys.executable, "-m", "trainplan.cli", "plan", "--model", "nope", "--gpus", "8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown model 'nope'")
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    ok = subprocess.run([sys.executable, "-m", "trainplan.cli", "plan", "--model", "7b", "--gpus", "8", "--json"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["candidates"]
    # the plan path never imports torch
    probe = subprocess.run([sys.executable, "-c", "import sys, trainplan.cli, planner.search, planner.memory, "
                            "trainplan.report; print('torch' in sys.modules)"], capture_output=True, text=True,
                           timeout=60)
    assert probe.stdout.strip() == "False"


# ---------------------------------------------------------------- exit status and --json errors (issue 9, item 5)


def _one_json_object(stdout: str) -> dict:
    data = json.loads(stdout)  # raises if stdout holds anything but one JSON document
    assert isinstance(data, dict)
    return data


FIXED_7B = ["--model", "7b", "--gpus", "8", "--tp", "1", "--pp", "1"]


def test_exit_status_fits_0_does_not_fit_1_usage_2():
    fits = _plan(*FIXED_7B, "--strategy", "zero3")
    assert fits.exit_code == 0, fits.output
    too_big = _plan(*FIXED_7B, "--strategy", "ddp")  # 7B DDP: 16 B/param > 80 GB
    assert too_big.exit_code == 1
    assert too_big.stderr.strip() == "error: does not fit: GPU memory needs 128.86 GiB of 79.65 GiB"
    assert "does not fit" in too_big.stdout  # the breakdown is still printed
    nothing = _plan("--model", "405b", "--gpus", "8", "--tp", "1", "--pp", "1")
    assert nothing.exit_code == 1 and nothing.stderr.startswith("error: nothing fits")
    usage = _plan(*FIXED_7B, "--strategy", "zero9")
    assert usage.exit_code == 2


def test_json_stdout_is_always_one_object():
    too_big = _plan(*FIXED_7B, "--strategy", "ddp", "--json")
    assert too_big.exit_code == 1
    data = _one_json_object(too_big.stdout)
    assert data["fits"] is False and data["does_not_fit"] == ["GPU memory"]
    nothing = _plan("--model", "405b", "--gpus", "8", "--tp", "1", "--pp", "1", "--json")
    assert nothing.exit_code == 1 and _one_json_object(nothing.stdout)["recommended"] is None
    for args, kind in ((["--model", "nope", "--gpus", "8"], "unknown_preset"),
                       (["--model", "7b", "--gpus", "8", "--tp", "3"], "layout"),
                       (["--model", "7b", "--gpus", "8", "--no-such-flag"], "usage"),
                       (["--model", "7b", "--gpus", "8", "--micro-batch", "-1"], "usage")):
        result = _plan(*args, "--json")
        assert result.exit_code == 2, args
        error = _one_json_object(result.stdout)["error"]
        assert error["kind"] == kind and error["message"] in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["compare", "/no/such/report.json", "--json"],
    ["run", "--model", "nope", "--json"],
    ["profile", "--model", "tiny-llama", "--simulate-world", "4", "--gpus", "8", "--json"],
    ["presets", "--json", "--nope"],
])
def test_every_command_answers_json_errors(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert _one_json_object(result.stdout)["error"]["message"]


def test_internal_error_is_one_json_object(monkeypatch):
    import planner.search

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(planner.search, "search", broken)
    result = _plan("--model", "7b", "--gpus", "8", "--json")
    assert result.exit_code == 1
    error = _one_json_object(result.stdout)["error"]
    assert error["kind"] == "internal" and "RuntimeError: boom" in error["message"]
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- fit verdicts name the limit (issue 9, item 4)


def test_verdict_names_host_memory_when_offloaded_state_does_not_fit():
    """405B ZeRO-3 with parameter offload on one 8-GPU node: the GPUs have room (42.7 GiB of
    80), the node's 2 TiB of host memory does not hold 8 ranks' offloaded state (6 TiB), and no
    micro-batch changes that."""
    args = ["--model", "405b", "--gpus", "8", "--strategy", "zero3", "--offload", "params", "--tp", "1", "--pp", "1",
            "--ac", "full"]
    data = _one_json_object(_plan(*args, "--json").stdout)
    limits = {limit["name"]: limit for limit in data["limits"]}
    assert limits["GPU memory"]["fits"] and not limits["host memory per node"]["fits"]
    assert data["does_not_fit"] == ["host memory per node"] and data["fits"] is False
    assert data["max_micro_batch"] == 0
    table = _plan(*args)
    assert table.exit_code == 1
    text = " ".join(table.stdout.split())
    assert "GPU memory: fits" in text and "host memory per node 6,047.69 GiB of 2,048.00 GiB: does not fit" in text
    assert table.stderr.startswith("error: does not fit: host memory per node needs")
    search = _plan("--model", "405b", "--gpus", "8", "--strategy", "zero3", "--offload", "params", "--tp", "1")
    assert "host OOM" in search.stdout


# ---------------------------------------------------------------- any GPU (issue 9, item 6)


def test_gpu_from_a_json_file(tmp_path):
    preset = json.loads((ROOT / "presets" / "gpus" / "a100-80gb.json").read_text())
    preset["spec"]["name"] = "My A100"
    path = tmp_path / "my_gpu.json"
    path.write_text(json.dumps(preset))
    mine = _one_json_object(_plan(*FIXED_7B, "--strategy", "zero3", "--gpu", str(path), "--json").stdout)
    shipped = _one_json_object(_plan(*FIXED_7B, "--strategy", "zero3", "--gpu", "a100-80gb", "--json").stdout)
    assert mine["gpu"] == "My A100" and mine["memory"] == shipped["memory"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(preset["spec"]))
    assert _plan(*FIXED_7B, "--strategy", "zero3", "--gpu", str(bare)).exit_code == 0


def test_malformed_gpu_file_names_the_field(tmp_path):
    preset = json.loads((ROOT / "presets" / "gpus" / "a100-80gb.json").read_text())
    preset["spec"]["memory_bytes"] = -1
    preset["spec"]["peak_tflops"]["bf16"] = "fast"
    path = tmp_path / "bad_gpu.json"
    path.write_text(json.dumps(preset))
    result = _plan(*FIXED_7B, "--strategy", "zero3", "--gpu", str(path))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "spec.memory_bytes: Input should be greater than 0" in lines[0]
    assert "spec.peak_tflops.bf16" in lines[0]
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "must hold a JSON object" in _plan(*FIXED_7B, "--gpu", str(tmp_path / "list.json")).stderr


def test_gpu_without_its_own_calibration_uses_its_chips():
    """An H200 (GH100, like the H100 SXM) has no calibration file: it takes the H100's measured
    one, with the H100's measured compute-time factor (the per-operation model then times the
    H200's own HBM), and the report says so."""
    from planner.calibration import calibration_for_gpu
    from planner.catalog import load_gpu

    h200 = _one_json_object(_plan(*FIXED_7B, "--strategy", "zero3", "--gpu", "h200", "--json").stdout)
    h100 = _one_json_object(_plan(*FIXED_7B, "--strategy", "zero3", "--gpu", "h100", "--json").stdout)
    assert h200["calibration"].startswith("h100-sxm-80gb (measured on NVIDIA H100 80GB HBM3, the same GH100 chip")
    scales = calibration_for_gpu(load_gpu("h200")).throughput.compute_time_scale_by_gpu
    assert scales["NVIDIA H200"] == scales["NVIDIA H100 80GB HBM3"]
    # the same GEMMs; the H200's faster HBM shortens the memory-bound ops
    assert h200["throughput"]["compute_efficiency"] > h100["throughput"]["compute_efficiency"]
    assert h200["overheads"] == h100["overheads"]
    a100 = _one_json_object(_plan(*FIXED_7B, "--strategy", "zero3", "--gpu", "a100", "--json").stdout)
    assert a100["calibration"] == "default"


def test_impl_is_planned_and_run_refuses_what_it_cannot_execute():
    # --impl changes what a layer saves: Megatron's fused SwiGLU keeps one ffn tensor fewer
    # than trainplan's reference block (planner/implementations.py)
    peaks = {}
    for impl in ("trainplan", "megatron", "torchtitan", "hf"):
        result = CliRunner().invoke(main, ["plan", "--model", "8b", "--gpus", "8", "--strategy", "zero3", "--tp", "1",
                                           "--pp", "1", "--ac", "none", "--seq-len", "8192", "--impl", impl, "--json"])
        assert result.exit_code in (0, 1), result.output
        data = json.loads(result.stdout)
        assert data["train"]["impl"] == impl
        peaks[impl] = data["memory"]["peak"]
    assert peaks["megatron"] < peaks["trainplan"] < peaks["torchtitan"]
    result = CliRunner().invoke(main, ["run", "--model", "tiny-llama", "--impl", "hf"])
    assert result.exit_code == 2 and "trainplan.track" in result.output
