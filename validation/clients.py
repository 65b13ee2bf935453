"""Measure the training stacks people run, for the README's per-framework section.

    python validation/clients.py            # writes validation/clients.json (atomically)
    python validation/clients.py torchtitan # re-measures one framework, keeps the others' records

Hugging Face: LlamaForCausalLM, Qwen2ForCausalLM and GPT2LMHeadModel (sdpa and eager, fp32 and
amp-bf16) trained with a plain loop and measured by ``trainplan.track``, which also plans the run
it saw (``--impl hf``); the same wrapped by peft (LoRA, ``--finetune lora``). torchtitan 0.3.0: its Llama3 and Qwen3-MoE models and checkpointing policies,
trained as its trainer does (``--impl torchtitan-cpu``). torch.compile: trainplan's reference model with compiled blocks, measured
by ``trainplan profile --compile`` (allocator high-water mark). Each record keeps the observed
layout and the measured bytes; ``docs/readme.py`` re-predicts them with the current planner, so
the README's accuracy figures follow the code. The same runs are tests
(tests/test_hf_clients.py, tests/test_peft_client.py, tests/test_torchtitan.py, tests/test_profiler.py).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "validation" / "clients.json"


def _tracked(framework: str, name: str, tracker) -> dict:
    """One record of a loop trainplan.track watched: the layout it saw and the bytes it measured."""
    import torch
    import transformers

    spec, train = tracker.observed()
    measured = tracker.result()
    record = dict(framework=framework, name=name, model=spec.model_dump(), train=train.model_dump(),
                  measured=dict(activations=measured.activations, peak=max(measured.phase_totals.values())),
                  versions=dict(transformers=transformers.__version__, torch=torch.__version__))
    print(record["name"], record["measured"], flush=True)
    return record


def hugging_face() -> list[dict]:
    import torch

    from test_hf_clients import _model, _train  # the tests' models and loop: one definition

    records = []
    for arch in ("llama", "qwen2", "gpt2"):
        for attn in ("sdpa", "eager"):
            for precision in ("fp32", "amp-bf16"):
                torch.manual_seed(0)
                model = _model(arch, attn)
                model.train()
                tracker, _ = _train(model, precision)
                records.append(_tracked("hf", f"{type(model).__name__}, {attn}, {precision}", tracker))
    return records


def hugging_face_moe() -> list[dict]:
    from test_moe import HF_MOE_CLIENTS, hf_moe_model, hf_moe_train  # the test's models and loop

    records = []
    for name in HF_MOE_CLIENTS:
        model = hf_moe_model(name)
        records.append(_tracked("hf-moe", f"{type(model).__name__} (MoE, grouped_mm), sdpa, fp32",
                                hf_moe_train(model)))
    return records


def peft_lora() -> list[dict]:
    import peft
    import torch
    import transformers

    from test_peft_client import TARGETS
    from test_hf_clients import BATCH, SEQ, VOCAB, _model

    records = []
    for arch, attn, dtype in (("llama", "sdpa", torch.float32), ("llama", "sdpa", torch.bfloat16),
                              ("llama", "eager", torch.bfloat16), ("qwen2", "sdpa", torch.bfloat16)):
        torch.manual_seed(0)
        model = peft.get_peft_model(_model(arch, attn).to(dtype), peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        import trainplan

        with trainplan.track(model, optimizer) as tracker:
            for _ in range(3):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        spec, train = tracker.observed()
        measured = tracker.result()
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        records.append(dict(
            framework="peft", name=f"peft LoRA r=8 on {type(model.base_model.model).__name__}, {attn}, {name}",
            model=spec.model_dump(), train=train.model_dump(),
            measured=dict(activations=measured.activations, peak=max(measured.phase_totals.values())),
            versions=dict(peft=peft.__version__, transformers=transformers.__version__, torch=torch.__version__)))
        print(records[-1]["name"], records[-1]["measured"], flush=True)
    return records


def torchtitan() -> list[dict]:
    import torch
    import torchtitan

    from test_torchtitan import _measure, _spec  # the test's model, policies and loop

    records = []
    for precision in ("fp32", "bf16"):
        for ac in ("none", "op", "layer:2", "full"):
            tracker, train, _, _ = _measure(precision, ac)
            measured = tracker.result()
            records.append(dict(
                framework="torchtitan", name=f"torchtitan Llama3Model, {precision}, AC {ac}",
                model=_spec().model_dump(), train=train.model_dump(),
                measured=dict(activations=measured.activations, peak=max(measured.phase_totals.values())),
                versions=dict(torchtitan=getattr(torchtitan, "__version__", "0.3.0"), torch=torch.__version__)))
            print(records[-1]["name"], records[-1]["measured"], flush=True)
    return records


def torchtitan_moe() -> list[dict]:
    import torch
    import torchtitan

    from test_torchtitan import _measure, _spec  # the test's model, policies and loop

    records = []
    for precision in ("fp32", "bf16"):
        for ac in ("none", "op", "layer:2", "full"):
            tracker, train, _, _ = _measure(precision, ac, "qwen3-moe")
            measured = tracker.result()
            records.append(dict(
                framework="torchtitan-moe", name=f"torchtitan Qwen3Model (MoE), {precision}, AC {ac}",
                model=_spec("qwen3-moe").model_dump(), train=train.model_dump(),
                measured=dict(activations=measured.activations, peak=max(measured.phase_totals.values())),
                versions=dict(torchtitan=getattr(torchtitan, "__version__", "0.3.0"), torch=torch.__version__)))
            print(records[-1]["name"], records[-1]["measured"], flush=True)
    return records


def compiled() -> list[dict]:
    import torch

    from planner.calibration import default_calibration
    from planner.catalog import load_gpu, model_from_hf_dict
    from planner.configs import TrainConfig
    from profiler.run import profile_layout

    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 512}
    spec = model_from_hf_dict(cfg, "clients", "llama-style 256 x 2 layers (validation/clients.py)", "llama-256x2")
    records = []
    # every checkpointing policy (issue 21: what inductor's partitioner saves under each)
    grid = [(p, "none") for p in ("fp32", "bf16", "amp-bf16")] + [
        (p, ac) for p in ("fp32", "bf16") for ac in ("full", "op", "selective", "layer:2")]
    for precision, ac in grid:
        train = TrainConfig(gpus=1, precision=precision, micro_batch=4, global_batch=4, seq_len=512,
                            optimizer_impl="for-loop", compile=True, activation_checkpointing=ac)
        report = profile_layout(spec, load_gpu("h100-sxm-80gb"), train, default_calibration(), timeout_s=900)
        rows = {r.quantity: r for r in report.rows}
        label = "" if ac == "none" else f", AC {ac}"
        records.append(dict(
            framework="compile", name=f"reference model, torch.compile, {precision}{label}",
            model=spec.model_dump(), train=train.model_dump(),
            measured=dict(activations=int(rows["activations"].measured), peak=int(rows["peak (allocated)"].measured)),
            versions=dict(torch=torch.__version__)))
        print(records[-1]["name"], records[-1]["measured"], flush=True)
    return records


def main() -> int:
    from strategies.files import write_atomic

    runs = {"hf": hugging_face, "hf-moe": hugging_face_moe, "peft": peft_lora, "torchtitan": torchtitan,
            "torchtitan-moe": torchtitan_moe, "compile": compiled}
    only = sys.argv[1:] or list(runs)
    unknown = sorted(set(only) - set(runs))
    if unknown:
        print(f"error: unknown framework {unknown[0]!r} (choose from {', '.join(runs)})", file=sys.stderr)
        return 2
    old = json.loads(OUT.read_text()) if OUT.exists() else {"records": []}
    kept = [dict(r, date=r.get("date", old.get("date"))) for r in old["records"]]
    records = [r for r in kept if r["framework"] not in only]
    for name in only:
        today = datetime.date.today().isoformat()
        records += [dict(r, date=today) for r in runs[name]()]
    records.sort(key=lambda r: list(runs).index(r["framework"]))
    data = {"device": "cpu", "records": records}
    write_atomic(OUT, json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
