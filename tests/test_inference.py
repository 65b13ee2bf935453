"""Inference: quantised weights, KV cache, the forward pass's activations, BMInf's layer offload --
planned (planner/inference.py), run (strategies/inference.py) and measured (profiler/inference.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from planner.calibration import Overheads, calibration_for_gpu, default_calibration
from planner.catalog import load_gpu, load_model
from planner.errors import LayoutError
from planner.inference import (
    InferenceConfig,
    estimate_inference,
    int4_bytes,
    kv_cache_bytes,
    offload_pass_time,
    stored_bytes,
    swapped_layers,
)
from planner.params import ParamTensor
from profiler.inference import profile_inference
from strategies.inference import KVCache, build_inference_model, generate, place
from strategies.kernels.int4 import GROUP, dequantize_int4, quantize_int4
from strategies.kernels.nf4 import nf4_bytes, quantize_nf4
from trainplan.cli import main, plan_command

TINY = load_model("tiny-llama")
CPU = torch.device("cpu")


def _plan(*args):
    return CliRunner().invoke(plan_command, list(args))


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize("shape", [(256, 128), (96, 200), (17, 129), (4096, 14336)])
def test_int4_bytes_equal_the_kernel_storage(shape):
    """planner.inference.int4_bytes is what strategies/kernels/int4.py stores (codes two per byte,
    bf16 scale and zero per group of 128: torchao's Int4WeightOnlyConfig layout)."""
    weight = torch.randn(shape, device="meta" if shape[0] > 1024 else "cpu")
    if weight.is_meta:  # the formula alone at full size: 4.25 bits per weight
        assert int4_bytes(shape) * 8 / (shape[0] * shape[1]) == pytest.approx(4.25)
        return
    assert quantize_int4(weight).nbytes == int4_bytes(shape)
    assert stored_bytes(ParamTensor("attn.q.weight", shape, 0), InferenceConfig(weights="int4"), 2) == int4_bytes(shape)
    assert stored_bytes(ParamTensor("attn.q.weight", shape, 0), InferenceConfig(weights="nf4"), 2) == \
        quantize_nf4(weight).nbytes == nf4_bytes(shape[0] * shape[1])


def test_int4_error_bound():
    """Round-to-nearest within each group: at most half a step of the (bf16) scale, plus the bf16
    rounding of the zero point and scale the weight is rebuilt from."""
    torch.manual_seed(0)
    weight = torch.randn(64, 3 * GROUP + 5)
    q = quantize_int4(weight)
    rebuilt = dequantize_int4(q, torch.float32)
    scale = q.scales.float().repeat_interleave(GROUP, dim=1)[:, :weight.shape[1]]
    zero = q.zeros.float().repeat_interleave(GROUP, dim=1)[:, :weight.shape[1]]
    bf16_eps = 2 ** -8
    bound = scale / 2 + bf16_eps * (zero.abs() + 15 * scale) + 1e-6
    assert ((rebuilt - weight).abs() <= bound).all()


def test_kv_cache_bytes_match_vllm_paper():
    """Kwon et al. 2023 (vLLM), sec. 3: 'for the 13B OPT model, the KV cache of a single token
    demands 800 KB of space, calculated as 2 (key and value vectors) x 5120 (hidden state size) x
    40 (number of layers) x 2 (bytes per FP16)'. Llama-2-13B has the same 40 x 5120 shape."""
    model = load_model("llama-2-13b")
    cfg = InferenceConfig(weights="fp16", prompt_len=1, new_tokens=1)
    per_layer_per_token = kv_cache_bytes(model, cfg, 2) // cfg.cache_len
    assert per_layer_per_token * model.num_layers == 2 * 5120 * 40 * 2 == 819_200
    # GQA: Llama-3-8B keeps 8 of 32 heads' k and v -- 128 KiB per token (Meta's 4x saving)
    model = load_model("llama-3-8b")
    assert kv_cache_bytes(model, cfg, 2) // cfg.cache_len * model.num_layers == 2 * 8 * 128 * 32 * 2 == 131_072
    # int8 KV: one byte per value plus a 16-bit scale per token and head
    assert kv_cache_bytes(model, cfg.model_copy(update={"kv_cache": "int8"}), 2) // cfg.cache_len == 2 * 8 * (128 + 2)


def test_seed_example_cpm2_on_a_gtx_1060():
    """The seed notes (BMInf): CPM-2 (11B) in fp16 is ~22 GB; INT8 halves it to ~11 GB, still too big
    for a 6 GB GTX 1060; keeping some layers resident and swapping the rest through 2 slots makes it
    fit, and the host link then dominates decoding."""
    model, gpu = load_model("cpm-2"), load_gpu("gtx-1060-6gb")
    cal = calibration_for_gpu(gpu)
    fp16 = estimate_inference(model, gpu, InferenceConfig(weights="fp16"), cal)
    int8 = estimate_inference(model, gpu, InferenceConfig(weights="int8"), cal)
    assert fp16.memory.weights / 1e9 == pytest.approx(22, rel=0.03)  # decimal GB, as the notes write it
    # the projections halve; the embedding and head stay in the compute dtype (fp16 here; the
    # default on this card is fp32, whose fp16 math runs at 1/64 rate, and keeps them in fp32)
    halved = estimate_inference(model, gpu, InferenceConfig(weights="int8", dtype="fp16"), cal)
    assert halved.memory.weights / fp16.memory.weights == pytest.approx(0.5, abs=0.02)
    assert int8.compute_dtype == "fp32"
    assert int8.memory.weights / 1e9 == pytest.approx(11.5, rel=0.05)
    assert not int8.fits and int8.memory.weights > gpu.memory_bytes
    offload = estimate_inference(model, gpu, InferenceConfig(weights="int8", offload="layers"), cal)
    assert offload.fits and offload.memory.peak <= gpu.memory_bytes
    o = offload.offload
    assert o.resident_layers + o.swapped_layers == model.total_layers and o.slots == 2
    assert o.swapped_layers > 24  # every encoder layer and some decoder layers
    assert offload.time.decode_bound == "host link"
    assert o.exposed_load_s_per_token > offload.time.decode_memory_s
    # the fewest that fit: one layer fewer swapped does not fit
    fewer = estimate_inference(model, gpu, InferenceConfig(weights="int8", offload="layers",
                                                           swapped_layers=o.swapped_layers - 1), cal)
    assert not fewer.fits


def test_seed_example_cli():
    args = ["--mode", "inference", "--model", "cpm-2", "--gpu", "gtx-1060-6gb", "--weights", "int8"]
    result = _plan(*args)
    assert result.exit_code == 1 and "does not fit" in result.stderr and "--offload layers" in result.stderr
    result = _plan(*args, "--offload", "layers")
    assert result.exit_code == 0, result.output
    for text in ("layers resident", "swapped", "through 2 slots", "tokens/s", "host link", "16-bit"):
        assert text in result.stdout
    data = json.loads(_plan(*args, "--offload", "layers", "--json").stdout)
    assert data["fits"] and data["offload"]["swapped_layers"] > 24 and data["time"]["decode_tokens_per_s"] > 0


def test_mode_flags_are_checked():
    result = _plan("--model", "7b", "--weights", "int8")
    assert result.exit_code == 2 and "--mode inference" in result.stderr
    result = _plan("--mode", "inference", "--model", "7b", "--strategy", "zero3")
    assert result.exit_code == 2 and "training" in result.stderr
    result = _plan("--mode", "inference", "--model", "7b", "--offload", "optimizer")
    assert result.exit_code == 2
    result = _plan("--model", "7b", "--offload", "layers")
    assert result.exit_code == 2 and "--mode inference" in result.stderr
    result = _plan("--mode", "inference", "--model", "7b", "--gpus", "2", "--offload", "layers")
    assert result.exit_code == 2 and "one GPU" in result.stderr


def test_search_recommends_a_layout_and_reports_capacity():
    result = _plan("--mode", "inference", "--model", "70b", "--gpus", "8", "--gpu", "a100-80gb", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    layouts = {(c["tp"], c["pp"]) for c in plan["candidates"]}
    assert (8, 1) in layouts and (1, 8) in layouts
    best = plan["recommended"]
    assert best["fits"]
    fitting = [c for c in plan["candidates"] if c["fits"]]
    assert best["time"]["decode_tokens_per_s"] == pytest.approx(max(c["decode_tokens_per_s"] for c in fitting))
    for c in fitting:  # one more sequence, or a longer context, no longer fits
        assert c["max_batch"] >= 1 and c["max_context"] >= 640


def test_max_batch_is_the_edge_of_fitting():
    from planner.inference import max_batch

    model, gpu, cal = load_model("8b"), load_gpu("rtx-4090"), default_calibration()
    cfg = InferenceConfig(weights="int4", prompt_len=4096, new_tokens=256)
    best = max_batch(model, gpu, cfg, cal)
    assert estimate_inference(model, gpu, cfg.model_copy(update={"batch": best}), cal).fits
    assert not estimate_inference(model, gpu, cfg.model_copy(update={"batch": best + 1}), cal).fits


def test_decode_is_bandwidth_bound_and_quantisation_speeds_it():
    """Batch-1 decoding reads every weight once per token: tokens/s ~ HBM bandwidth / weight bytes
    (Llama-2-7B fp16 on an A100-80GB: 2,039 GB/s x 0.7 / 13.5 GB ~ 106 tokens/s)."""
    model, gpu, cal = load_model("7b"), load_gpu("a100-80gb"), default_calibration()
    fp16 = estimate_inference(model, gpu, InferenceConfig(weights="fp16"), cal)
    assert fp16.time.decode_bound == "memory"
    expected = gpu.hbm_bandwidth_gb_s * 1e9 * cal.throughput.decode_hbm_efficiency / fp16.memory.weights
    assert fp16.time.decode_tokens_per_s == pytest.approx(expected, rel=0.05)
    int4 = estimate_inference(model, gpu, InferenceConfig(weights="int4"), cal)
    assert 2.5 < int4.time.decode_tokens_per_s / fp16.time.decode_tokens_per_s < 4
    # a large batch of short sequences reuses each weight 256 times: compute-bound
    big = estimate_inference(model, gpu, InferenceConfig(weights="fp16", batch=256, prompt_len=32, new_tokens=16), cal)
    assert big.time.decode_bound == "compute"
    # ... while at 640 positions the batch's KV cache (84 GB read per step) makes it memory-bound again
    long = estimate_inference(model, gpu, InferenceConfig(weights="fp16", batch=256), cal)
    assert long.time.decode_bound == "memory" and long.memory.kv_cache > 80e9


def test_offload_scheduler_model():
    """offload_pass_time: free loads cost nothing; loads longer than the compute they hide behind
    are exposed; spreading the swapped layers hides more than bunching them (the seed notes)."""
    layers = [1.0] * 12
    spread = [i in swapped_layers(12, 4) for i in range(12)]
    bunched = [i < 4 for i in range(12)]
    assert offload_pass_time(layers, spread, [0.0] * 12, 2) == pytest.approx(12.0)
    assert offload_pass_time(layers, spread, [2.5] * 12, 2) == pytest.approx(12.0)  # 2.5 s hides behind 3 layers
    assert offload_pass_time(layers, bunched, [2.5] * 12, 2) > 12.5
    # the link bounds it: 4 loads of 10 s per pass
    assert offload_pass_time(layers, spread, [10.0] * 12, 2) == pytest.approx(40.0)
    assert swapped_layers(12, 4) == [1, 4, 7, 10]
    assert swapped_layers(48, 30, encoder_layers=24)[:24] == list(range(24))


# ---------------------------------------------------------------- executor


def _generate(cfg: InferenceConfig, seed: int = 0):
    net = build_inference_model(TINY, cfg, CPU, seed)
    if cfg.offload == "layers" and not cfg.swapped_layers:
        raise AssertionError("give swapped_layers")
    offload = place(net, cfg, TINY, CPU)
    prompt = torch.randint(0, TINY.vocab_size, (cfg.batch, cfg.prompt_len), generator=torch.Generator().manual_seed(1))
    return generate(net, prompt, cfg, KVCache.allocate(TINY, cfg, CPU), offload), offload


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_offload_generation_is_token_identical(weights):
    base = dict(batch=2, prompt_len=24, new_tokens=12, weights=weights, dtype="fp32", kernels="dequant")
    resident, _ = _generate(InferenceConfig(**base))
    swapped, offload = _generate(InferenceConfig(**base, offload="layers", swapped_layers=3, slots=2))
    assert torch.equal(resident.tokens, swapped.tokens)
    assert torch.equal(resident.first_logits, swapped.first_logits)
    forwards = 1 + base["new_tokens"] - 1
    assert offload.loads == 2 + 3 * forwards  # two prefetched at set-up, then one per swapped layer per forward


def test_quantised_logits_stay_near_bf16():
    """Documented logit error (README, validation/inference.json): relative RMS of the prompt's last
    logits against bf16 weights, on the reference model's Gaussian initial weights (std 0.02),
    tiny-llama: int8 1.1%, w8a8 1.4%, int4 13%, nf4 12%."""
    bounds = {"int8": 0.03, "w8a8": 0.03, "int4": 0.25, "nf4": 0.25}
    base = dict(batch=2, prompt_len=32, new_tokens=2, kernels="dequant")
    reference, _ = _generate(InferenceConfig(**base, weights="bf16"))
    ref = reference.first_logits
    for weights, bound in bounds.items():
        out, _ = _generate(InferenceConfig(**base, weights=weights, dtype="bf16"))
        error = ((out.first_logits - ref).norm() / ref.norm()).item()
        assert error < bound, (weights, error)


CASES = [
    dict(weights="fp32"),
    dict(weights="bf16"),
    dict(weights="int8", dtype="bf16"),
    dict(weights="int4", dtype="fp32"),
    dict(weights="nf4", dtype="bf16"),
    dict(weights="w8a8", dtype="fp32"),
    dict(weights="bf16", kv_cache="int8"),
    dict(weights="fp32", prefill_chunk=16),
    dict(weights="int8", dtype="fp32", offload="layers", swapped_layers=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_measured_memory_matches_the_plan(case):
    """Weights, KV cache and swap buffers exactly; activations (prefill and decode peaks) within 5%."""
    cfg = InferenceConfig(batch=2, prompt_len=48, new_tokens=8, kernels="dequant", **case)
    report = profile_inference(TINY, load_gpu("h100-sxm-80gb"), cfg, default_calibration(), CPU)
    p, m = report.predicted, report.measured
    assert (p.weights, p.kv_cache, p.swap_buffers, p.host_bytes) == (m.weights, m.kv_cache, m.swap_buffers,
                                                                      m.host_bytes)
    for key in ("prefill_activations", "decode_activations", "activations"):
        assert abs(report.error[key]) <= 0.05, (key, report.error[key])
    assert report.tokens and len(report.tokens[0]) == cfg.new_tokens


def test_run_and_profile_commands():
    args = ["--mode", "inference", "--model", "tiny-llama", "--weights", "int8", "--dtype", "fp32", "--batch", "2",
            "--prompt-len", "16", "--new-tokens", "4"]
    result = CliRunner().invoke(main, ["run", *args, "--kernels", "dequant"])
    assert result.exit_code == 0, result.output
    assert "decode_tokens_per_s" in result.stdout and "generated" in result.stdout
    result = CliRunner().invoke(main, ["profile", *args, "--offload", "layers", "--swapped-layers", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["predicted"]["weights"] == data["measured"]["weights"]
    assert data["config"]["kernels"] == "dequant" and data["config"]["swapped_layers"] == 3
    result = CliRunner().invoke(main, ["run", *args, "--kernels", "fused"])
    assert result.exit_code == 2 and "dequant" in result.stderr
    result = CliRunner().invoke(main, ["run", "--mode", "inference", "--model", "cpm-2"])
    assert result.exit_code == 2 and "encoder-decoder" in result.stderr


def test_layer_offload_needs_more_layers_than_slots():
    with pytest.raises(LayoutError):
        estimate_inference(TINY, load_gpu("h100-sxm-80gb"), InferenceConfig(offload="layers", swapped_layers=2),
                           default_calibration(), Overheads.none())


@pytest.mark.gpu
def test_offload_on_a_gpu_prefetches_on_a_side_stream():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the side stream and pinned host copies exist only on a GPU")
    cfg = InferenceConfig(batch=2, prompt_len=24, new_tokens=12, weights="int8", dtype="bf16", kernels="dequant")
    gpu = torch.device("cuda:0")
    report = profile_inference(TINY, load_gpu("h100-sxm-80gb"), cfg.model_copy(update={"offload": "layers",
                                                                                         "swapped_layers": 3}),
                               default_calibration(), gpu)
    resident = profile_inference(TINY, load_gpu("h100-sxm-80gb"), cfg, default_calibration(), gpu)
    assert report.tokens == resident.tokens
    assert report.predicted.weights == report.measured.weights


def test_validation_records_repredict():
    """validation/inference.json (real and fake-tensor runs, `python validation/inference.py`)
    re-predicted by today's planner: weights, KV cache and swap buffers exact, activations within 5%."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "validation"))
    import inference as measured_inference

    rows = measured_inference.repredicted()
    assert len(rows) >= 20 and any(r["simulated"] for r, _, _ in rows)
    for record, predicted, measured in rows:
        for key in ("weights", "kv_cache", "swap_buffers", "host_bytes"):
            assert predicted[key] == measured[key], (record["model"], key)
        for key in ("prefill_activations", "decode_activations"):
            assert predicted[key] == pytest.approx(measured[key], rel=0.05), (record["model"], record["config"], key)


def test_profile_simulate_measures_a_full_size_model():
    result = CliRunner().invoke(main, ["profile", "--mode", "inference", "--model", "llama-3.2-1b", "--weights", "int8",
                                       "--dtype", "bf16", "--simulate", "--prompt-len", "256", "--new-tokens", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["measured"]["weights"] == data["predicted"]["weights"] > 1.4e9
    assert abs(data["error"]["activations"]) < 0.05 and data["tokens"] == []


def test_tensor_parallel_splits_weights_and_cache():
    """Megatron's split, as in training (planner/params.py): q/k/v/gate/up by columns, o/down by
    rows, the vocabulary by rows; each rank caches its own kv heads."""
    model, gpu, cal = load_model("70b"), load_gpu("a100-80gb"), default_calibration()
    one = estimate_inference(model, gpu, InferenceConfig(gpus=8, tp=1, pp=8, weights="fp16"), cal)
    eight = estimate_inference(model, gpu, InferenceConfig(gpus=8, tp=8, pp=1, weights="fp16"), cal)
    total = 68_976_648_192 * 2  # Llama-2-70B's parameters, fp16
    norms = (2 * model.num_layers + 1) * model.hidden_size * 2  # replicated on every tp rank
    assert eight.memory.weights == pytest.approx((total - norms) / 8 + norms, abs=16)
    assert eight.memory.kv_cache * 8 == kv_cache_bytes(model, eight.config, 2) * model.num_layers
    # a token crosses every pipeline stage in turn; tensor parallelism splits each layer's reads
    assert eight.time.decode_tokens_per_s > 4 * one.time.decode_tokens_per_s


def test_a_layout_given_by_its_sizes_needs_no_gpu_count():
    result = _plan("--mode", "inference", "--model", "70b", "--tp", "8", "--gpu", "a100-80gb", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"]["gpus"] == 8 and data["config"]["tp"] == 8 and data["fits"]
