"""The reference model is the planner's model: same tensors, same names, same counts."""

from __future__ import annotations

import pytest

from planner.catalog import load_model, model_ids
from planner.errors import ConfigError
from planner.params import named_shapes, total_params
from strategies.model import build_model, canonical_name

RUNNABLE = [m for m in model_ids() if load_model(m).encoder_layers == 0
            and load_model(m).position_embedding in ("rope", "learned") and not load_model(m).is_moe]


@pytest.mark.parametrize("model_id", RUNNABLE)
def test_reference_model_matches_planner_inventory(model_id):
    """Built on the meta device (no memory), every parameter's name and shape equals the
    planner's inventory, so the count equals the published count tested in test_params."""
    spec = load_model(model_id)
    model = build_model(spec, "meta")
    shapes = {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == named_shapes(spec)
    assert sum(p.numel() for p in model.parameters()) == total_params(spec)


def test_unsupported_architectures_say_so():
    with pytest.raises(ConfigError, match="encoder-decoder"):
        build_model(load_model("cpm-2"), "meta")
    with pytest.raises(ConfigError, match="alibi"):
        build_model(load_model("bloom-176b"), "meta")


def test_canonical_names_strip_wrappers():
    assert canonical_name("module.layers.0._checkpoint_wrapped_module.attn.q.weight") == "layers.0.attn.q.weight"
    assert canonical_name("_orig_mod.embed.weight") == "embed.weight"
