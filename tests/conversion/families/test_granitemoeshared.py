"""Granite MoE record (`granitemoeshared`): its oracle cases (muP's attention, embedding, residual and logits
multipliers, attention biases, top-k-then-softmax router, the released fused-expert names, the shared MLP whose
fused [gate; up] `input_linear` is split and re-fused), greedy generate() and what it refuses."""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteMoeSharedConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_from_moe, state_dict_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.oracle import TINY, TOL, Case, family_model
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation, converted_logit_diff
from tests.conversion.families.test_mixtral import CASES as MIXTRAL

#: released names: fused experts as block_sparse_moe.input_linear / output_linear, the router as router.layer
NAMING = ("mlp", ("gate_proj", "up_proj", "down_proj"), (
    (".block_sparse_moe.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight"),
    (".block_sparse_moe.experts.down_proj", ".block_sparse_moe.output_linear.weight"),
    (".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight")))  # fmt: skip
MUP = dict(attention_multiplier=0.11, embedding_multiplier=3.0, residual_multiplier=0.6, logits_scaling=2.5)
GRANITE = dict(TINY, num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
CASES = {
    "granitemoeshared_mup": Case(GraniteMoeSharedConfig, dict(GRANITE, attention_bias=True, **MUP), True, NAMING),
    "granitemoeshared_tied": Case(GraniteMoeSharedConfig, dict(GRANITE, tie_word_embeddings=True), False, NAMING),
    # the shared MLP (fused input_linear), with muP and biases elsewhere
    "granitemoeshared_shared": Case(GraniteMoeSharedConfig, dict(GRANITE, attention_bias=True, shared_intermediate_size=24,
                                                                 **MUP), True, NAMING),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    gr = config_to_moe(CASES["granitemoeshared_mup"].config())
    assert (gr.attention_multiplier, gr.embedding_multiplier, gr.residual_multiplier, gr.logits_scaling) == (
        0.11, 3.0, 0.6, 2.5)
    assert gr.topk_before_softmax and gr.attention_out_bias


@pytest.mark.parametrize("knob", sorted(MUP))
def test_each_multiplier_matters(knob: str) -> None:
    """Each muP multiplier alone moves the logits, and is converted exactly."""
    case = CASES["granitemoeshared_tied"]._replace(fields=dict(GRANITE, **{knob: MUP[knob]}))
    assert converted_logit_diff(case) < TOL
    moe = config_to_moe(case.config())
    default = config_to_moe(CASES["granitemoeshared_tied"].config())
    assert getattr(moe, knob) != getattr(default, knob)


def test_fused_shared_mlp_is_split_and_fused_back() -> None:
    """input_linear (2S, H) = [gate; up]: its halves are our shared expert's gate and up rows, re-fused on export."""
    theirs, config = family_model(CASES["granitemoeshared_shared"])
    moe_config = config_to_moe(config)
    assert (moe_config.n_shared_experts, moe_config.shared_intermediate_size, moe_config.shared_expert_gate) == (
        1, 24, False)
    state = theirs.state_dict()
    ours = state_dict_to_moe("granitemoeshared", state, moe_config)
    fused, prefix = state["model.layers.0.shared_mlp.input_linear.weight"], "model.layers.0.mlp.shared_experts."
    assert fused.shape == (48, 64)
    assert torch.equal(ours[prefix + "gate_proj.weight"], fused[:24]) and torch.equal(ours[prefix + "up_proj.weight"], fused[24:])
    back = state_dict_from_moe("granitemoeshared", ours, moe_config)
    assert torch.equal(back["model.layers.0.shared_mlp.input_linear.weight"], fused)
    assert config_from_moe(moe_config, "granitemoeshared").shared_intermediate_size == 24


def test_refusals() -> None:
    shared = config_to_moe(CASES["granitemoeshared_shared"].config())
    with pytest.raises(ValueError, match="shared_expert_gate"):
        config_from_moe(MoEConfig(**{**shared.to_dict(), "shared_expert_gate": True}), "granitemoeshared")
    gr = config_to_moe(CASES["granitemoeshared_mup"].config())
    for family in ("mixtral", "qwen3_moe"):  # no muP multipliers
        with pytest.raises(ValueError, match="multiplier|logits_scaling|attention_bias|qk_norm"):
            config_from_moe(gr, family)
    gr.attention_bias = gr.attention_out_bias = False
    with pytest.raises(ValueError, match="attention_multiplier"):
        config_from_moe(gr, "mixtral")
    mixtral = config_to_moe(MIXTRAL["mixtral"].config(sliding_window=None))
    assert config_from_moe(mixtral, "granitemoeshared").attention_multiplier == mixtral.head_dim ** -0.5
