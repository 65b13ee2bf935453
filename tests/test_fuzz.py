"""Generated careless and hostile input (issue 10): flag mixes for ``plan``, crafted
``config.json``, calibration, GPU and report files. Every answer must be a verdict: exit 0, 1
or 2; never ``internal error`` or a traceback; a failure is one line on stderr; with
``--json`` stdout is exactly one JSON object; and every JSON result is sane -- no negative
bytes, no NaN or infinity, MFU at most the compute efficiency, a peak at least each of its
components, a fit verdict consistent with its limits and with the exit status.

CI runs ``TRAINPLAN_FUZZ_EXAMPLES`` examples per test (default 60, derandomised, a few minutes
in all); ``TRAINPLAN_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py`` is the long run
recorded in the README (five tests, 10,000 inputs).
"""

from __future__ import annotations

import json
import math
import os

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import gpu_ids, model_ids
from trainplan.cli import main

EXAMPLES = int(os.environ.get("TRAINPLAN_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
                    suppress_health_check=list(HealthCheck))
COMPONENTS = ("params", "grads", "optimizer", "activations", "temporaries", "overhead")

# ---------------------------------------------------------------- invariants


def _numbers(value, path="$"):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def _check_estimate(est: dict) -> None:
    for stage in [est["memory"], *est["stages"]]:
        parts = [stage[k] for k in COMPONENTS]
        assert all(p >= 0 for p in parts), stage
        assert stage["peak"] >= max(parts)
    th = est["throughput"]
    assert 0 < th["mfu"] <= th["compute_efficiency"] + 1e-9 and th["hfu"] >= th["mfu"] - 1e-12
    assert th["step_time_s"] > 0 and th["tokens_per_s"] > 0
    assert all(v >= 0 for k, v in th["breakdown"].items())
    assert est["fits"] == all(limit["fits"] for limit in est["limits"])
    assert est["does_not_fit"] == [limit["name"] for limit in est["limits"] if not limit["fits"]]
    assert est["headroom_bytes"] == est["gpu_memory_bytes"] - est["memory"]["peak"]
    # memory grows with the micro-batch: a layout that fits fits at its own micro-batch or more
    if est["fits"]:
        assert est["max_micro_batch"] >= min(est["train"]["micro_batch"], 4096)


def _check_answer(result, json_mode: bool) -> dict | None:
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output[-500:])
    assert "internal error" not in result.output and "Traceback" not in result.output, result.output[-800:]
    if result.exit_code != 0:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-800:]
    if not json_mode:
        return None
    data = json.loads(result.stdout)  # exactly one JSON document
    assert isinstance(data, dict)
    for path, number in _numbers(data):
        assert math.isfinite(number), path
    if "error" in data:
        assert result.exit_code != 0 and set(data["error"]) == {"message", "kind"}
        return None
    return data


def _check_plan(result, json_mode: bool) -> None:
    data = _check_answer(result, json_mode)
    if data is None:
        return
    if "candidates" in data:  # a search
        for est in data["candidates"]:
            _check_estimate(est)
        assert (result.exit_code == 0) == (data["recommended"] is not None)
    else:
        _check_estimate(data)
        assert (result.exit_code == 0) == data["fits"]


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args)


# ---------------------------------------------------------------- flag mixes

MODELS = ["tiny-llama", "tiny-gpt2", "7b", "8b", "13b", "70b", "mistral-7b", "cpm-2", "bloom-176b", "no-such-model",
          "", "x" * 300, "llama\n7b"]
