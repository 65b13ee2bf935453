"""Finding models and GPUs by name: presets, size aliases, and Hugging Face ``config.json`` files.

Presets are JSON files in the ``presets`` package, each with a ``source``. Names are lowercase
with hyphens; size aliases (``7b`` -> ``llama-2-7b``) live in each preset's ``aliases`` list.
A model given as a path is read as a Hugging Face ``config.json`` without importing
transformers: the key styles of Llama, Mistral, Qwen2, GPT-2 and GPT-NeoX are understood.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from planner.configs import GPUSpec, ModelSpec
from planner.errors import ConfigError, ConfigFileError, UnknownPresetError, shown
from planner.inputs import read_json_object


@dataclass(frozen=True)
class Preset:
    id: str
    aliases: tuple[str, ...]
    raw: dict


@cache
def _load(kind: str) -> dict[str, Preset]:
    presets = {}
    for entry in sorted(resources.files("presets").joinpath(kind).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            raw = json.loads(entry.read_text())
            presets[raw["id"]] = Preset(raw["id"], tuple(raw.get("aliases", ())), raw)
    return presets


@cache
def _aliases(kind: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for preset in _load(kind).values():
        for name in (preset.id, *preset.aliases):
            if name in table and table[name] != preset.id:
                raise ConfigError(f"{kind} alias {name!r} names both {table[name]} and {preset.id}")
            table[name] = preset.id
    return table


def model_ids() -> list[str]:
    return list(_load("models"))


def gpu_ids() -> list[str]:
    return list(_load("gpus"))


def model_preset(preset_id: str) -> Preset:
    return _load("models")[preset_id]


def gpu_preset(preset_id: str) -> Preset:
    return _load("gpus")[preset_id]


def _resolve(kind: str, name: str, list_command: str) -> str:
    key = name.strip().lower().replace("_", "-")
    table = _aliases(kind)
    if key in table:
        return table[key]
    suggestions = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
    # Map alias suggestions back to ids, keeping order and removing duplicates.
    ids = list(dict.fromkeys(table[s] for s in suggestions))
    raise UnknownPresetError(kind.rstrip("s"), name, ids, list_command)


@cache
def _model_from_preset(preset_id: str) -> ModelSpec:
    raw = model_preset(preset_id).raw
    return ModelSpec(name=preset_id, source=raw["source"], **raw["spec"])


@cache
def _gpu_from_preset(preset_id: str) -> GPUSpec:
    return GPUSpec(**gpu_preset(preset_id).raw["spec"])


def _names_a_file(name: str) -> bool:
    try:
        return name.endswith(".json") or Path(name).exists()
    except OSError:  # a name too long to be a path, say: a preset name then
        return False


def load_model(name_or_path: str) -> ModelSpec:
    """A preset id, an alias, or a path to a Hugging Face ``config.json`` (or its folder)."""
    if _names_a_file(name_or_path):
        path = Path(name_or_path)
        try:
            folder = path.is_dir()
        except OSError as exc:  # a name too long for a path, say
            raise ConfigFileError(f"{shown(name_or_path)}: {exc.strerror or exc}") from None
        return model_from_hf_config(path / "config.json" if folder else path)
    return _model_from_preset(_resolve("models", name_or_path, "trainplan presets"))


def load_gpu(name_or_path: str) -> GPUSpec:
    """A preset id, an alias, or a JSON file in the presets' schema (``{"id": ..., "spec":
    {...}}``, as ``presets/gpus/*.json``; a bare ``spec`` object is accepted too)."""
    if _names_a_file(name_or_path):
        return gpu_from_file(Path(name_or_path))
    return _gpu_from_preset(_resolve("gpus", name_or_path, "trainplan presets"))


def gpu_preset_for_device(device_name: str) -> str | None:
    """The id of the preset whose GPU the driver names ``device_name`` (NVML's name), if any."""
    return next((preset_id for preset_id in gpu_ids() if _gpu_from_preset(preset_id).name == device_name), None)


def gpu_from_file(path: Path) -> GPUSpec:
    raw = read_json_object(path, "GPU file")
    spec = raw["spec"] if "spec" in raw else raw
    where = "spec." if "spec" in raw else ""
    if not isinstance(spec, dict):
        raise ConfigFileError(f"{shown(str(path))}: spec must be a JSON object of GPU settings")
    try:
        return GPUSpec(**spec)
    except ValidationError as exc:
        problems = "; ".join(f"{where}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigFileError(f"{shown(str(path))}: {problems} (see presets/gpus/*.json for the schema)") from None


# ---------------------------------------------------------------- Hugging Face config.json

class _BadField(Exception):
    pass


def _get(cfg: dict, kind: type, *keys: str, default=None, required: bool = False):
    """The first of ``keys`` present and not null, checked to be a ``kind`` (int: a JSON
    integer; float: any JSON number; bool: true or false; str: a string)."""
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, kind))
        if not ok:
            names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
            raise _BadField(f"{key} must be {names[kind]}, not {shown(json.dumps(value), 40)}")
        return value
    if required:
        raise _BadField(f"lacks {keys[0]!r}, which this kind of config needs")
    return default


def model_from_hf_config(path: Path) -> ModelSpec:
    """Reads a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/Qwen3, Gemma, Phi-3, GPT-2,
    GPT-NeoX styles);
    every field is checked for its type and range, and a bad one is named."""
    cfg = read_json_object(path, "model config file")
    return model_from_hf_dict(cfg, shown(str(path)), f"Hugging Face config {path}", Path(path).parent.name)


def model_from_hf_dict(cfg: dict, where: str, source: str, default_name: str = "") -> ModelSpec:
    """A ``config.json``'s contents (or a live model's ``model.config.to_dict()``) as a
    ModelSpec; ``where`` names it in errors. A family, activation, block layout or field the
    planner does not model is refused in one line naming it (``_audit``), never planned as
    another model."""
    try:
        model_type = _get(cfg, str, "model_type", default="").lower()
        name = _get(cfg, str, "_name_or_path", default="") or default_name or model_type or "custom"
        name = "".join(c for c in name if c.isprintable()) or "custom"  # no escape sequences in reports
        if model_type in _UNSUPPORTED:
            raise _BadField(f"model_type {model_type!r} is {_UNSUPPORTED[model_type]}, which trainplan does not model")
        experts = _expert_field(cfg) if model_type not in _MOE_FAMILIES else ""
        if experts:
            raise _BadField(f"{experts} makes it a mixture of experts, which trainplan reads only for "
                            f"{', '.join(sorted(_MOE_FAMILIES))}")
        if model_type not in _FAMILIES:
            known = ", ".join(sorted(_FAMILIES))
            raise _BadField(f"model_type {shown(model_type, 40) if model_type else '(none)'} is not a family trainplan "
                            f"models ({known}); its block layout would be guessed")
        unmodelled = _audit(cfg, model_type)
        if model_type == "gpt2":
            fields = _gpt2_fields(cfg)
        elif model_type == "gpt_neox":
            fields = _neox_fields(cfg)
        else:
            fields = _llama_fields(cfg, model_type)
        if model_type in _MOE_FAMILIES:
            moe_fields, notes = _moe_fields(cfg, model_type)
            fields |= moe_fields
            unmodelled += notes
    except _BadField as exc:
        raise ConfigFileError(f"{where}: {exc}") from None
    try:
        return ModelSpec(name=name[:200], source=source, unmodelled=unmodelled, **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigFileError(f"{where}: {loc}: {first['msg']}") from None
    except ConfigError as exc:
        raise ConfigFileError(f"{where}: {exc}") from None


# Architectures whose blocks trainplan's layer model does not describe (experts, state spaces).
_UNSUPPORTED = {"olmoe": "a mixture of experts not read yet", "phimoe": "a mixture of experts not read yet",
                "granitemoe": "a mixture of experts not read yet", "dbrx": "a mixture of experts not read yet",
                "llama4": "a mixture of experts with chunked and no-rope attention layers",
                "llama4_text": "a mixture of experts with chunked and no-rope attention layers",
                "mamba": "a state-space model", "mamba2": "a state-space model", "jamba": "a hybrid state-space model",
                "falcon_mamba": "a state-space model", "zamba": "a hybrid state-space model",
                "bert": "an encoder-only model", "roberta": "an encoder-only model", "t5": "an encoder-decoder",
                "phi": "a parallel attention + MLP block (phi-2)", "gptj": "a parallel attention + MLP block (GPT-J)",
                "falcon": "a parallel attention + MLP block (Falcon)"}

# The families read, as transformers' modeling code builds them (modeling_<type>.py): every field
# that changes a tensor's shape, the KV heads, the MLP's form or what is saved is read below, or
# refused or noted in ``_audit``.
_MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"}
_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox"} | _MOE_FAMILIES

# Fields that count experts, wherever a config puts them (Mixtral/gpt-oss/Phi-3.5-MoE/Granite-MoE/
# Llama 4: num_local_experts; Qwen2/3-MoE, OLMoE: num_experts; DeepSeek: n_routed_experts;
# DBRX: ffn_config.moe_num_experts; Arctic: num_local_experts).
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                "n_shared_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                "num_experts_per_token", "moe_topk", "router_top_k")

_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu",
          "gelu_fast": "geglu"}
_GELUS = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "quick_gelu"}


def _expert_field(cfg: dict, depth: int = 0) -> str:
    """The first field that counts experts (or sizes them), at the top level or in a nested
    config (``text_config``, ``ffn_config``); empty if none."""
    for key, value in cfg.items():
        if isinstance(value, dict) and depth < 2:
            inner = _expert_field(value, depth + 1)
            if inner:
                return f"{key}.{inner}"
        elif key in _EXPERT_KEYS and value not in (None, 0, False, [], {}):
            return f"{key} ({shown(json.dumps(value), 20)})"
    return ""


def _audit(cfg: dict, model_type: str) -> tuple[str, ...]:
    """Refuse (``_BadField``) what a family's config may say that the planner does not model;
    return notes for fields that change memory and are not modelled yet."""

    def flag(key: str) -> bool:
        return cfg.get(key) not in (None, False, 0, "", [], {})

    if model_type == "gpt2":
        act = _get(cfg, str, "activation_function", default="gelu_new")
        if act not in _GELUS:
            raise _BadField(f"activation_function {shown(act, 32)}: the planner models GELU MLPs for gpt2")
        if flag("add_cross_attention"):
            raise _BadField("add_cross_attention: GPT-2 with cross-attention layers is not modelled")
        return ()
    if model_type == "gpt_neox":
        act = _get(cfg, str, "hidden_act", default="gelu")
        if act not in _GELUS:
            raise _BadField(f"hidden_act {shown(act, 32)}: the planner models GELU MLPs for gpt_neox")
        if _get(cfg, bool, "use_parallel_residual", default=True):
            raise _BadField("use_parallel_residual: attention and MLP in parallel (x + attn(ln1(x)) + mlp(ln2(x))) "
                            "save different tensors than the sequential block the planner models")
        if _get(cfg, float, "rotary_pct", "partial_rotary_factor", default=1.0) != 1.0:
            raise _BadField("rotary_pct < 1: partial rotary embeddings are not modelled")
        return ()
    act = _get(cfg, str, "hidden_act", "hidden_activation", default="silu")
    if act not in _GATED or (model_type == "gemma") != (_GATED[act] == "geglu"):
        raise _BadField(f"hidden_act {shown(act, 32)}: the planner models {model_type} with "
                        f"{'GeGLU (gelu_pytorch_tanh)' if model_type == 'gemma' else 'SwiGLU (silu)'}")
    if _get(cfg, float, "partial_rotary_factor", default=1.0) != 1.0:
        raise _BadField("partial_rotary_factor < 1: partial rotary embeddings are not modelled")
    if _get(cfg, bool, "attention_bias", default=False) and not _get(cfg, bool, "mlp_bias", default=False):
        if model_type not in ("qwen2", "qwen2_moe", "gpt_oss"):
            raise _BadField("attention_bias without mlp_bias (a bias on o_proj, none in the MLP) is not modelled")
    for key in ("qk_layernorm", "use_qk_norm", "post_feedforward_layernorm", "use_post_norm",
                "attn_logit_softcapping", "final_logit_softcapping", "cross_attention_layers", "use_bidirectional"):
        if flag(key):
            raise _BadField(f"{key}: not part of the {model_type} blocks the planner models")
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(t in ("full_attention", "sliding_attention") for t in types):
            raise _BadField(f"layer_types {shown(json.dumps(types), 60)}: only full and sliding attention are read")
    window = _get(cfg, int, "sliding_window", default=0)
    sliding = window and (model_type != "qwen2" and model_type != "qwen3"
                          or _get(cfg, bool, "use_sliding_window", default=False))
    if sliding and (types is None or "sliding_attention" in types):
        return (f"sliding_window {window} is not modelled yet: the KV cache and attention FLOPs are planned as full "
                f"attention (more than a rolling cache holds)",)
    return ()


def _llama_fields(cfg: dict, model_type: str) -> dict:
    """Llama, Mistral, Qwen2, Qwen3, Gemma (1-3), Phi-3 and their kin: RMSNorm, RoPE, a gated
    MLP. Qwen3 adds q/k norms; Phi-3 fuses q, k, v into one projection (and gate, up into
    another, which saves the same bytes); Gemma ties the head and uses GeGLU."""
    act = _get(cfg, str, "hidden_act", "hidden_activation", default="silu")
    heads = _get(cfg, int, "num_attention_heads", required=True)
    return dict(
        num_layers=_get(cfg, int, "num_hidden_layers", required=True),
        hidden_size=_get(cfg, int, "hidden_size", required=True),
        num_heads=heads,
        num_kv_heads=_get(cfg, int, "num_key_value_heads", default=heads),
        head_dim=_get(cfg, int, "head_dim", default=0),
        ffn_hidden_size=_get(cfg, int, "intermediate_size", required=True),
        vocab_size=_get(cfg, int, "vocab_size", required=True),
        mlp=_GATED[act],
        norm="rmsnorm",
        position_embedding="rope",
        max_position_embeddings=_get(cfg, int, "max_position_embeddings", default=4096),
        tied_embeddings=_get(cfg, bool, "tie_word_embeddings", default=model_type.startswith("gemma")),
        # Qwen2 hard-codes bias on q, k, v (its config has no key for it); Llama says attention_bias.
        qkv_bias=_get(cfg, bool, "attention_bias", default=False) or model_type in ("qwen2", "qwen2_moe"),
        # gpt-oss: attention_bias puts a bias on q, k, v and o, and its experts always have biases
        linear_bias=(_get(cfg, bool, "mlp_bias", default=False) or model_type == "gpt_oss")
        and _get(cfg, bool, "attention_bias", default=False),
        dropout=float(_get(cfg, float, "attention_dropout", default=0.0)),
        fused_qkv=model_type == "phi3",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        activation=act[:32],
    )


def _moe_fields(cfg: dict, model_type: str) -> tuple[dict, tuple[str, ...]]:
    """The experts (and DeepSeek's latent attention) of the MoE families, as transformers 5.25
    builds them (modeling_<type>.py): which layers are MoE, the routed and shared experts, the
    router. Returns (fields, notes)."""
    layers = _get(cfg, int, "num_hidden_layers", required=True)
    fields: dict = {"experts_per_token": _get(cfg, int, "num_experts_per_tok", "experts_per_token", required=True)}
    notes: tuple[str, ...] = ()
    if model_type in ("mixtral", "gpt_oss"):
        # every layer is MoE; each expert is intermediate_size wide (MixtralExperts, GptOssExperts)
        fields |= dict(num_experts=_get(cfg, int, "num_local_experts", required=True),
                       moe_ffn_hidden_size=_get(cfg, int, "intermediate_size", required=True))
        if model_type == "gpt_oss":  # GptOssTopKRouter is a biased linear; GptOssAttention has sinks
            fields |= dict(router_bias=True, attention_sinks=True)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        # layer i is MoE unless in mlp_only_layers, and only if (i + 1) % decoder_sparse_step == 0
        step = _get(cfg, int, "decoder_sparse_step", default=1)
        only = cfg.get("mlp_only_layers") or []
        if step < 1 or not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in only):
            raise _BadField("decoder_sparse_step must be a positive integer and mlp_only_layers a list of layers")
        # Hub configs say num_experts; transformers 5.25's Qwen3MoeConfig.to_dict() num_local_experts
        fields |= dict(num_experts=_get(cfg, int, "num_experts", "num_local_experts", required=True),
                       moe_ffn_hidden_size=_get(cfg, int, "moe_intermediate_size", required=True),
                       dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step))
        shared = _get(cfg, int, "shared_expert_intermediate_size", default=0) if model_type == "qwen2_moe" else 0
        if shared:  # Qwen2MoeSparseMoeBlock: shared_expert and its sigmoid shared_expert_gate
            fields |= dict(shared_expert_ffn_hidden_size=shared, shared_expert_gate=True)
    else:  # deepseek_v2, deepseek_v3: layers from first_k_dense_replace on are MoE
        freq = _get(cfg, int, "moe_layer_freq", default=1)
        if freq != 1:
            raise _BadField(f"moe_layer_freq {freq}: transformers' DeepSeek makes every layer from "
                            f"first_k_dense_replace on MoE, DeepSeek's own code every {freq}-th: not modelled")
        if _get(cfg, bool, "attention_bias", default=False):
            raise _BadField("attention_bias: DeepSeek's latent attention with biases is not modelled")
        moe = _get(cfg, int, "moe_intermediate_size", required=True)
        nope = _get(cfg, int, "qk_nope_head_dim", required=True)
        rope = _get(cfg, int, "qk_rope_head_dim", required=True)
        fields |= dict(num_experts=_get(cfg, int, "n_routed_experts", required=True), moe_ffn_hidden_size=moe,
                       shared_expert_ffn_hidden_size=_get(cfg, int, "n_shared_experts", default=0) * moe,
                       dense_layers=tuple(range(min(_get(cfg, int, "first_k_dense_replace", default=0), layers))),
                       q_lora_rank=_get(cfg, int, "q_lora_rank", default=0),
                       kv_lora_rank=_get(cfg, int, "kv_lora_rank", required=True),
                       qk_rope_head_dim=rope, head_dim=nope + rope,
                       v_head_dim=_get(cfg, int, "v_head_dim", required=True))
        mtp = _get(cfg, int, "num_nextn_predict_layers", default=0)
        if mtp:
            notes += (f"num_nextn_predict_layers {mtp}: the multi-token-prediction layers are not built by "
                      f"transformers and not planned",)
    if not fields.get("num_experts"):
        raise _BadField(f"{model_type} without experts (num_experts 0) is not modelled: use its dense family")
    if not 1 <= fields["experts_per_token"] <= fields["num_experts"]:
        raise _BadField(f"num_experts_per_tok {fields['experts_per_token']} must be 1 to the number of experts "
                        f"({fields['num_experts']})")
    return fields, notes


def _gpt2_fields(cfg: dict) -> dict:
    hidden = _get(cfg, int, "n_embd", required=True)
    return dict(
        num_layers=_get(cfg, int, "n_layer", required=True),
        hidden_size=hidden,
        num_heads=_get(cfg, int, "n_head", required=True),
        ffn_hidden_size=_get(cfg, int, "n_inner", default=0) or 4 * hidden,
        vocab_size=_get(cfg, int, "vocab_size", required=True),
        mlp="gelu",
        norm="layernorm",
        position_embedding="learned",
        max_position_embeddings=_get(cfg, int, "n_positions", "n_ctx", default=1024),
        tied_embeddings=_get(cfg, bool, "tie_word_embeddings", default=True),
        linear_bias=True,
        dropout=float(_get(cfg, float, "resid_pdrop", default=0.0)),
        fused_qkv=True,
        activation=_get(cfg, str, "activation_function", default="gelu_new")[:32],
    )


def _neox_fields(cfg: dict) -> dict:
    return dict(
        num_layers=_get(cfg, int, "num_hidden_layers", required=True),
        hidden_size=_get(cfg, int, "hidden_size", required=True),
        num_heads=_get(cfg, int, "num_attention_heads", required=True),
        ffn_hidden_size=_get(cfg, int, "intermediate_size", required=True),
        vocab_size=_get(cfg, int, "vocab_size", required=True),
        mlp="gelu",
        norm="layernorm",
        position_embedding="rope",
        max_position_embeddings=_get(cfg, int, "max_position_embeddings", default=2048),
        tied_embeddings=_get(cfg, bool, "tie_word_embeddings", default=False),
        linear_bias=_get(cfg, bool, "attention_bias", default=True),
        dropout=float(_get(cfg, float, "hidden_dropout", default=0.0)),
        fused_qkv=True,
        activation=_get(cfg, str, "hidden_act", default="gelu")[:32],
    )
