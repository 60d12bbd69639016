"""MiniMax-M2 record (`minimax_m2`): its oracle cases (q/k norm over the whole projection, partial rotary, a
sigmoid router with the balancing bias, Mixtral's on-disk naming with the bias beside the block), greedy
generate(), the released `rotary_dim` and what it refuses."""

from __future__ import annotations

import pytest
from transformers import MiniMaxM2Config

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, Case
from tests.conversion.families.test_glm4_moe import CASES as GLM4_MOE
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation

#: the released checkpoints: Mixtral's expert naming, the balancing bias beside the MoE block
NAMING = ("block_sparse_moe", ("w1", "w3", "w2"),
          ((".mlp.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"),))  # fmt: skip
MINIMAX = dict(TINY, num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=3)
CASES = {
    "minimax_m2_partial_rotary": Case(MiniMaxM2Config, dict(
        MINIMAX, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=5e6, partial_rotary_factor=0.5)),
        True, NAMING),
    "minimax_m2_tied": Case(MiniMaxM2Config, dict(
        MINIMAX, head_dim=32, tie_word_embeddings=True, router_aux_loss_coef=0.01,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)), False, NAMING),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    mm = config_to_moe(CASES["minimax_m2_partial_rotary"].config())
    assert (mm.qk_norm, mm.scoring_func, mm.norm_topk_prob, mm.rotary_dim, mm.head_dim) == ("full", "sigmoid", True, 8, 16)
    assert mm.router_bias_update_rate > 0  # it has the balancing bias
    released = MiniMaxM2Config(**{**MINIMAX, "head_dim": 16}, rotary_dim=4)  # the released config.json spelling
    assert config_to_moe(released).rotary_dim == 4


def test_export_refuses_what_the_family_cannot_express() -> None:
    glm = config_to_moe(GLM4_MOE["glm4_moe_partial_rotary"].config())
    with pytest.raises(ValueError, match="qk_norm"):
        config_from_moe(glm, "minimax_m2")
    mm = config_to_moe(CASES["minimax_m2_partial_rotary"].config())
    mm.scoring_func, mm.topk_method = "softmax", "greedy"  # as OLMoE routes
    with pytest.raises(ValueError, match="rope_parameters"):  # OLMoE rotates the whole head
        config_from_moe(mm, "olmoe")
