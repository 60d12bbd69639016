"""FlexOlmo record (`flex_olmo`): its oracle cases (RMSNorm on each sub-layer's output, q/k norm over the whole
projection, attention biases, OLMoE's router), greedy generate() and what it refuses."""

from __future__ import annotations

import pytest
from transformers import FlexOlmoConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, Case
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation
from tests.conversion.families.test_olmoe import CASES as OLMOE

FLEX = dict(TINY, num_key_value_heads=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
            eos_token_id=2)  # fmt: skip
CASES = {
    "flex_olmo_bias": Case(FlexOlmoConfig, dict(FLEX, attention_bias=True, norm_topk_prob=False), True),
    "flex_olmo_renormalised_tied": Case(FlexOlmoConfig, dict(FLEX, norm_topk_prob=True, tie_word_embeddings=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    flex = config_to_moe(CASES["flex_olmo_bias"].config())
    assert (flex.sublayer_norm, flex.qk_norm, flex.attention_out_bias) == ("post", "full", True)


def test_export_refuses_what_the_family_cannot_express() -> None:
    flex = config_to_moe(CASES["flex_olmo_bias"].config())
    with pytest.raises(ValueError, match="sublayer_norm"):  # OLMoE is pre-norm
        config_from_moe(flex, "olmoe")
    with pytest.raises(ValueError, match="sublayer_norm"):
        config_from_moe(config_to_moe(OLMOE["olmoe"].config(clip_qkv=None)), "flex_olmo")
