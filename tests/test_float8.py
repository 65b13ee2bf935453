"""Float8 training (``--precision fp8-tensorwise / fp8-rowwise``, torchao's Float8Linear under
FSDP2) and asynchronous tensor parallelism (``--async-tp``): planner, strategy layer, and the
published runs they are checked against (validation/published.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner import float8
from planner.catalog import load_gpu, load_model
from planner.configs import TrainConfig
from planner.errors import LayoutError
from planner.memory import estimate_memory
from planner.params import layer_tensors
from trainplan.cli import main, plan_command

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "validation"))

MODEL = load_model("llama-3-8b")
GPU = load_gpu("h100-sxm-80gb")


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(gpus=8, zero_stage=3, seq_len=8192, micro_batch=2, precision="fp8-tensorwise"), **kw})


def test_float8_keeps_amp_bf16_states_and_activations():
    """torchao's Float8Linear changes the GEMMs, not the states (fp32 parameters, gradients and
    Adam moments under FSDP2's bf16 MixedPrecisionPolicy) nor what backward saves (the 16-bit
    input and weight: ``ctx.save_for_backward(input_hp, weight_hp_t)``)."""
    amp = estimate_memory(MODEL, GPU, _train(precision="amp-bf16"))
    for precision in ("fp8-tensorwise", "fp8-rowwise"):
        fp8 = estimate_memory(MODEL, GPU, _train(precision=precision))
        for key in ("params", "grads", "optimizer", "activations"):
            assert getattr(fp8.memory, key) == getattr(amp.memory, key), (precision, key)


def test_converted_projections():
    """Llama 3 8B: the seven projections of each block become Float8Linear (their dimensions are
    multiples of 16), norms and the output head do not."""
    shapes = float8.converted_shapes(MODEL)
    assert len(shapes) == 7
    matmul = sum(t.numel for t in layer_tensors(MODEL, "decoder") if len(t.shape) == 2)
    assert float8.converted_numel(MODEL, "decoder", 1) == matmul
    assert float8.converted_numel(MODEL, "decoder", 8) == matmul // 8
    # q, k, v read one input; gate, up another; o and down their own
    assert sorted({source for source, *_ in shapes}) == ["attn", "attn.o", "mlp", "mlp.down"]
    odd = MODEL.model_copy(update={"ffn_hidden_size": 14340})  # not a multiple of 16: the MLP stays bf16
    assert len(float8.converted_shapes(odd)) == 4


def test_fp8_all_gather_moves_projections_at_one_byte():
    """Tensorwise with ``enable_fsdp_float8_all_gather``: a block's projections travel (and sit
    unsharded) at 1 B per element, its norms at bf16; embedding and head units unchanged. Rowwise,
    or with --no-fp8-all-gather, everything is gathered in bf16."""
    train = _train()
    sizes, kinds = (1000, 218_112_000 + 8192, 525_336_576), ("embed", "decoder", "head")
    gathered = float8.gathered_unit_bytes(MODEL, train, sizes, kinds, 2)
    converted = float8.converted_numel(MODEL, "decoder", 1)
    assert gathered == (2000, converted + 2 * (sizes[1] - converted), 2 * sizes[2])
    for other in (_train(precision="fp8-rowwise"), _train(fp8_all_gather=False)):
        assert float8.gathered_unit_bytes(MODEL, other, sizes, kinds, 2) == tuple(2 * n for n in sizes)


def test_cast_traffic_by_hand():
    """One block of Llama 3 8B, 2 x 8192 tokens, compiled tensorwise with fp8 all-gather: the
    casts read each 16-bit source twice (amax, then scale-and-cast) and write one byte: 5 B per
    element. Forward: the attention input once (q, k, v share it), o's input, the MLP input once
    (gate, up), down's input, and the fp32 shards (9 B per element over 8 ranks). Backward: every
    output gradient both ways, the same inputs by columns, no weight (it arrived in fp8)."""
    h, f, kv, m = 4096, 14336, 1024, 2 * 8192
    layer = float8.layer(MODEL, _train(compile=True))
    weights = h * h + 2 * h * kv + h * h + 3 * h * f
    forward = 5 * m * (h + h + h + f) + 9 * weights / 8
    outputs = h + 2 * kv + h + 2 * f + h
    backward = 10 * m * outputs + 5 * m * (h + h + h + f)
    assert layer.cast_forward_bytes == pytest.approx(forward)
    assert layer.cast_backward_bytes == pytest.approx(backward)
    assert layer.gemm_forward_flops == 2 * m * weights
    eager = float8.layer(MODEL, _train(compile=False))  # every projection casts its own input, 33 B each
    assert eager.cast_forward_bytes > 6 * layer.cast_forward_bytes


def test_float8_speed_up_against_published_runs():
    """validation/published.py: Llama 3 8B under FSDP2 + compile on H100s. The planner's Float8
    GEMMs run at the measured fp8 matmul ceiling (1,402.6 of 1,979 TFLOPS against 794.5 of 989 in
    bf16, ml-engineering's MAMF table) and its casts at HBM speed. Tensorwise it predicts
    1.22-1.23x where torchtitan and torchao publish 1.25-1.29x (1.09x before the per-operation
    model of issue 23, which times the bf16 GEMMs by shape on the 500 W boards those runs used).
    Rowwise: 1.20x against 1.10x published: torchao's rowwise-scaled fp8 GEMM runs below the
    tensorwise cuBLAS ceiling the planner applies to both (no per-shape fp8 rowwise table yet),
    so its absolute throughput is +15%. Tensorwise absolute Float8 throughput within 15% of every
    published figure. Pinned so the gaps cannot silently widen."""
    from published import FLOAT8_RUNS, predict_float8

    for run in FLOAT8_RUNS:
        bf16, fp8 = predict_float8(run, "amp-bf16"), predict_float8(run, run.precision)
        speedup, published = fp8.tokens_per_s_per_gpu / bf16.tokens_per_s_per_gpu, run.published_fp8 / run.published_bf16
        if run.precision == "fp8-rowwise":
            assert published < speedup <= 1.15 * published, (run.label, speedup, published)
            assert fp8.tokens_per_s_per_gpu == pytest.approx(run.published_fp8, rel=0.2), run.label
        else:
            assert 1.05 < speedup <= published, (run.label, speedup, published)
            assert published / speedup < 1.1, (run.label, speedup, published)
            assert fp8.tokens_per_s_per_gpu == pytest.approx(run.published_fp8, rel=0.15), run.label


def test_async_tp_against_published_runs():
    """torchtitan's async TP benchmark (Llama 3 70B on 256 and 8B on 64 H100s, FSDP x TP 8, SP,
    compile): the planner's gain from pipelining each sequence-parallel collective with its matmul
    is within 8% of the published gain in all six rows (it predicts 1.13x for bf16 where 1.09-1.10x
    is published: the pipelined chunks' own slowdown is not modelled). Vanilla TP throughput within
    35% for bf16 and tensorwise (the 8B on 64 GPUs in bf16: +30%, small per-rank GEMMs); rowwise
    runs slower than bf16 under TP in the benchmark (its note: torchtitan issue 1207), which the
    planner does not model, so its rows are left out of both checks (the 70B rowwise gain is
    planned at 1.14x against 1.04x published)."""
    from published import ASYNC_TP, predict_async_tp

    for model, gpus, mb, ac, precision, vanilla, fused in ASYNC_TP:
        sync = predict_async_tp(model, gpus, mb, ac, precision, False)
        overlapped = predict_async_tp(model, gpus, mb, ac, precision, True)
        gain = overlapped.tokens_per_s_per_gpu / sync.tokens_per_s_per_gpu
        assert gain > 1.0
        assert overlapped.breakdown.tp_communication_s < sync.breakdown.tp_communication_s
        if precision != "fp8-rowwise":
            assert gain == pytest.approx(fused / vanilla, rel=0.08), (model, precision, gain)
            assert sync.tokens_per_s_per_gpu == pytest.approx(vanilla, rel=0.35), (model, precision)


def test_async_tp_hides_what_the_matmul_covers():
    """With ample matmul per collective, async TP leaves one chunk of tp (plus contention) of
    each transfer; the same layout without it pays all of it."""
    train = dict(gpus=8, tp=8, sequence_parallel=True, zero_stage=3, seq_len=8192, micro_batch=4, compile=True,
                 precision="amp-bf16")
    from planner.estimate import estimate

    sync = estimate(load_model("llama-3-70b"), GPU, TrainConfig(**train))
    fused = estimate(load_model("llama-3-70b"), GPU, TrainConfig(**train, async_tp=True))
    assert fused.throughput.breakdown.tp_communication_s < 0.4 * sync.throughput.breakdown.tp_communication_s


@pytest.mark.parametrize("args, message", [
    (["--gpu", "a100-80gb", "--strategy", "zero3"], "no fp8 peak"),
    (["--strategy", "ddp"], "FSDP2"),
])
def test_float8_refusals(args, message):
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpus", "8", "--precision", "fp8-tensorwise",
                                               "--seq-len", "4096", "--tp", "1", "--pp", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_async_tp_needs_tp_sp_and_compile():
    with pytest.raises(LayoutError, match="compile"):
        TrainConfig(gpus=8, tp=8, sequence_parallel=True, async_tp=True)
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpus", "8", "--async-tp", "--tp", "1"])
    assert result.exit_code == 2 and "asynchronous TP" in result.output


def test_plan_float8_json_has_the_fp8_run():
    result = CliRunner().invoke(plan_command, ["--model", "8b", "--gpus", "8", "--precision", "fp8-tensorwise",
                                               "--compile", "--strategy", "zero3", "--seq-len", "8192", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    best = data["recommended"] if "recommended" in data else data
    assert "fp8-tensorwise" in json.dumps(best)


def test_async_tp_is_not_run_on_cpu():
    """Refused before any rank starts (no GPU here), and by the strategy layer's start-up check
    for CPU ranks."""
    from planner.errors import ConfigError
    from strategies.train import RunConfig, check_runnable

    result = CliRunner().invoke(main, ["run", "--model", "tiny-llama", "--nproc", "2", "--tp", "2", "--compile",
                                       "--async-tp", "--steps", "1", "--seq-len", "64"])
    assert result.exit_code == 2
    assert "symmetric memory" in result.output and "Traceback" not in result.output
    train = TrainConfig(gpus=2, tp=2, sequence_parallel=True, compile=True, async_tp=True, seq_len=64)
    with pytest.raises(ConfigError, match="symmetric memory"):
        check_runnable(RunConfig(model=load_model("tiny-llama"), train=train), cuda=False)


def test_committed_float8_runs_repredict():
    """validation/cpu.json's Float8 runs (five on 2 gloo ranks of the reference model: tensorwise
    and rowwise, ZeRO-2 and -3, no, full and op-level AC; fake-tensor ranks of Llama-3-8B at
    2 x 8192 and at 8192 with op-level AC, Llama-3.2-1B on 16 with bf16 all-gather) re-predicted:
    states exact, activations within 0.1%, peak within 3% (the small runs, where a projection's
    eager backward binds: -0.1% to +2.6%; the full-size ones exact)."""
    from accuracy_table import committed_cpu_rows

    cases = committed_cpu_rows(lambda train: train["precision"].startswith("fp8-"))
    assert len(cases) >= 8
    for label, rows in cases:
        for key in ("params", "grads", "optimizer"):
            assert rows[key].predicted == rows[key].measured, (label, key)
        assert abs(rows["activations"].error_pct) < 0.1, label
        assert abs(rows["peak"].error_pct) < 3, label


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("m, k, n", [(512, 128, 256), (256, 512, 64), (1024, 128, 128)])
def test_projection_backward_peak_as_torchao_allocates(recipe, m, k, n):
    """planner.float8.projection_backward_peak against one eager Float8Linear's backward on CPU
    (torchao 0.18, bf16 input and gradient), measured allocation by allocation with LivePeak:
    exact but for the scales (a scalar per cast tensorwise, one fp32 per row or column rowwise)."""
    import torch
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from profiler.inference import LivePeak

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).to(torch.bfloat16)
    convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name(recipe))
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    gradient = torch.randn_like(y)
    peak = LivePeak()
    with peak:
        y.backward(gradient)
    predicted = float8.projection_backward_peak(m, k, n, float8.EAGER_CAST_SCRATCH)
    scales = 16 if recipe == "tensorwise" else 4 * 3 * (m + n + k)
    assert predicted <= peak.peak <= predicted + scales, (peak.peak, predicted)
