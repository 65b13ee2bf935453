"""The step-time model against published training runs, fit and check halves side by side.

    python validation/step_accuracy.py            # print the table and the summary
    python validation/step_accuracy.py --write    # also write validation/step_accuracy.json
    python validation/step_accuracy.py --check    # exit 1 if the committed JSON is stale

The runs are ``validation/published_steps.json``: 348 published runs with their sources, split
into runs a constant may be fitted on and runs held out for checking by a rule stated in that
file before the planner ever ran on them. Each run is compared in tokens per second per GPU:
the published figure where the source gives it, else its TFLOP/s or MFU converted with the
source's own FLOP convention (``_published_tokens``). A run the planner cannot express (no GPU
preset, a precision recipe or layout it does not model) is listed with the reason, never
approximated by another layout.

Model dimensions come from the catalog where the run names a preset, else from the run's
published dimensions with its family's block: Llama-style (SwiGLU, RMSNorm, RoPE), GPT-style
(GELU MLP, LayerNorm, learned positions: Megatron's GPT, GPT-3, MT-NLG, GPT-NeoX, Nemotron's
non-gated squared-ReLU MLP has the same FLOPs and bytes per token) or MPT (GELU, LayerNorm,
ALiBi: the bias is added inside the attention kernel, at ``alibi_attention_factor`` of its rate).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.catalog import load_gpu, load_model  # noqa: E402
from planner.configs import ModelSpec, TrainConfig, check_layout  # noqa: E402
from planner.errors import TrainplanError  # noqa: E402
from planner.flops import model_flops_per_token  # noqa: E402
from planner.params import total_params  # noqa: E402
from planner.step_time import estimate_step  # noqa: E402
from validation.published import eq3_flops_per_token  # noqa: E402

RUNS = ROOT / "validation" / "published_steps.json"
RESULT = ROOT / "validation" / "step_accuracy.json"


@dataclass(frozen=True)
class Compared:
    id: str
    half: str  # fit | check
    label: str
    params_b: float
    published: float | None  # tokens/s per GPU
    basis: str  # how ``published`` was obtained
    predicted: float | None
    refused: str | None  # why the planner cannot express the run

    @property
    def error(self) -> float | None:
        if self.published is None or self.predicted is None:
            return None
        return self.predicted / self.published - 1


def _spec(run: dict) -> ModelSpec:
    if run.get("catalog_model"):
        return load_model(run["catalog_model"])
    d, name = run["model_dims"], run["model"]
    if not d or not all(d.get(k) for k in ("layers", "hidden", "heads")):
        raise TrainplanError(f"{name}: dimensions not published")
    common = dict(name=name, num_layers=d["layers"], hidden_size=d["hidden"], num_heads=d["heads"],
                  num_kv_heads=d.get("kv_heads") or d["heads"], vocab_size=d.get("vocab") or 51200,
                  ffn_hidden_size=d.get("ffn") or 4 * d["hidden"])
    lowered = name.lower()
    if "llama" in lowered:
        return ModelSpec(**common, mlp="swiglu", norm="rmsnorm", position_embedding="rope")
    if lowered.startswith("mpt"):
        return ModelSpec(**common, mlp="gelu", norm="layernorm", position_embedding="alibi")
    return ModelSpec(**common, mlp="gelu", norm="layernorm", position_embedding="learned",
                     max_position_embeddings=max(run["seq_len"], 2048), linear_bias=True)


def _precision(run: dict, engine: str) -> str:
    text = str(run.get("precision") or (run.get("inferred") or {}).get("precision") or "").lower()
    if not text:
        raise TrainplanError("precision not published")
    if "fp4" in text:
        raise TrainplanError(f"precision {run['precision']!r} is not modelled")
    if "float8" in text or "fp8" in text:
        # torchtitan's Float8 is torchao's; Megatron and NeMo run Transformer Engine's recipes
        # (planner/te_fp8.py); llm-foundry's amp_fp8 runs Transformer Engine under FSDP
        if run["stack"] == "torchtitan":
            return "fp8-rowwise" if "rowwise" in text else "fp8-tensorwise"
        if engine != "megatron":
            raise TrainplanError(f"Transformer Engine FP8 under {run['stack']}'s FSDP ({run['precision']!r}) is not "
                                 f"modelled")
        if "mx" in text:
            return "mxfp8"
        if "block" in text:
            return "fp8-blockwise"
        if "current" in text or "-cs" in text:
            return "fp8-current"
        return "fp8-delayed"  # a recipe not named: Megatron's default --fp8-recipe (transformer_config.py:594-600)
    if text.startswith("fp16"):
        return "fp16-mixed"
    if "amp_bf16" in text and engine == "pytorch":
        return "bf16-mixed"  # FSDP's mixed-precision policy: bf16 compute, fp32 masters
    return "bf16-mixed"


# runs made before FlashAttention (Dao et al., May 2022) reached Megatron-LM and DeepSpeed: their
# attention materialised the s x s scores (Megatron's fused scale-mask-softmax), which the planner
# models as --attention eager
_PRE_FLASH_SOURCES = ("Narayanan et al. 2021", "Korthikanti et al. 2022", "Smith et al. 2022", "Black et al. 2022",
                      "bigscience-workshop/bigscience")

# whose model code runs the layers (planner/implementations.py): torchtitan's own, Megatron-Core's
# Transformer Engine layers; the others (llm-foundry's MPT, nanotron, ...) run fused norms as the
# reference model does
_IMPL = {"torchtitan": "torchtitan", "megatron-core": "megatron", "nemo": "megatron"}

_ENGINE = {"torchtitan": "pytorch", "llm-foundry": "pytorch", "megatron-lm": "megatron", "megatron-core": "megatron",
           "nemo": "megatron", "deepspeed": "deepspeed"}


def _train(run: dict) -> TrainConfig:
    engine = _ENGINE.get(run["stack"])
    if engine is None:
        framework = str(run.get("framework") or "").lower()
        engine = "megatron" if "megatron" in framework else "deepspeed" if "deepspeed" in framework else "pytorch"
    zero = run.get("zero") if run.get("zero") is not None else (run.get("inferred") or {}).get("zero")
    if engine == "megatron":
        zero = 1 if zero else 0
    elif zero is None:
        zero = 3 if engine == "pytorch" else 1
    policy = str(run.get("activation_checkpointing") or "none")
    ac = "full" if policy.startswith("full") else "op" if "op" in policy else "selective" if "selective" in policy \
        else "none"
    if engine == "megatron" and ac == "op":
        ac = "selective"
    micro = run.get("micro_batch") or 1
    fields = dict(gpus=run["gpus"], tp=run["tp"], pp=run["pp"], cp=run.get("cp") or 1, zero_stage=zero,
                  precision=_precision(run, engine), engine=engine, seq_len=run["seq_len"], micro_batch=micro,
                  activation_checkpointing=ac, compile=bool(run.get("compile")) and engine == "pytorch",
                  sequence_parallel=run["tp"] > 1,
                  attention="eager" if run["source"].startswith(_PRE_FLASH_SOURCES) else "flash",
                  impl=_IMPL.get(run["stack"], "trainplan"))
    if run.get("global_batch"):
        fields["global_batch"] = run["global_batch"]
    vpp = run.get("vpp") or 1
    if run["pp"] > 1:
        fields |= dict(schedule="interleaved", chunks=vpp) if vpp > 1 else dict(schedule="1f1b")
    return TrainConfig(**fields)


def _published_tokens(run: dict, model: ModelSpec, gpu_peak_tflops: float) -> tuple[float, str]:
    """Tokens/s per GPU as published, or converted from TFLOP/s or MFU with the source's FLOP
    convention (its ``tflops_definition``)."""
    if run.get("tokens_per_s_per_gpu"):
        return float(run["tokens_per_s_per_gpu"]), "tokens/s"
    tflops, basis = run.get("tflops_per_gpu"), "TFLOP/s"
    if not tflops and run.get("mfu"):
        tflops, basis = run["mfu"] * gpu_peak_tflops, "MFU x peak"
    if not tflops:
        raise TrainplanError("no throughput published")
    definition = str(run.get("tflops_definition") or "").lower()
    if "eq. 3" in definition or "counts recomputation" in definition:
        if "8*n" in definition:  # BLOOM's log: 8 N per token
            return tflops * 1e12 / (8 * total_params(model)), f"{basis}, 8N"
        per_token = eq3_flops_per_token(model.num_layers, model.hidden_size, run["seq_len"], model.vocab_size)
        return tflops * 1e12 / per_token, f"{basis}, Megatron Eq. 3"
    # model FLOPs: 6N plus attention over the full s x s square (PaLM's convention)
    return tflops * 1e12 / model_flops_per_token(model, run["seq_len"], causal=False), f"{basis}, 6N + 12 L h s"


def compare(run: dict, half: str, calibration=None, gpu=None) -> Compared:
    """One run against the planner (``calibration`` and ``gpu``: what validation/step_fit.py
    tries; by default the shipped constants and the run's GPU preset)."""
    label = f"{run['model']}, {run['gpus']} {run['gpu']}, {run['stack']}"
    try:
        model = _spec(run)
        params_b = total_params(model) / 1e9
    except TrainplanError as exc:
        return Compared(run["id"], half, label, 0.0, None, "", None, str(exc))
    try:
        if not run.get("gpu_preset"):
            raise TrainplanError(f"no GPU preset for {run['gpu']}")
        gpu = gpu or load_gpu(run["gpu_preset"])
        published, basis = _published_tokens(run, model, gpu.peak_tflops.for_dtype("bf16"))
        train = _train(run)
        check_layout(model, train)
        step = estimate_step(model, gpu, train, calibration,
                             gpus_per_node=run.get("gpus_per_node") or gpu.gpus_per_node)
        return Compared(run["id"], half, label, params_b, published, basis, step.tokens_per_s_per_gpu, None)
    except (TrainplanError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        return Compared(run["id"], half, label, params_b, None, "", None, reason)


def compare_all(calibration=None, halves: tuple[str, ...] = ("fit", "check")) -> list[Compared]:
    data = json.loads(RUNS.read_text())
    runs = {r["id"]: r for r in data["runs"]}
    return [compare(runs[i], half, calibration) for half in halves for i in data[half]]


def summary(rows: list[Compared], half: str) -> dict:
    """Errors of one half: median and worst |error|, and the size trend (median signed error of
    the smallest and of the largest models: below 10B and from 100B)."""
    mine = [r for r in rows if r.half == half]
    compared = [r for r in mine if r.error is not None]
    errors = [r.error for r in compared]
    small = [r.error for r in compared if r.params_b < 10]
    large = [r.error for r in compared if r.params_b >= 100]
    return {
        "runs": len(mine),
        "compared": len(compared),
        "not_expressible": len(mine) - len(compared),
        "median_abs_error": statistics.median(abs(e) for e in errors) if errors else None,
        "worst_abs_error": max((abs(e) for e in errors), default=None),
        "within_10pct": sum(abs(e) <= 0.10 for e in errors),
        "within_25pct": sum(abs(e) <= 0.25 for e in errors),
        "median_error_below_10b": statistics.median(small) if small else None,
        "median_error_from_100b": statistics.median(large) if large else None,
    }


def result() -> dict:
    rows = compare_all()
    return {
        "runs": str(RUNS.relative_to(ROOT)),
        "fit": summary(rows, "fit"),
        "check": summary(rows, "check"),
        "rows": [{"id": r.id, "half": r.half, "label": r.label, "params_b": round(r.params_b, 2),
                  "published_tokens_per_s_per_gpu": None if r.published is None else round(r.published, 1),
                  "basis": r.basis,
                  "predicted_tokens_per_s_per_gpu": None if r.predicted is None else round(r.predicted, 1),
                  "error": None if r.error is None else round(r.error, 4), "refused": r.refused} for r in rows],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def table(res: dict) -> str:
    """The README's table: fit and check side by side."""
    f, c = res["fit"], res["check"]
    lines = ["| | fit half | check half |", "|---|---|---|"]
    for key, name in (("runs", "published runs"), ("compared", "expressed and compared"),
                      ("not_expressible", "not expressible (reason listed in validation/step_accuracy.json)")):
        lines.append(f"| {name} | {f[key]} | {c[key]} |")
    for key, name in (("median_abs_error", "median \\|error\\| of tokens/s per GPU"),
                      ("worst_abs_error", "worst \\|error\\|")):
        lines.append(f"| {name} | {f[key]:.1%} | {c[key]:.1%} |")
    lines.append(f"| within 10% / 25% | {f['within_10pct']} / {f['within_25pct']} | "
                 f"{c['within_10pct']} / {c['within_25pct']} |")
    lines.append(f"| median error, models below 10B | {_pct(f['median_error_below_10b'])} | "
                 f"{_pct(c['median_error_below_10b'])} |")
    lines.append(f"| median error, models from 100B | {_pct(f['median_error_from_100b'])} | "
                 f"{_pct(c['median_error_from_100b'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    res = result()
    text = json.dumps(res, indent=1) + "\n"
    if "--check" in sys.argv:
        if RESULT.read_text() != text:
            print("validation/step_accuracy.json is stale: run `python validation/step_accuracy.py --write`",
                  file=sys.stderr)
            return 1
        return 0
    if "--write" in sys.argv:
        from strategies.files import write_atomic

        write_atomic(RESULT, text)
    print(table(res), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
