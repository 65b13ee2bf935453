"""The capability registry (planner/capabilities.py): what ``plan`` models and what ``run`` and
``profile`` execute, and the one-line reason when not.

Checked here: the layouts ``profile --recommend`` used to run although the strategy layer does
not execute them are refused; over whole search spaces the registry answers every candidate,
``profile --recommend`` runs only accepted ones, accepted ones really start on CPU ranks and
refused ones stop the launcher before any rank starts; the CLI says why in one line; and every
rule's predicate and message is reachable from a hand-written layout.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
from click.testing import CliRunner

from planner.capabilities import (
    ARCHITECTURE_RULES,
    LAYOUT_RULES,
    MODEL_RULES,
    REFERENCE_MODEL_RULES,
    RUN_RULES,
    Host,
    architecture_refusal,
    layout_refusal,
    model_refusal,
    plan_refusal,
    reference_model_refusal,
    run_refusal,
)
from planner.catalog import load_model
from planner.configs import ModelSpec, TrainConfig, check_layout
from planner.errors import ConfigError, LayoutError

TINY = load_model("tiny-llama")
SEQ = 64


def _one_line(reason) -> bool:
    return isinstance(reason, str) and reason.strip() != "" and "\n" not in reason and "{" not in reason


# ---------------------------------------------------------------- 1. former false accepts


@pytest.mark.parametrize("fields, control, reason", [
    (dict(paged_optimizer=True), dict(), "--paged-optimizer is planned by `plan`; the strategy layer does not "
                                         "execute it yet"),
    (dict(impl="hf"), dict(), "run executes trainplan's reference model: --impl hf is planned by `plan`"),
    (dict(precision="fp8-tensorwise", tp=2), dict(precision="fp8-tensorwise"),
     "fp8-tensorwise is run under FSDP2 alone (--tp 1 --pp 1 --cp 1)"),
], ids=["paged-optimizer", "impl-hf", "fp8-with-tp"])
def test_former_false_accepts_of_recommend_are_refused(fields, control, reason):
    """``profile --recommend`` used to run these ZeRO-3 layouts of tiny-llama (the planner models
    them, the strategy layer silently ran something else); ``run_refusal`` now refuses each with its
    reason, on CPU and on CUDA, while the same layout without the offending setting is accepted."""
    base = dict(gpus=2, zero_stage=3, seq_len=SEQ, engine="pytorch")
    train = TrainConfig(**base, **fields)
    check_layout(TINY, train)  # plan models it
    assert plan_refusal(TINY, train) is None
    refused = run_refusal(TINY, train)
    assert _one_line(refused) and refused.startswith(reason), refused
    assert run_refusal(TINY, train, cuda=True) == refused
    assert run_refusal(TINY, TrainConfig(**base, **control)) is None


# ---------------------------------------------------------------- 2. search spaces


def _profile_options(gpus: int, flags: list[str]):
    """The options ``profile --recommend`` passes to ``_profile_recommend``, parsed by click."""
    from trainplan.cli import profile_command
    from trainplan.inference_cli import split_mode

    args = ["--model", "tiny-llama", "--gpus", str(gpus), "--seq-len", str(SEQ), "--recommend", *flags]
    named = {name for name, p in inspect.signature(profile_command.callback).parameters.items()
             if p.kind is not inspect.Parameter.VAR_KEYWORD}
    with profile_command.make_context("profile", args) as ctx:
        options = {k: v for k, v in ctx.params.items() if k not in named}
        mode, _ = split_mode(options)
    assert mode == "train"
    return options


def _planned(gpus: int, flags: list[str]):
    """(model, candidates best first, cuda): what ``_profile_recommend`` plans, built the way it
    builds it (build_space, engine pytorch, the device's GPU preset, every fitting candidate)."""
    from planner.search import search
    from trainplan.cli import _device_gpu, build_space, resolve_calibration

    options = _profile_options(gpus, flags)
    gpu, on_cpu = _device_gpu(options["gpu_name"])
    cal = resolve_calibration(None, gpu)
    model, _, space = build_space(options)
    space.fixed["engine"] = "pytorch"
    return model, search(model, gpu, space, cal, top=0).candidates, not on_cpu


SPACES = {
    # name: (gpus, flags, some accepted, some refused)
    "4-gpus": (4, [], True, True),
    "4-gpus-fp8-tensorwise": (4, ["--precision", "fp8-tensorwise"], True, True),
    "2-gpus-fp16-mixed": (2, ["--precision", "fp16-mixed"], True, True),
    "2-gpus-paged-optimizer": (2, ["--paged-optimizer"], False, True),
    "2-gpus-impl-hf": (2, ["--impl", "hf"], False, True),
    "2-gpus-qlora": (2, ["--finetune", "qlora"], True, True),
    "2-gpus-lora": (2, ["--finetune", "lora"], True, False),
}


@pytest.fixture(scope="module")
def spaces():
    return {name: _planned(gpus, flags) for name, (gpus, flags, _, _) in SPACES.items()}


def test_every_candidate_of_a_search_space_is_answered(spaces):
    """For every candidate of tiny-llama's 2- and 4-GPU spaces (default, Float8, fp16, paged
    optimizer, Hugging Face code, LoRA, QLoRA), ``run_refusal`` is None or one non-empty line; the
    spaces hold both accepted and refused layouts (where expected per space); and every accepted
    candidate passes the strategy layer's own start-up check after the JSON round trip the
    launcher makes, so nothing ``profile --recommend`` would run is refused there."""
    from strategies.train import RunConfig, check_runnable

    accepted = refused = 0
    reasons = set()
    for name, (model, candidates, cuda) in spaces.items():
        answers = [run_refusal(model, c.train, cuda=cuda) for c in candidates]
        assert candidates, name
        assert all(a is None or _one_line(a) for a in answers), name
        ok = [c.train for c, a in zip(candidates, answers) if a is None]
        _, _, some_accepted, some_refused = SPACES[name]
        assert bool(ok) == some_accepted, name
        assert (len(ok) < len(candidates)) == some_refused, name
        # profile --recommend's filter, replicated: the runnable candidates, best first
        for train in ok:
            config = RunConfig.model_validate_json(RunConfig(model=model, train=train).model_dump_json())
            assert config.train == train
            check_layout(model, config.train)
            check_runnable(config, cuda=cuda)
        accepted += len(ok)
        refused += len(candidates) - len(ok)
        reasons |= {a for a in answers if a}
    assert accepted > 0 and refused > 0
    assert len(reasons) >= 5, reasons


def _recording_launch(launched: list):
    """A stand-in for the launcher ``profile`` uses: the launcher's own check (``check_runnable``,
    before any rank), then a simulated out-of-memory instead of starting ranks."""
    from strategies.launch import RunFailedError
    from strategies.train import RunConfig, check_runnable

    def launch(config_json, nproc, timeout_s=600.0, threads_per_rank=None, worker="strategies.worker"):
        config = RunConfig.model_validate_json(config_json)
        check_runnable(config, cuda=False)
        assert nproc == config.train.gpus
        launched.append(config.train)
        raise RunFailedError("run failed: rank 0: out of memory (simulated by the test)", rank=0, oom=True)

    return launch


@pytest.mark.parametrize("name, top_k, skips", [("4-gpus", 64, True), ("4-gpus-fp8-tensorwise", 64, True),
                                                ("2-gpus-fp16-mixed", 64, True), ("2-gpus-qlora", 64, True)])
def test_profile_recommend_runs_only_accepted_candidates(name, top_k, skips, spaces, monkeypatch):
    """``trainplan profile --recommend`` hands the launcher exactly the first ``--candidates``
    planned candidates that ``run_refusal`` accepts, best first, skipping refused ones ranked
    above them (the launcher is replaced by one that runs the strategy layer's start-up check and
    reports an out-of-memory, so nothing starts)."""
    from trainplan.cli import main

    launched: list = []
    monkeypatch.setattr("profiler.run.launch", _recording_launch(launched))
    gpus, flags, _, _ = SPACES[name]
    result = CliRunner().invoke(main, ["profile", "--model", "tiny-llama", "--gpus", str(gpus), "--seq-len", str(SEQ),
                                       "--recommend", "--candidates", str(top_k), *flags])
    assert result.exit_code == 1, result.output
    assert "none of the measured candidates ran" in result.stderr and "Traceback" not in result.output
    model, candidates, cuda = spaces[name]
    expected = [c.train for c in candidates if run_refusal(model, c.train, cuda=cuda) is None][:top_k]
    assert launched == expected
    # where refused candidates rank above the last one run, the filter did skip them
    last = next(i for i, c in enumerate(candidates) if c.train == launched[-1])
    assert any(run_refusal(model, c.train, cuda=cuda) for c in candidates[:last]) == skips


# ---------------------------------------------------------------- 3. accepted ones run, refused ones do not start


def _samples(model, candidates, cuda):
    """One accepted candidate per strategy (tp = pp = 1) and one with tp, one with pp: among
    each group the one with the most features (offload, checkpointing, micro-batch > 1)."""
    groups: dict[str, list[TrainConfig]] = {}
    for c in candidates:
        t = c.train
        if run_refusal(model, t, cuda=cuda) is None:
            key = "tp" if t.tp > 1 else "pp" if t.pp > 1 else t.strategy
            groups.setdefault(key, []).append(t)
    return {key: max(group, key=lambda t: (t.offload != "none") + (t.activation_checkpointing != "none")
                     + (t.micro_batch > 1)) for key, group in groups.items()}


@pytest.fixture(scope="module")
def accepted_2_gpus():
    model, candidates, cuda = _planned(2, [])
    return model, _samples(model, candidates, cuda)


@pytest.mark.dist
@pytest.mark.parametrize("key", ["ddp", "zero3", "pp"])
def test_accepted_candidates_start_on_cpu(key, accepted_2_gpus):
    """A sample of distinct accepted candidates of tiny-llama's 2-GPU space (DDP, ZeRO-3 and one
    with pipeline parallelism; preferring offload and checkpointing) really runs one
    step on 2 gloo ranks and returns a result (ZeRO-1 and ZeRO-2 run in tests/test_strategies.py)."""
    from strategies.launch import launch
    from strategies.train import RunConfig, RunResult

    model, samples = accepted_2_gpus
    train = samples[key]
    config = RunConfig(model=model, train=train, steps=1, warmup=0)
    result = RunResult.model_validate_json(launch(config.model_dump_json(), train.gpus, timeout_s=120))
    assert result.world == 2 and result.train == train
    assert len(result.steps) == 1 and math.isfinite(result.steps[0].loss)
    assert len(result.ranks) == 2


def test_accepted_samples_are_distinct(accepted_2_gpus):
    """The started sample covers distinct layouts: every strategy, and pp and tp are accepted."""
    _, samples = accepted_2_gpus
    assert {"ddp", "zero1", "zero2", "zero3", "pp", "tp"} <= set(samples)
    assert len({t.model_dump_json() for t in samples.values()}) == len(samples)


def test_refused_candidates_stop_the_launcher_before_any_rank(spaces, monkeypatch):
    """The first refused candidate of several spaces (at least 3 different reasons): the launcher
    raises ConfigError with ``run_refusal``'s reason and never spawns a process; the strategy
    layer's ``check_runnable`` says the same."""
    import strategies.launch
    from strategies.train import RunConfig, check_runnable

    def spawn(*args, **kwargs):
        raise AssertionError("a rank was started for a refused layout")

    monkeypatch.setattr(strategies.launch.subprocess, "Popen", spawn)
    monkeypatch.setattr(strategies.launch, "remove_stale_run_folders", lambda *a: spawn())
    reasons = set()
    for name, (model, candidates, cuda) in spaces.items():
        refused = next((c.train for c in candidates if run_refusal(model, c.train, cuda=cuda)), None)
        if refused is None:
            continue
        reason = run_refusal(model, refused, cuda=cuda)
        config = RunConfig(model=model, train=refused, steps=1, warmup=0)
        with pytest.raises(ConfigError) as exc:
            strategies.launch.launch(config.model_dump_json(), refused.gpus, timeout_s=30)
        assert str(exc.value) == reason, name
        with pytest.raises(ConfigError) as exc:
            check_runnable(config, cuda=cuda)
        assert str(exc.value) == reason, name
        reasons.add(reason)
    assert len(reasons) >= 3, reasons


# ---------------------------------------------------------------- 4. the CLI


def test_profile_help_names_the_flags():
    """The flags these tests drive exist on ``trainplan profile``."""
    from trainplan.cli import main

    result = CliRunner().invoke(main, ["profile", "--help"])
    assert result.exit_code == 0
    for flag in ("--recommend", "--candidates", "--paged-optimizer", "--impl", "--precision", "--strategy", "--tp"):
        assert flag in result.output, flag


@pytest.mark.parametrize("gpus, flags", [
    (2, ["--paged-optimizer"]),
    (2, ["--impl", "hf"]),
    (2, ["--precision", "fp8-tensorwise", "--strategy", "zero3", "--tp", "2"]),
], ids=["paged-optimizer", "impl-hf", "fp8-tp"])
def test_profile_recommend_with_nothing_runnable_exits_2_with_the_reason(gpus, flags, monkeypatch):
    """When every planned candidate is refused, ``profile --recommend`` exits 2 with one line
    naming the best planned candidate's reason, starts nothing, and prints no traceback; ``run``
    of the same layout says the same reason."""
    from trainplan.cli import main

    def no_launch(*args, **kwargs):
        raise AssertionError("launched a refused layout")

    monkeypatch.setattr("profiler.run.launch", no_launch)
    monkeypatch.setattr("strategies.launch.launch", no_launch)
    model, candidates, cuda = _planned(gpus, flags)
    reason = run_refusal(model, candidates[0].train, cuda=cuda)
    assert reason
    common = ["--model", "tiny-llama", "--gpus", str(gpus), "--seq-len", str(SEQ), *flags]
    result = CliRunner().invoke(main, ["profile", *common, "--recommend"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no planned candidate can be run here")
    assert " ".join(reason.split()) in lines[0]

    result = CliRunner().invoke(main, ["run", *common, "--strategy", "zero3", "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines() == [f"error: {' '.join(reason.split())}"]


# ---------------------------------------------------------------- 5. every rule is reachable


def _spec(**update) -> ModelSpec:
    return ModelSpec.model_validate({**TINY.model_dump(), **update})


# index: (a text of the rule's reason, the TrainConfig fields it refuses; gpus=2, seq_len=64 unless given)
LAYOUT_EXAMPLES = {
    0: ("not megatron", dict(engine="megatron", zero_stage=1, offload="optimizer")),
    1: ("under FSDP2", dict(precision="fp8-tensorwise", zero_stage=1)),
    2: ("plan it with --engine megatron", dict(precision="fp8-current", zero_stage=2)),
    3: ("FP8 primary weights", dict(precision="mxfp8", engine="megatron", zero_stage=1, fp8_param_gather=True)),
    4: ("precision-aware optimizer", dict(exp_avg_dtype="bf16", zero_stage=2)),
    5: ("for full training (not lora", dict(precision="fp8-rowwise", zero_stage=2, finetune="lora")),
    6: ("with --offload is not modelled", dict(precision="fp8-tensorwise", zero_stage=2, offload="optimizer")),
    7: ("HSDP", dict(dp_shard=1, zero_stage=1)),
    8: ("hybrid sharding) is planned for full training", dict(dp_shard=1, zero_stage=3, finetune="lora")),
    9: ("use --attention flash", dict(cp=2, attention="eager")),
    10: ("Ulysses", dict(cp=2, engine="deepspeed", zero_stage=2)),
    11: ("context parallelism is planned for full training", dict(cp=2, finetune="lora")),
    12: ("with --cp, plan --ac none", dict(cp=2, activation_checkpointing="op")),
    13: ("tensor and pipeline parallelism are not modelled", dict(tp=2, finetune="lora")),
    14: ("modelled for the pytorch engine", dict(finetune="lora", engine="deepspeed")),
    15: ("--offload with lora/qlora", dict(finetune="lora", zero_stage=2, offload="optimizer")),
    16: ("amp-bf16 is not modelled", dict(finetune="qlora", precision="amp-bf16")),
    17: ("op-level and selective", dict(finetune="lora", activation_checkpointing="selective")),
    18: ("distillation", dict(teacher="tiny-llama", pp=2, grad_accum=2)),
}
# index: (text, model, TrainConfig fields)
MODEL_EXAMPLES = {
    0: ("shards RoPE's positions", load_model("tiny-gpt2"), dict(cp=2, zero_stage=3)),
    1: ("without dropout", _spec(name="tiny-llama-dropout", dropout=0.1), dict(cp=2, zero_stage=3)),
}

# index: (text, model)
REFERENCE_MODEL_EXAMPLES = {
    0: ("encoder-decoder", _spec(name="tiny-t5", encoder_layers=2, position_embedding="relative")),
    1: ("does not implement", _spec(name="tiny-alibi", position_embedding="alibi")),
}

# index: (text, model, TrainConfig fields, host)
CPU, CUDA, SIMULATED = Host(), Host(cuda=True), Host(simulated=True)
RUN_EXAMPLES = {
    0: ("--engine must be pytorch", TINY, dict(engine="deepspeed", zero_stage=2), CPU),
    1: ("--impl torchtitan is planned", TINY, dict(impl="torchtitan"), CPU),
    2: ("--paged-optimizer", TINY, dict(paged_optimizer=True, optimizer="adamw8bit"), CPU),
    3: ("bf16-mixed-fp32-grads is planned but not run", TINY, dict(precision="bf16-mixed-fp32-grads"), CPU),
    4: ("symmetric memory", TINY, dict(tp=2, sequence_parallel=True, compile=True, async_tp=True), CPU),
    5: ("context parallelism with data parallelism only", TINY, dict(gpus=4, cp=2, tp=2, zero_stage=3), CPU),
    6: ("grouped-query attention is not run on CUDA", TINY, dict(cp=2, zero_stage=3), CUDA),
    7: ("DDP (ddp, zero1) combines with neither", TINY, dict(gpus=4, tp=2, zero_stage=1), CPU),
    8: ("fp8-rowwise is run under FSDP2 alone", TINY, dict(precision="fp8-rowwise", tp=2, zero_stage=2), CPU),
    9: ("amp-bf16 with parameter offload", TINY, dict(zero_stage=3, offload="params", precision="amp-bf16"), CPU),
    10: ("fp32 adapters", TINY, dict(finetune="lora", zero_stage=3, lora_dtype="fp32"), CPU),
    11: ("a nf4 base under FSDP2", TINY, dict(finetune="qlora", zero_stage=2), CPU),
    12: ("with a bias", _spec(name="tiny-qwen", qkv_bias=True), dict(finetune="lora", lora_targets="q,v"), CPU),
    13: ("--optimizer-in-backward", TINY, dict(optimizer_in_backward=True), CPU),
    14: ("tied embeddings across pipeline stages", _spec(name="tiny-tied", tied_embeddings=True),
         dict(pp=2, grad_accum=2), CPU),
    15: ("tensor parallelism with tied embeddings", _spec(name="tiny-tied", tied_embeddings=True), dict(tp=2), CPU),
    16: ("learned position embeddings", _spec(name="tiny-learned", position_embedding="learned"),
         dict(tp=2, sequence_parallel=True), CPU),
    17: ("a simulated rank of pipeline x tensor", TINY, dict(gpus=4, tp=2, pp=2, grad_accum=2), SIMULATED),
    18: ("1F1B needs at least pp = 2 micro-batches per step, got 1", TINY, dict(pp=2, schedule="1f1b"), CPU),
    19: ("fp16-mixed loss scaling", TINY, dict(pp=2, grad_accum=2, precision="fp16-mixed"), CPU),
    20: ("tensor parallelism of an MoE", load_model("tiny-moe"), dict(gpus=2, tp=2, zero_stage=3), CPU),
    21: ("tensor parallelism of latent attention", _spec(name="tiny-mla", kv_lora_rank=32, qk_rope_head_dim=8,
                                                         head_dim=24, v_head_dim=16, num_kv_heads=8),
         dict(gpus=2, tp=2, zero_stage=3), CPU),
    22: ("tensor parallelism of per-head q/k norms", _spec(name="tiny-qwen3", qk_norm=True), dict(tp=2), CPU),
    23: ("HSDP's 2-D mesh", TINY, dict(gpus=4, zero_stage=3, dp_shard=2), CPU),
}


def _fields(fields: dict) -> dict:
    return {**dict(gpus=2, seq_len=SEQ), **fields}


@pytest.mark.parametrize("table, rules", [(LAYOUT_EXAMPLES, LAYOUT_RULES), (MODEL_EXAMPLES, MODEL_RULES),
                                          (REFERENCE_MODEL_EXAMPLES, REFERENCE_MODEL_RULES),
                                          (RUN_EXAMPLES, RUN_RULES)], ids=["layout", "model", "reference", "run"])
def test_every_rule_has_an_example(table, rules):
    """Each rule of each table has exactly one hand-written layout below (a new rule needs one),
    and the reasons are distinct (a reason names its rule)."""
    assert sorted(table) == list(range(len(rules)))
    every = [r.reason for r in (*ARCHITECTURE_RULES, *LAYOUT_RULES, *MODEL_RULES, *REFERENCE_MODEL_RULES, *RUN_RULES)]
    assert len(set(every)) == len(every)


ARCHITECTURE_EXAMPLES = {
    0: ("attention sinks", dict(attention_sinks=True)),
}


@pytest.mark.parametrize("index", range(len(ARCHITECTURE_RULES)))
def test_architecture_rule_is_reachable(index):
    """A model whose parameters are read but whose memory and time are not planned: plan (both
    modes) and run refuse it with exactly the rule's reason; the reference model builds an MoE
    and refuses latent attention and sinks with theirs."""
    from planner.inference import InferenceConfig, check_inference
    from strategies.model import Transformer

    assert sorted(ARCHITECTURE_EXAMPLES) == list(range(len(ARCHITECTURE_RULES)))
    text, how = ARCHITECTURE_EXAMPLES[index]
    rule = ARCHITECTURE_RULES[index]
    assert text in rule.reason
    model = load_model(how) if isinstance(how, str) else ModelSpec(
        name="m", **(load_model("tiny-llama").model_dump(exclude={"name"}) | how))
    expected = rule.reason.format(model=model, train=None)
    assert _one_line(expected) and architecture_refusal(model) == expected
    train = TrainConfig(gpus=1, seq_len=SEQ)
    assert model_refusal(model, train) == plan_refusal(model, train) == run_refusal(model, train) == expected
    with pytest.raises(LayoutError, match="^" + re.escape(expected) + "$"):
        check_layout(model, train)
    with pytest.raises(LayoutError, match="^" + re.escape(expected) + "$"):
        check_inference(model, InferenceConfig())
    assert reference_model_refusal(model) == expected
    with pytest.raises(ConfigError, match="^" + re.escape(expected) + "$"):
        Transformer(model, device="meta")


def test_an_moe_is_trained_and_served_and_mla_served_in_16_bits_on_one_gpu_per_stage():
    """A mixture of experts, with per-head q/k norms (Qwen3), latent attention (DeepSeek) or
    neither, is planned and run for training (planner/capabilities.py MOE_RULES) and served;
    latent attention's quantised weights, tensor parallelism and offload are refused in
    inference, each in one line (MLA_INFERENCE_RULES), and the layout search skips tp > 1."""
    from planner.capabilities import MLA_INFERENCE_RULES
    from planner.inference import InferenceConfig, check_inference, layouts
    from strategies.model import Transformer

    for name in ("tiny-moe", "tiny-qwen3-moe", "tiny-deepseek"):
        model = load_model(name)
        train = TrainConfig(gpus=1, seq_len=SEQ)
        assert plan_refusal(model, train) is None and run_refusal(model, train) is None
        Transformer(model, device="meta")
        check_inference(model, InferenceConfig())
    check_inference(load_model("qwen3-30b-a3b"), InferenceConfig())
    mla = load_model("tiny-deepseek")
    examples = [dict(weights="int8"), dict(gpus=2, tp=2), dict(offload="layers", swapped_layers=3)]
    assert len(examples) == len(MLA_INFERENCE_RULES)
    for rule, fields in zip(MLA_INFERENCE_RULES, examples):
        cfg = InferenceConfig(**fields)
        expected = rule.reason.format(model=mla, cfg=cfg)
        assert _one_line(expected) and "latent attention" in expected
        with pytest.raises(LayoutError, match="^" + re.escape(expected) + "$"):
            check_inference(mla, cfg)
    assert layouts(mla, 4, 8) == [(1, 4)]


@pytest.mark.parametrize("index", range(len(LAYOUT_RULES)))
def test_layout_rule_is_reachable(index, monkeypatch):
    """A layout the layout rule refuses: ``layout_refusal`` returns exactly its formatted reason,
    and ``TrainConfig`` raises it as a LayoutError (no other check of the layout fires first)."""
    text, fields = LAYOUT_EXAMPLES[index]
    rule = LAYOUT_RULES[index]
    assert text in rule.reason
    with pytest.raises(LayoutError) as exc:
        TrainConfig(**_fields(fields))
    monkeypatch.setattr("planner.configs.layout_refusal", lambda train: None)
    train = TrainConfig(**_fields(fields))  # everything else about the layout is valid
    expected = rule.reason.format(model=None, train=train)
    assert rule.when(train)
    assert layout_refusal(train) == expected and _one_line(expected)
    assert str(exc.value) == expected
    assert plan_refusal(TINY, train) == expected and run_refusal(TINY, train) == expected


@pytest.mark.parametrize("index", range(len(MODEL_RULES)))
def test_model_rule_is_reachable(index):
    """A model and layout the model rule refuses: ``model_refusal``, ``plan_refusal`` and
    ``run_refusal`` return exactly its formatted reason, and ``check_layout`` raises it."""
    text, model, fields = MODEL_EXAMPLES[index]
    rule = MODEL_RULES[index]
    assert text in rule.reason
    train = TrainConfig(**_fields(fields))
    expected = rule.reason.format(model=model, train=train)
    assert rule.when(model, train) and _one_line(expected)
    assert layout_refusal(train) is None
    assert model_refusal(model, train) == expected
    assert plan_refusal(model, train) == expected and run_refusal(model, train) == expected
    with pytest.raises(LayoutError) as exc:
        check_layout(model, train)
    assert str(exc.value) == expected
    assert model_refusal(TINY, train) is None  # the same layout of tiny-llama is modelled


@pytest.mark.parametrize("index", range(len(REFERENCE_MODEL_RULES)))
def test_reference_model_rule_is_reachable(index):
    """A model the reference model cannot build: ``reference_model_refusal`` and ``run_refusal``
    (of a plain one-GPU layout) return exactly the rule's reason, and building it raises it."""
    from strategies.model import Transformer

    text, model = REFERENCE_MODEL_EXAMPLES[index]
    rule = REFERENCE_MODEL_RULES[index]
    assert text in rule.reason
    expected = rule.reason.format(model=model, train=None)
    assert rule.when(model) and _one_line(expected)
    train = TrainConfig(gpus=1, seq_len=SEQ)
    check_layout(model, train)
    assert plan_refusal(model, train) is None  # plan models it
    assert reference_model_refusal(model) == expected
    assert run_refusal(model, train) == expected
    with pytest.raises(ConfigError) as exc:
        Transformer(model, device="meta")
    assert str(exc.value) == expected


@pytest.mark.parametrize("index", range(len(RUN_RULES)))
def test_run_rule_is_reachable(index):
    """A layout ``plan`` models and the run rule refuses on its host: ``run_refusal`` returns
    exactly the rule's formatted reason, and the strategy layer's ``check_runnable`` raises it."""
    from strategies.train import RunConfig, check_runnable

    text, model, fields, host = RUN_EXAMPLES[index]
    rule = RUN_RULES[index]
    assert text in rule.reason.format(model=model, train=TrainConfig(**_fields(fields)))
    train = TrainConfig(**_fields(fields))
    check_layout(model, train)
    assert plan_refusal(model, train) is None and reference_model_refusal(model) is None
    expected = rule.reason.format(model=model, train=train)
    assert rule.when(model, train, host) and _one_line(expected)
    assert run_refusal(model, train, cuda=host.cuda, simulated=host.simulated) == expected
    config = RunConfig(model=model, train=train, simulate_world=train.gpus if host.simulated else None)
    with pytest.raises(ConfigError) as exc:
        check_runnable(config, cuda=host.cuda)
    assert str(exc.value) == expected


def test_profile_recommend_keeps_compile_and_refuses_when_nothing_fits(monkeypatch):
    """``--compile`` reaches the candidates ``profile --recommend`` runs (it was dropped: the
    flag is the command's own parameter, not a shared option); and where no layout fits, the
    search's candidates are the closest layouts, which it does not run: exit 1 with the plan's
    reason."""
    from trainplan.cli import main

    launched: list = []
    monkeypatch.setattr("profiler.run.launch", _recording_launch(launched))
    result = CliRunner().invoke(main, ["profile", "--model", "tiny-llama", "--gpus", "2", "--seq-len", str(SEQ),
                                       "--recommend", "--candidates", "2", "--compile"])
    assert result.exit_code == 1, result.output
    assert launched and all(train.compile for train in launched)
    launched.clear()
    result = CliRunner().invoke(main, ["profile", "--model", "llama-3.1-405b", "--gpus", "2", "--gpu", "rtx-4090",
                                       "--seq-len", "4096", "--recommend"])
    assert result.exit_code == 1 and not launched, result.output
    assert result.stderr.strip().startswith("error: nothing fits: the closest layout"), result.stderr
    assert "Traceback" not in result.output


MOE = load_model("tiny-moe")
MLA = load_model("tiny-deepseek")
QWEN3_MOE = MOE.model_copy(update=dict(name="tiny-qwen3-moe", qk_norm=True, shared_expert_ffn_hidden_size=0))
# index: (a text of the rule's reason, the model, the TrainConfig fields it refuses)
MOE_EXAMPLES = {
    0: ("--impl megatron's MoE layer", MOE, dict(impl="megatron")),
    1: ("its DeepSeek-V3 attention (MLA) is not modelled", MLA, dict(impl="torchtitan")),
    2: ("torchtitan 0.3.0 does not ship", MOE, dict(impl="torchtitan")),
    3: ("torchtitan's expert-parallel token dispatcher", QWEN3_MOE, dict(impl="torchtitan-cpu", zero_stage=3, ep=2)),
    4: ("--engine deepspeed's expert sharding", MOE, dict(engine="deepspeed", zero_stage=2)),
    5: ("torch.compile of an MoE", MOE, dict(compile=True)),
    6: ("amp-bf16", MOE, dict(precision="amp-bf16")),
    7: ("on an MoE", MOE, dict(precision="fp8-rowwise", zero_stage=3)),
    8: ("LoRA with expert parallelism under --ac full", MOE, dict(finetune="lora", zero_stage=3, ep=2,
                                                                  activation_checkpointing="full")),
    9: ("--impl hf's is not modelled", MOE, dict(finetune="lora", impl="hf")),
    10: ("distillation with an MoE student", MOE, dict(teacher="tiny-llama")),
}
DENSE_MLA = _spec(name="tiny-mla", kv_lora_rank=32, qk_rope_head_dim=8, head_dim=24, v_head_dim=16, num_kv_heads=8)
MLA_EXAMPLES = {
    0: ("--impl hf --engine pytorch is not modelled", DENSE_MLA, dict(impl="hf")),
    1: ("with flash attention", MLA, dict(attention="eager")),
}


@pytest.mark.parametrize("table, rules", [(MOE_EXAMPLES, "MOE_RULES"), (MLA_EXAMPLES, "MLA_RULES")])
def test_every_moe_and_mla_rule_is_reachable(table, rules):
    """Each rule of what a mixture of experts or latent attention does not model has a layout
    that reaches it: ``plan_refusal`` and ``check_layout`` say exactly its reason."""
    from planner import capabilities

    rules = getattr(capabilities, rules)
    assert sorted(table) == list(range(len(rules)))
    for index, (text, model, fields) in table.items():
        train = TrainConfig(**_fields(fields))
        expected = rules[index].reason.format(model=model, train=train)
        assert text in expected, index
        assert _one_line(expected) and plan_refusal(model, train) == expected, index
        with pytest.raises(LayoutError, match="^" + re.escape(expected) + "$"):
            check_layout(model, train)
