"""Hunyuan 3 record (`hy_v3`): its oracle cases (per-head q/k norm, q/k/v/o biases, a scaled sigmoid router with
the bias beside the block, shared experts, the released names), greedy generate() and what it refuses."""

from __future__ import annotations

import pytest
from transformers import HYV3Config

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import PER_EXPERT, TINY, Case
from tests.conversion.families.test_glm4_moe import CASES as GLM4_MOE
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation

#: the released checkpoints' names of the bias, the router and the shared experts
NAMING = (*PER_EXPERT, ((".mlp.e_score_correction_bias", ".mlp.expert_bias"),
                        (".mlp.gate.weight", ".mlp.router.gate.weight"),
                        *((f".mlp.shared_experts.{n}.weight", f".mlp.shared_mlp.{n}.weight")
                          for n in ("gate_proj", "up_proj", "down_proj"))))  # fmt: skip
HY = dict(TINY, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
          num_experts_per_tok=3)  # fmt: skip
CASES = {
    "hy_v3_bias": Case(HYV3Config, dict(
        HY, attention_bias=True, num_shared_experts=1, router_scaling_factor=2.826,
        mlp_layer_types=["dense", "sparse", "sparse"]), True, NAMING),
    "hy_v3_head_dim_tied": Case(HYV3Config, dict(
        HY, head_dim=32, num_shared_experts=2, router_scaling_factor=1.0, tie_word_embeddings=True,
        mlp_layer_types=["dense", "dense", "sparse"]), False, NAMING),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    hy = config_to_moe(CASES["hy_v3_bias"].config())
    assert (hy.routed_scaling_factor, hy.first_k_dense_replace, hy.attention_out_bias) == (2.826, 1, True)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="mlp_bias"):
        config_to_moe(CASES["hy_v3_bias"].config(mlp_bias=True))
    with pytest.raises(ValueError, match="mlp_layer_types"):
        config_to_moe(CASES["hy_v3_bias"].config(mlp_layer_types=["sparse", "dense", "sparse"]))
    glm = config_to_moe(GLM4_MOE["glm4_moe_partial_rotary"].config(attention_bias=False))
    with pytest.raises(ValueError, match="n_group"):  # GLM-4.5 routes within groups
        config_from_moe(glm, "hy_v3")
