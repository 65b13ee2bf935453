"""The reference model is the planner's model: same tensors, same names, same counts."""

from __future__ import annotations

import pytest

from planner.capabilities import reference_model_refusal
from planner.catalog import load_model, model_ids
from planner.errors import ConfigError
from planner.params import named_shapes, total_params
from strategies.model import build_model, canonical_name

RUNNABLE = [m for m in model_ids() if reference_model_refusal(load_model(m)) is None]  # mixtures of experts too


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


def test_the_reference_mixture_of_experts_routes_every_token_to_its_top_k():
    """strategies/model.py MoE on tiny-moe (fp32, CPU): each token's output is the sum over its
    top-k experts of the renormalised router weight times that expert's SwiGLU, plus the shared
    expert -- computed token by token here; and every chosen expert gets a gradient."""
    import torch
    import torch.nn.functional as F

    from strategies.model import MoE, materialize

    spec = load_model("tiny-moe")
    model = materialize(build_model(spec, "meta"), "cpu", seed=1)
    moe = model.layers["1"].mlp
    assert isinstance(moe, MoE) and not isinstance(model.layers["0"].mlp, MoE)  # layer 0 is dense
    x = torch.randn(2, 5, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    out = moe(x)
    e = moe.experts
    for b in range(2):
        for s in range(5):
            t = x[b, s]
            probs = F.softmax(moe.router(t).float(), dim=-1)
            w, ids = probs.topk(spec.experts_per_token)
            w = w / w.sum()
            expected = sum(w[j] * F.linear(F.silu(F.linear(t, e["gate"].weight[i])) * F.linear(t, e["up"].weight[i]),
                                           e["down"].weight[i]) for j, i in enumerate(ids.tolist()))
            expected = expected + moe.shared(t)
            torch.testing.assert_close(out[b, s], expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    chosen = set(F.softmax(moe.router(x.reshape(-1, spec.hidden_size)).float(), -1).topk(2).indices.flatten().tolist())
    used = {i for i in range(spec.num_experts) if e["gate"].weight.grad[i].abs().sum() > 0}
    assert used == chosen