GPUS = gpu_ids() + ["h1000", ""]
NUMBERS = st.one_of(st.integers(-3, 70), st.sampled_from([0, 1, 2, 3, 8, 64, 96, 1000, 4096, 2**31, 10**9, -1]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from(["nan", "inf", "-inf", "1e308", "-1", "0", "abc", "0.5"]))


@st.composite
def plan_flags(draw) -> list[str]:
    args = ["plan", "--model", draw(st.sampled_from(MODELS))]
    optional = {
        "--gpus": NUMBERS, "--nodes": NUMBERS, "--gpus-per-node": NUMBERS, "--tp": NUMBERS, "--pp": NUMBERS,
        "--micro-batch": NUMBERS, "--global-batch": NUMBERS, "--chunks": NUMBERS,
        "--seq-len": st.one_of(NUMBERS, st.sampled_from([128, 2048, 32768, 2**24, 2**25])),
        "--gpu": st.sampled_from(GPUS),
        "--strategy": st.sampled_from(["ddp", "zero1", "zero2", "zero3", "zero9"]),
        "--offload": st.sampled_from(["none", "optimizer", "params", "disk"]),
        "--ac": st.sampled_from(["none", "selective", "full", "most"]),
        "--attention": st.sampled_from(["flash", "eager"]),
        "--precision": st.sampled_from(["fp32", "bf16-mixed", "fp16-mixed", "bf16-mixed-fp32-grads", "amp-bf16",
                                        "bf16", "fp8"]),
        "--schedule": st.sampled_from(["gpipe", "1f1b", "interleaved"]),
        "--engine": st.sampled_from(["pytorch", "megatron", "deepspeed"]),
        "--optimizer-impl": st.sampled_from(["fused", "foreach", "for-loop"]),
        "--cuda-context-mib": FLOATS, "--communicator-mib": FLOATS, "--fragmentation": FLOATS,
        "--top": st.sampled_from([0, 1, 3]), "--sort": st.sampled_from(["throughput", "memory", "mfu", "speed"]),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(optional)), max_size=8, unique=True)):
        args += [flag, str(draw(optional[flag]))]
    # a search over many GPUs is bounded but slow; keep most examples quick
    if any(a.isdigit() and int(a) > 4096 for a in args) and "--tp" not in args:
        args += ["--tp", "1", "--pp", "1", "--strategy", "zero3"]
    return args


@st.composite
def valid_plan_flags(draw) -> list[str]:
    """Only values each flag accepts, in random combinations: most of these plan, so the
    numbers themselves are checked (the mix above is mostly refused at the door)."""
    gpus = draw(st.sampled_from([1, 2, 4, 6, 8, 12, 16, 64, 96, 256, 1024]))
    args = ["plan", "--model", draw(st.sampled_from(model_ids())), "--gpus", str(gpus),
            "--gpu", draw(st.sampled_from(gpu_ids()))]
    optional = {
        "--tp": st.sampled_from([1, 2, 4, 8]), "--pp": st.sampled_from([1, 2, 4, 8]),
        "--micro-batch": st.sampled_from([1, 2, 4, 16]), "--global-batch": st.sampled_from([gpus, 4 * gpus, 1536]),
        "--seq-len": st.sampled_from([128, 1024, 4096, 32768]),
        "--strategy": st.sampled_from(["ddp", "zero1", "zero2", "zero3"]),
        "--offload": st.sampled_from(["none", "optimizer", "params"]), "--ac": st.sampled_from(["none", "selective",
                                                                                               "full"]),
        "--attention": st.sampled_from(["flash", "eager"]),
        "--precision": st.sampled_from(["fp32", "bf16-mixed", "fp16-mixed", "bf16-mixed-fp32-grads", "amp-bf16",
                                        "bf16"]),
        "--engine": st.sampled_from(["pytorch", "megatron", "deepspeed"]),
        "--optimizer-impl": st.sampled_from(["fused", "foreach", "for-loop"]),
        "--cuda-context-mib": st.floats(0, 4096), "--fragmentation": st.floats(0, 1),
        "--schedule": st.sampled_from(["gpipe", "1f1b", "interleaved"]),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(optional)), max_size=7, unique=True)):
        args += [flag, str(draw(optional[flag]))]
    return args


@SETTINGS
@given(st.one_of(plan_flags(), valid_plan_flags()), st.booleans())
def test_plan_flag_mixes(args, json_mode):
    _check_plan(_invoke(args + (["--json"] if json_mode else [])), json_mode)


# ---------------------------------------------------------------- crafted files

JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
              st.sampled_from([0, -1, 1, 2**31, 10**400])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def _mutate(draw, base: dict, keys: list[str]) -> dict:
    data = json.loads(json.dumps(base))
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        parts = key.split(".")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {}) if isinstance(target, dict) else {}
        if isinstance(target, dict):
            if draw(st.booleans()):
                target[parts[-1]] = draw(JUNK)
            else:
                target.pop(parts[-1], None)
    return data


