"""Solar Open record (`solar_open`): its oracle cases (GLM-4.5's MoE block on every layer, q/k/v biases, partial
rotary refused), greedy generate() and what it refuses."""

from __future__ import annotations

import pytest
from transformers import SolarOpenConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, Case
from tests.conversion.families.test_glm4_moe import CASES as GLM4_MOE
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation

SOLAR = dict(TINY, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
             num_experts_per_tok=3)  # fmt: skip
CASES = {
    "solar_open_bias_groups": Case(SolarOpenConfig, dict(
        SOLAR, attention_bias=True, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5), True),
    "solar_open_head_dim_tied": Case(SolarOpenConfig, dict(
        SOLAR, head_dim=32, n_shared_experts=2, norm_topk_prob=False, tie_word_embeddings=True), False),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    solar = config_to_moe(CASES["solar_open_head_dim_tied"].config())
    assert (solar.first_k_dense_replace, solar.head_dim, solar.attention_out_bias) == (0, 32, False)
    partial = dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="rope_parameters"):
        config_to_moe(CASES["solar_open_head_dim_tied"].config(rope_parameters=partial))


def test_export_refuses_what_the_family_cannot_express() -> None:
    glm = config_to_moe(GLM4_MOE["glm4_moe_partial_rotary"].config())  # a dense first layer, q/k norm
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        config_from_moe(glm, "solar_open")
    glm.first_k_dense_replace = 0
    with pytest.raises(ValueError, match="qk_norm"):
        config_from_moe(glm, "solar_open")
    glm.qk_norm = None
    with pytest.raises(ValueError, match="rope_parameters"):
        config_from_moe(glm, "solar_open")
