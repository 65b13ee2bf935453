"""Issue 10: every careless or hostile input listed there gets one line naming what is wrong
(exit 2), never ``internal error``, a hang or an impossible number. One regression test per
input, with its expected message."""

from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner

from trainplan.cli import main

FIXED = ["plan", "--model", "tiny-llama", "--gpus", "1", "--strategy", "ddp", "--tp", "1", "--pp", "1"]


def _cli(*args, timeout: float = 30.0):
    start = time.perf_counter()
    result = CliRunner().invoke(main, list(args))
    assert time.perf_counter() - start < timeout, "took too long"
    return result


def _one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    return lines[0]


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--cuda-context-mib", "nan", "'nan' is not a finite number between 0 and 1,000,000"),
    ("--gpus", "0", "0 is not in the range 1<=x<=1048576"),
    ("--cuda-context-mib", "inf", "'inf' is not a finite number"),
    ("--cuda-context-mib", "1e308", "'1e308' is not a finite number"),
    ("--communicator-mib", "inf", "'inf' is not a finite number"),
    ("--fragmentation", "nan", "'nan' is not a finite number between 0 and 1"),
    ("--gpus", str(10**9), "1000000000 is not in the range 1<=x<=1048576"),
    ("--nodes", str(2**31), "2147483648 is not in the range 1<=x<=1048576"),
    ("--gpus-per-node", str(2**31), "2147483648 is not in the range 1<=x<=1024"),
])
def test_out_of_range_flags(flag, value, message):
    args = ["plan", "--model", "tiny-llama", "--strategy", "ddp", "--tp", "1", "--pp", "1"]
    assert message in _one_line(_cli(*args, flag, value))


def test_model_name_too_long_for_a_file():
    line = _one_line(_cli("plan", "--model", "x" * 300))
    assert line.startswith("error: unknown model 'xxxx") and len(line) < 200


def test_model_name_with_a_newline_stays_one_line():
    assert "unknown model 'llama\\n7b'" in _one_line(_cli("plan", "--model", "llama\n7b"))


def test_no_command_is_one_line():
    assert "no command given: choose one of plan" in _one_line(_cli())


def test_a_search_too_wide_is_refused_with_what_to_fix(tmp_path):
    """9,000 layers over 720,720 GPUs (240 divisors, 150 of them pipeline sizes): more than
    10,000 layouts -- refused at once with what to fix, instead of minutes of search."""
    path = _write(tmp_path, "config.json", {**LLAMA, "num_hidden_layers": 9000})
    line = _one_line(_cli("plan", "--model", path, "--gpus", "720720", timeout=20))
    assert "more than 10,000 layouts to search; fix some of --tp, --pp" in line


# ---------------------------------------------------------------- calibration files


@pytest.mark.parametrize(("content", "message"), [
    ('{"overheads": {"cuda_context_bytes": Infinity}}', "Infinity is not a JSON number"),
    ({"overheads": {"cuda_context_bytes": -1}},
     "overheads.cuda_context_bytes: Input should be greater than or equal to 0"),
    ({"overheads": {"fragmentation": -0.5}}, "overheads.fragmentation: Input should be greater than or equal to 0"),
    ({"throughput": {"compute_efficiency": {"bf16": 0}}}, "Input should be greater than 0"),
    ({"throughput": None}, "throughput must be a JSON object"),
    ({"throughput": {"inter_node_latency_s": 1e300}}, "inter_node_latency_s: Input should be less than or equal to 1"),
    ({"throughput": {"intra_node_latency_s": -1}}, "intra_node_latency_s: Input should be greater than or equal to 0"),
    ({"overheads": None}, "overheads must be a JSON object"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_calibration_files(tmp_path, content, message):
    path = _write(tmp_path, "cal.json", content)
    assert message in _one_line(_cli(*FIXED, "--calibration", path))


def test_empty_compute_efficiency_keeps_the_defaults(tmp_path):
    """``{"compute_efficiency": {}}`` used to raise KeyError 'bf16'; an empty map changes nothing."""
    path = _write(tmp_path, "cal.json", {"throughput": {"compute_efficiency": {}}})
    assert _cli(*FIXED, "--calibration", path).exit_code == 0


# ---------------------------------------------------------------- Hugging Face config.json

LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
         "num_hidden_layers": 2, "vocab_size": 1000}


@pytest.mark.parametrize(("change", "message"), [
    ({"num_attention_heads": "8"}, "num_attention_heads must be an integer, not '\"8\"'"),
    ({"num_attention_heads": None}, "lacks 'num_attention_heads'"),
    ({"num_attention_heads": [8]}, "num_attention_heads must be an integer"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer"),
    ({"attention_dropout": "high"}, "attention_dropout must be a number"),
    ({"hidden_size": 10**400}, "hidden_size: Input should be less than or equal to 1048576"),
    ({"num_hidden_layers": 10**6}, "num_layers: Input should be less than or equal to 10000"),
    ({"vocab_size": -5}, "vocab_size: Input should be greater than 0"),
])
def test_bad_hf_configs(tmp_path, change, message):
    path = _write(tmp_path, "config.json", {**LLAMA, **change})
    assert message in _one_line(_cli("plan", "--model", path))


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "Exceeds the limit"),
    ('{"hidden_size": 1e400}', "beyond a double's range"),
    ('{"hidden_size": NaN}', "NaN is not a JSON number"),
])
def test_hostile_json(tmp_path, text, message):
    path = _write(tmp_path, "config.json", text)
    assert message in _one_line(_cli("plan", "--model", path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_and_huge_files_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "is not a regular file" in _one_line(_cli("plan", "--model", str(fifo)))
    assert "is not a regular file" in _one_line(_cli(*FIXED, "--calibration", "/dev/zero"))
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(1 << 30)  # a sparse 1 GiB file
    assert "trainplan reads at most 16 MiB" in _one_line(_cli("plan", "--model", str(big)))


# ---------------------------------------------------------------- reports (trainplan compare)


def _sample_report() -> dict:
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent.parent / "validation/samples/profile_tiny_zero2.json")
                      .read_text())


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.__setitem__("measured", None), "a report with status ok needs its measured side"),
    (lambda r: r["train"].pop("pp"), "train lacks pp"),
    (lambda r: r["train"].__setitem__("zero_stage", 7), "zero_stage"),
    (lambda r: r["measured"].__setitem__("ranks", []), "ranks"),
    (lambda r: r["rows"][0].__setitem__("predicted", float("nan")), "NaN is not a JSON number"),
    (lambda r: r["measured"]["ranks"][0].__setitem__("rank", 99), "a rank beyond the layout"),
])
def test_reports_that_parse_but_are_wrong(tmp_path, edit, message):
    report = _sample_report()
    edit(report)
    path = _write(tmp_path, "report.json", json.dumps(report))
    assert message in _one_line(_cli("compare", path))


