"""Layer kinds as data (planner/params.py LayerKind): a model is a sequence of block kinds, and
a pipeline stage that spans T5's encoder/decoder boundary counts each of its layers at its own
kind -- activations, the layer moments, recompute FLOPs and step time (CPM-2: 24 encoder and 24
decoder blocks, Zhang et al. 2021; three stages of 16 put layers 16-23 (encoder) and 24-31
(decoder) on stage 1)."""

from __future__ import annotations

import pytest

from planner import activations as act
from planner.catalog import load_model
from planner.configs import TrainConfig
from planner.flops import rank_attention_flops, stage_flops, unit_flops
from planner.memory import _act_sums, _model_states, _stage_activations, _stage_params
from planner.params import layer_kind, layer_kind_at, layer_stack, layer_tensors, pipeline_stages

CPM2 = load_model("cpm-2")


def _train(**fields) -> TrainConfig:
    base = dict(gpus=3, pp=3, micro_batch=1, global_batch=3, seq_len=1024, zero_stage=0)
    return TrainConfig(**(base | fields))


def test_kinds_of_an_encoder_decoder_and_a_decoder_only_model():
    """T5's encoder attends unmasked and once; its decoder masks its self-attention and attends
    to the encoder's output too (Raffel et al. 2020); a decoder-only block attends once, masked."""
    assert layer_stack(CPM2) == (("encoder", 24), ("decoder", 24))
    encoder, decoder = layer_kind(CPM2, "encoder"), layer_kind(CPM2, "decoder")
    assert (encoder.attentions, encoder.causal, encoder.generates) == (("attn",), False, False)
    assert (decoder.attentions, decoder.causal, decoder.generates) == (("attn", "cross"), True, True)
    assert decoder.unmasked_attention == 3 / 4 and encoder.unmasked_attention == 1.0
    llama = load_model("tiny-llama")
    assert layer_stack(llama) == (("decoder", llama.num_layers),)
    assert layer_kind(llama, "decoder").attentions == ("attn",) and layer_kind(llama, "decoder").unmasked_attention == 0.5
    assert [layer_kind_at(CPM2, i) for i in (0, 23, 24, 47)] == ["encoder", "encoder", "decoder", "decoder"]
    # the tensors follow the kind: a norm and q, k, v, o per attention sub-layer
    sublayers = {t.sublayer for t in layer_tensors(CPM2, "decoder") if t.role == "projection"}
    assert sublayers == {"attn", "cross", "mlp"}
    with pytest.raises(ValueError, match="no layer kind"):
        layer_kind(CPM2, "mamba")


def test_a_stage_across_the_boundary_counts_each_layer_at_its_kind():
    stage = pipeline_stages(CPM2, 3)[1]
    assert stage.layer_kinds == ("encoder",) * 8 + ("decoder",) * 8
    for policy in ("none", "full", "layer:2", "selective"):
        train = _train(activation_checkpointing=policy)
        sums = _act_sums(CPM2, act.ActivationInputs.of(train))
        enc, dec = sums.layers["encoder"], sums.layers["decoder"]
        assert dec.no_recompute > enc.no_recompute  # cross-attention saves more
        sp = _stage_params(CPM2, 3, 1, 1, 1, 0, "pytorch", 1)
        acts = _stage_activations(CPM2, train, 1, sp, sums, None)
        if policy == "layer:2":  # layers 17, 19, ..., 31 keep their input only
            layers = 4 * (enc.saved + dec.saved) + 8 * sums.layer_input
        else:
            layers = 8 * (enc.saved + dec.saved)
        assert acts.layers == layers + sums.pipeline_output_inner
        # the backward starts with the stage's last layer (a decoder block), ends with its first (an encoder's)
        assert acts.last.saved == (sums.layer_input if policy == "layer:2" else dec.saved)
        assert acts.first.saved == enc.saved
        if policy == "full":
            assert acts.last.recomputed == dec.no_recompute - sums.layer_input
            assert acts.first.recomputed == enc.no_recompute - sums.layer_input
        assert acts.largest_saved == dec.saved
        assert _model_states(CPM2, train, sp).sp is sp


def test_recompute_flops_of_a_boundary_stage_are_per_kind():
    """layer:2 on stage 1 recomputes layers 17, 19, 21, 23 (encoder) and 25, ..., 31 (decoder)."""
    train = _train(activation_checkpointing="layer:2")
    f = stage_flops(CPM2, train, 1)
    encoder, decoder = unit_flops(CPM2, train, "encoder"), unit_flops(CPM2, train, "decoder")
    assert f.recompute == 4 * encoder.forward + 4 * decoder.forward
    assert f.forward == 8 * encoder.forward + 8 * decoder.forward
    # an encoder block's attention is unmasked and single; a decoder's self half-masked plus cross
    square = 4 * 1024 * 1024 * CPM2.num_heads * CPM2.head_dim
    assert rank_attention_flops(CPM2, _train(attention="flash"), "encoder") == square
    assert rank_attention_flops(CPM2, _train(attention="flash"), "decoder") == 2 * square * 3 / 4


def test_step_time_charges_each_kind_its_attention_and_collectives():
    """Stage 0 of a 4-stage CPM-2 holds encoder blocks only: its attention runs unmasked, once
    per block, and Megatron's all-reduces are two per block (attention, MLP); a decoder stage's
    three (self-attention, cross-attention, MLP). The decoder stages are the slower ones."""
    from planner.catalog import load_gpu
    from planner.step_time import _stage_collectives, _stage_compute, _step_context

    gpu = load_gpu("h100-sxm-80gb")
    train = TrainConfig(gpus=8, tp=2, pp=4, micro_batch=1, global_batch=8, seq_len=1024, zero_stage=0,
                        sequence_parallel=False)
    ctx = _step_context(CPM2, gpu, train, None, None)
    encoder_stage, decoder_stage = (_stage_compute(CPM2, gpu, train, ctx, i) for i in (0, 3))
    enc_tp = _stage_collectives(CPM2, train, ctx, encoder_stage).tp_s
    dec_tp = _stage_collectives(CPM2, train, ctx, decoder_stage).tp_s
    assert dec_tp == pytest.approx(enc_tp * 3 / 2)
    assert decoder_stage.compute > encoder_stage.compute
