"""The command-line surface: tables render, JSON round-trips, user mistakes are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from planner.estimate import Estimate
from planner.search import PlanResult
from trainplan.cli import main, plan_command


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
        (["--model", "7b", "--gpus", "8", "--tp", "3"], "does not divide 8 GPUs"),
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
    assert result.exit_code != 0
    assert message in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output


def test_malformed_config_json_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,')
    result = _plan("--model", str(bad), "--gpus", "1")
    assert result.exit_code == 1
    assert "is not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_real_subprocess_error_and_success(tmp_path):
    """Once through a real process: the console script's module, exit codes, stderr."""
    bad = subprocess.run([sys.executable, "-m", "trainplan.cli", "plan", "--model", "nope", "--gpus", "8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
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