def test_compare_on_a_non_utf8_file(tmp_path):
    path = _write(tmp_path, "report.json", b"\xff\xfe\x00garbage")
    assert "is not UTF-8 text" in _one_line(_cli("compare", path))


# ---------------------------------------------------------------- sane numbers


def test_mfu_never_passes_100_percent():
    """tiny-llama at seq 4096 in fp32 is all attention: it reported 109% MFU."""
    data = json.loads(_cli(*FIXED, "--precision", "fp32", "--seq-len", "4096", "--json").stdout)
    assert 0 < data["throughput"]["mfu"] <= data["throughput"]["compute_efficiency"]


def test_piped_tables_never_cut_numbers():
    result = _cli("plan", "--model", "70b", "--gpus", "1024", "--top", "30")
    assert result.exit_code == 0 and "…" not in result.stdout


# ---------------------------------------------------------------- outputs and token files


def test_out_is_checked_before_the_run(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    args = ["profile", "--model", "tiny-llama", "--seq-len", "16", "--out"]
    assert "it is a symlink, not a regular file" in _one_line(_cli(*args, str(link)))
    assert "does not exist" in _one_line(_cli(*args, str(tmp_path / "missing" / "r.json")))
    assert "is a directory" in _one_line(_cli(*args, str(tmp_path)))


def test_dead_writers_temporaries_are_removed(tmp_path):
    from strategies.files import write_atomic

    stale = tmp_path / ".out.json.999999999.tmp"  # no such process
    stale.write_text("half")
    write_atomic(tmp_path / "out.json", "{}")
    assert not stale.exists() and (tmp_path / "out.json").read_text() == "{}"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("ids.bin", bytes([1, 0, 2, 0]) * 40 + bytes([0x58, 0x02]), "holds token id 600, outside the model's vocabulary"),
    ("empty.bin", b"", "is empty"),
    ("odd.bin", b"abc", "has 3 bytes, not a whole number of uint16 tokens"),
    ("tokens.txt", b"1 2 3", "unsupported extension '.txt'"),
    ("short.bin", bytes([1, 0]) * 4, "fewer than one window"),
])
def test_token_files_refused_before_the_ranks_start(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    start = time.perf_counter()
    line = _one_line(_cli("run", "--model", "tiny-llama", "--seq-len", "16", "--steps", "1", "--data", path))
    assert message in line and time.perf_counter() - start < 10


def test_an_infinite_step_time_is_an_error_not_null():
    """Validated inputs keep the step time finite; should arithmetic still overflow (an
    efficiency too small to be real, here forced past validation), the answer is one clear
    error, never a JSON null."""
    from planner.calibration import default_calibration
    from planner.catalog import load_gpu, load_model
    from planner.configs import TrainConfig
    from planner.errors import ConfigError
    from planner.step_time import estimate_step

    cal = default_calibration()
    # the one efficiency (GPUs without a GEMM model) and the per-operation model's GEMM rate
    tiny = cal.throughput.model_construct(**{**dict(cal.throughput), "compute_efficiency": {
        dtype: 1e-320 for dtype in ("fp32", "tf32", "bf16", "fp16")}, "compute_efficiency_by_gpu": {},
        "gemm_sustained": 1e-320})
    with pytest.raises(ConfigError, match="not a finite positive number"):
        estimate_step(load_model("7b"), load_gpu("h100"), TrainConfig(gpus=1),
                      cal.model_copy(update={"throughput": tiny}))
