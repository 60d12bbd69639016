"""GLM-4.7-Flash record (`glm4_moe_lite`): its oracle cases (MLA with q-LoRA, dense then MoE layers listed per
layer), greedy generate() and what it refuses."""

from __future__ import annotations

import pytest
from transformers import Glm4MoeLiteConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import MLA, TINY, TOL, Case
from tests.conversion.families.test_deepseek_v3 import CASES as DEEPSEEK_V3
from tests.conversion.families.test_glm4_moe import CASES as GLM4_MOE
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation, converted_logit_diff

CASES = {
    "glm4_moe_lite_qlora": Case(Glm4MoeLiteConfig, dict(
        TINY, **MLA, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=1.8,
        norm_topk_prob=True, attention_bias=True, mlp_layer_types=["dense", "sparse", "sparse"]), True),
    "glm4_moe_lite_no_qlora": Case(Glm4MoeLiteConfig, dict(
        TINY, **MLA, q_lora_rank=None, n_shared_experts=2, norm_topk_prob=False, rope_interleave=False,
        mlp_layer_types=["dense", "dense", "sparse"], tie_word_embeddings=True), False),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    lite = config_to_moe(CASES["glm4_moe_lite_no_qlora"].config())
    assert (lite.attention_type, lite.scoring_func, lite.first_k_dense_replace, lite.rope_interleave) == (
        "mla", "sigmoid", 2, False)
    assert config_to_moe(CASES["glm4_moe_lite_qlora"].config(num_nextn_predict_layers=1)).num_nextn_predict_layers == 1


def test_refusals() -> None:
    with pytest.raises(ValueError, match="mlp_layer_types"):
        config_to_moe(CASES["glm4_moe_lite_qlora"].config(mlp_layer_types=["sparse", "dense", "sparse"]))
    with pytest.raises(ValueError, match="attention_type"):
        config_from_moe(config_to_moe(GLM4_MOE["glm4_moe_partial_rotary"].config()), "glm4_moe_lite")


@pytest.mark.parametrize("family_case", ["glm4_moe_lite_qlora", "deepseek_v3_qlora_yarn"])
def test_latent_norms_keep_their_epsilon(family_case: str) -> None:
    """transformers' MLA classes give q_a/kv_a_layernorm eps=1e-6 whatever rms_norm_eps is: converted exactly
    (`latent_norm_eps`), and a latent eps the family cannot express is refused on export."""
    case = {**CASES, **DEEPSEEK_V3}[family_case]
    case = case._replace(fields=dict(case.fields, rms_norm_eps=1e-2))  # far from 1e-6: the eps shows in the logits
    moe = config_to_moe(case.config())
    assert (moe.rms_norm_eps, moe.latent_norm_eps) == (1e-2, 1e-6)
    assert converted_logit_diff(case) < TOL
    assert config_from_moe(moe, case.family).rms_norm_eps == 1e-2
    moe.latent_norm_eps = 1e-3
    with pytest.raises(ValueError, match="latent_norm_eps"):
        config_from_moe(moe, case.family)
