"""Granite MoE record (`granitemoeshared`): its oracle cases (muP's attention, embedding, residual and logits
multipliers, attention biases, top-k-then-softmax router, the released fused-expert names), greedy generate()
and what it refuses (the fused shared MLP is not converted yet)."""

from __future__ import annotations

import pytest
from transformers import GraniteMoeSharedConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, TOL, Case
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


def test_refusals() -> None:
    with pytest.raises(ValueError, match="shared_intermediate_size"):
        config_to_moe(CASES["granitemoeshared_mup"].config(shared_intermediate_size=16))
    gr = config_to_moe(CASES["granitemoeshared_mup"].config())
    for family in ("mixtral", "qwen3_moe"):  # no muP multipliers
        with pytest.raises(ValueError, match="multiplier|logits_scaling|attention_bias|qk_norm"):
            config_from_moe(gr, family)
    gr.attention_bias = gr.attention_out_bias = False
    with pytest.raises(ValueError, match="attention_multiplier"):
        config_from_moe(gr, "mixtral")
    mixtral = config_to_moe(MIXTRAL["mixtral"].config(sliding_window=None))
    assert config_from_moe(mixtral, "granitemoeshared").attention_multiplier == mixtral.head_dim ** -0.5