HF_BASE = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
           "num_hidden_layers": 2, "num_key_value_heads": 4, "vocab_size": 1000, "hidden_act": "silu",
           "max_position_embeddings": 2048, "tie_word_embeddings": False, "attention_dropout": 0.0}


@st.composite
def hf_configs(draw) -> dict:
    base = dict(HF_BASE)
    base["model_type"] = draw(st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "", "???"]))
    if base["model_type"] == "gpt2":
        base |= {"n_embd": 256, "n_layer": 2, "n_head": 8, "n_positions": 1024}
    return _mutate(draw, base, sorted(base) + ["n_inner", "head_dim", "mlp_bias", "attention_bias"])


def _file(tmp_path_factory, name: str, data) -> str:
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@SETTINGS
@given(hf_configs(), st.booleans(), st.sampled_from([[], ["--gpus", "8"], ["--strategy", "zero3", "--tp", "1",
                                                                            "--pp", "1"]]))
def test_hf_config_files(tmp_path_factory, config, json_mode, extra):
    path = _file(tmp_path_factory, "config.json", config)
    args = ["plan", "--model", path, *extra] + (["--json"] if json_mode else [])
    _check_plan(_invoke(args), json_mode)


def _calibration_base() -> dict:
    from planner.calibration import default_calibration

    return json.loads(default_calibration().model_dump_json())


@st.composite
def calibrations(draw) -> dict:
    base = _calibration_base()
    keys = ["overheads." + k for k in base["overheads"]] + ["throughput." + k for k in base["throughput"]]
    keys += ["throughput.compute_efficiency.bf16", "overheads", "throughput", "calibrated_constants", "id"]
    return _mutate(draw, base, keys)


@SETTINGS
@given(calibrations(), st.booleans())
def test_calibration_files(tmp_path_factory, calibration, json_mode):
    path = _file(tmp_path_factory, "cal.json", calibration)
    args = ["plan", "--model", "7b", "--gpus", "8", "--strategy", "zero3", "--tp", "1", "--pp", "1", "--calibration",
            path] + (["--json"] if json_mode else [])
    _check_plan(_invoke(args), json_mode)


@st.composite
def gpu_files(draw) -> dict:
    from planner.catalog import gpu_preset

    base = dict(gpu_preset(draw(st.sampled_from(gpu_ids()))).raw)
    keys = ["spec." + k for k in base["spec"]] + ["spec.peak_tflops.bf16", "spec.peak_tflops.fp32", "spec"]
    return _mutate(draw, base, keys)


@SETTINGS
@given(gpu_files(), st.booleans())
def test_gpu_files(tmp_path_factory, gpu, json_mode):
    path = _file(tmp_path_factory, "gpu.json", gpu)
    args = ["plan", "--model", "7b", "--gpus", "8", "--gpu", path, "--strategy", "zero3", "--tp", "1", "--pp", "1"]
    _check_plan(_invoke(args + (["--json"] if json_mode else [])), json_mode)


def _report_base() -> dict:
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent.parent / "validation/samples/profile_tiny_zero2.json")
                      .read_text())


@st.composite
def reports(draw) -> dict:
    base = _report_base()
    keys = ["train." + k for k in base["train"]] + ["measured", "predicted", "rows", "status", "model", "num_params",
                                                    "simulated_world", "measured.ranks", "predicted.ranks",
                                                    "measured.memory", "environment", "train"]
    return _mutate(draw, base, keys)


@SETTINGS
@given(reports(), st.booleans())
def test_report_files(tmp_path_factory, report, json_mode):
    path = _file(tmp_path_factory, "report.json", report)
    _check_answer(_invoke(["compare", path] + (["--json"] if json_mode else [])), json_mode)


def test_model_ids_are_all_plannable():
    """Every shipped preset answers (a fixed layout on one node)."""
    for model in model_ids():
        _check_plan(_invoke(["plan", "--model", model, "--gpus", "8", "--strategy", "zero3", "--tp", "1", "--pp",
                             "1", "--json"]), True)
