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
from planner.errors import ConfigError, ConfigFileError, UnknownPresetError


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


def load_model(name_or_path: str) -> ModelSpec:
    """A preset id, an alias, or a path to a Hugging Face ``config.json``."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file() or path.is_dir():
        return model_from_hf_config(path / "config.json" if path.is_dir() else path)
    return _model_from_preset(_resolve("models", name_or_path, "trainplan presets"))


def load_gpu(name_or_path: str) -> GPUSpec:
    """A preset id, an alias, or a JSON file in the presets' schema (``{"id": ..., "spec":
    {...}}``, as ``presets/gpus/*.json``; a bare ``spec`` object is accepted too)."""
    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        return gpu_from_file(Path(name_or_path))
    return _gpu_from_preset(_resolve("gpus", name_or_path, "trainplan presets"))


def gpu_preset_for_device(device_name: str) -> str | None:
    """The id of the preset whose GPU the driver names ``device_name`` (NVML's name), if any."""
    return next((preset_id for preset_id in gpu_ids() if _gpu_from_preset(preset_id).name == device_name), None)


def gpu_from_file(path: Path) -> GPUSpec:
    raw = _read_json_object(path, "GPU file")
    spec = raw["spec"] if "spec" in raw else raw
    where = "spec." if "spec" in raw else ""
    if not isinstance(spec, dict):
        raise ConfigFileError(f"{path}: spec must be a JSON object of GPU settings")
    try:
        return GPUSpec(**spec)
    except ValidationError as exc:
        problems = "; ".join(f"{where}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigFileError(f"{path}: {problems} (see presets/gpus/*.json for the schema)") from None


def _read_json_object(path: Path, what: str) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigFileError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path} must hold a JSON object")
    return raw


# ---------------------------------------------------------------- Hugging Face config.json

_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}


def _first(cfg: dict, *keys: str, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def model_from_hf_config(path: Path) -> ModelSpec:
    """Reads a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX styles)."""
    cfg = _read_json_object(path, "model config file")
    model_type = str(cfg.get("model_type", "")).lower()
    name = cfg.get("_name_or_path") or Path(path).parent.name or model_type or "custom"
    try:
        if model_type == "gpt2" or "n_embd" in cfg:
            fields = _gpt2_fields(cfg)
        elif model_type == "gpt_neox" or "rotary_pct" in cfg or "use_parallel_residual" in cfg:
            fields = _neox_fields(cfg)
        else:
            fields = _llama_fields(cfg, model_type)
    except KeyError as exc:
        raise ConfigFileError(f"{path} lacks {exc.args[0]!r}, which a {model_type or 'model'} config needs") from None
    try:
        return ModelSpec(name=str(name), source=f"Hugging Face config {path}", **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigFileError(f"{path}: {where}: {first['msg']}") from None
    except ConfigError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None


def _llama_fields(cfg: dict, model_type: str) -> dict:
    act = str(_first(cfg, "hidden_act", "hidden_activation", default="silu"))
    heads = cfg["num_attention_heads"]
    return dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=heads,
        num_kv_heads=_first(cfg, "num_key_value_heads", default=heads),
        head_dim=_first(cfg, "head_dim", default=0),
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        mlp=_GATED_ACTS.get(act, "swiglu"),
        norm="rmsnorm",
        position_embedding="rope",
        max_position_embeddings=_first(cfg, "max_position_embeddings", default=4096),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 hard-codes bias on q, k, v (its config has no key for it); Llama says attention_bias.
        qkv_bias=bool(cfg.get("attention_bias", False)) or model_type in ("qwen2", "qwen2_moe"),
        linear_bias=bool(cfg.get("mlp_bias", False)) and bool(cfg.get("attention_bias", False)),
        dropout=float(_first(cfg, "attention_dropout", default=0.0) or 0.0),
    )


def _gpt2_fields(cfg: dict) -> dict:
    hidden = cfg["n_embd"]
    return dict(
        num_layers=cfg["n_layer"],
        hidden_size=hidden,
        num_heads=cfg["n_head"],
        ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
        vocab_size=cfg["vocab_size"],
        mlp="gelu",
        norm="layernorm",
        position_embedding="learned",
        max_position_embeddings=_first(cfg, "n_positions", "n_ctx", default=1024),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        linear_bias=True,
        dropout=float(_first(cfg, "resid_pdrop", default=0.0) or 0.0),
    )


def _neox_fields(cfg: dict) -> dict:
    return dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        mlp="gelu",
        norm="layernorm",
        position_embedding="rope",
        max_position_embeddings=_first(cfg, "max_position_embeddings", default=2048),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        linear_bias=bool(cfg.get("attention_bias", True)),
        dropout=float(_first(cfg, "hidden_dropout", default=0.0) or 0.0),
    )
