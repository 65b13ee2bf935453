"""Parameter counts of every preset against the published counts."""

from __future__ import annotations

import pytest

from planner import catalog
from planner.configs import ModelSpec
from planner.params import (
    fsdp_shard_numel,
    greedy_partition_max,
    named_shapes,
    pipeline_stages,
    split_layers,
    total_params,
)

PUBLISHED = [m for m in catalog.model_ids() if catalog.model_preset(m).raw["published_params"]]


@pytest.mark.parametrize("model_id", PUBLISHED)
def test_preset_parameter_count_equals_published(model_id):
    """Each preset's exact count equals the count its ``published_params.source`` states
    (Hugging Face safetensors metadata / model cards; for GPT-3 and CPM-2 only rounded
    counts exist -- 175.0B in Brown et al. 2020 Table 2.1, 11B in Zhang et al. 2021 -- so the
    test allows their rounding)."""
    published = catalog.model_preset(model_id).raw["published_params"]
    count = total_params(catalog.load_model(model_id))
    if published["exact"]:
        assert count == published["count"]
    else:
        assert abs(count - published["count"]) / published["count"] <= published["rel_tol"]


def test_issue_examples_exact():
    """The counts the issue quotes: llama-2-7b 6,738,415,616; llama-3-8b 8,030,261,248; gpt2 124,439,808."""
    assert total_params(catalog.load_model("llama-2-7b")) == 6_738_415_616
    assert total_params(catalog.load_model("llama-3-8b")) == 8_030_261_248
    assert total_params(catalog.load_model("gpt2")) == 124_439_808


def test_every_preset_has_a_source():
    for model_id in catalog.model_ids():
        assert catalog.model_preset(model_id).raw["source"]
    for gpu_id in catalog.gpu_ids():
        assert catalog.load_gpu(gpu_id).source


def test_named_shapes_sum_to_count():
    spec = catalog.load_model("gpt2")
    shapes = named_shapes(spec)
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    assert total == total_params(spec)
    assert shapes["layers.0.attn.q.weight"] == (768, 768)
    assert "head.weight" not in shapes  # tied to embed.weight


def test_split_layers_gives_remainder_to_first_stages():
    assert split_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_pipeline_stages_hold_embedding_first_head_last_and_tied_copy():
    spec = catalog.load_model("gpt2")
    stages = pipeline_stages(spec, 4)
    assert stages[0].has_embedding and not stages[0].has_head
    assert stages[-1].has_head and not stages[-1].has_embedding
    # tied embeddings across stages: the last stage holds a copy of the (vocab x hidden) matrix
    names = [t.name for u in stages[-1].units for t in u.tensors]
    assert "head.weight" in names


def test_fsdp_padding_matches_torch_chunk_rule():
    """FSDP2 pads dim 0 to a multiple of the world size (torch/distributed/fsdp/_fully_shard/
    _fsdp_param.py: ``padded_sharded_size = chunks[0].size()``): 50257 rows over 8 ranks ->
    6283 rows each."""
    assert fsdp_shard_numel([(50257, 768)], 8) == 6283 * 768
    assert fsdp_shard_numel([(768,)], 5) == 154


def test_greedy_partition_is_zero_redundancy_optimizers():
    """ZeroRedundancyOptimizer._partition_parameters: sorted by size, each to the least-loaded rank."""
    assert greedy_partition_max([(10,), (9,), (8,), (1,)], 2) == 17  # 10+1 | 9+8
    assert greedy_partition_max([(4,), (4,), (4,), (4,)], 4) == 4


def test_gqa_and_bias_counts():
    spec = ModelSpec(name="t", num_layers=1, hidden_size=64, num_heads=8, num_kv_heads=2, ffn_hidden_size=128,
                     vocab_size=100, qkv_bias=True)
    # embed 6400 + head 6400 + final norm 64 + layer: q 4096+64, k,v 1024+16 each, o 4096,
    # mlp 3*64*128, norms 128
    layer = (4096 + 64) + 2 * (1024 + 16) + 4096 + 3 * 64 * 128 + 128
    assert total_params(spec) == 6400 * 2 + 64 + layer


def test_every_tensor_has_a_role_from_the_inventory():
    """Issue 22: roles come from the inventory (planner/params.py), which is the one place that
    reads parameter names; fully qualified names (strategies/model.py) describe alike."""
    import pytest

    from planner.catalog import load_model
    from planner.params import ROLES, describe, model_units, named_shapes

    for name in ("tiny-llama", "tiny-gpt2", "cpm-2", "bloom-176b", "qwen1.5-7b"):
        spec = load_model(name)
        for unit in model_units(spec):
            for t in unit.tensors:
                assert t.role in ROLES, t.name
                assert (t.block_projection is not None) == (t.role == "projection" and not t.bias)
        for fq in named_shapes(spec):
            assert describe(fq)[0] in ROLES, fq
    assert describe("layers.3.attn.q.lora_b.weight") == ("lora_b", "attn", "q", False)
    assert describe("mlp.down.bias") == ("projection", "mlp", "down", True)
    assert describe("cross.rel_bias.weight")[0] == "relative_bias"
    with pytest.raises(ValueError, match="not a parameter"):
        describe("attn.q.weight_int8")
