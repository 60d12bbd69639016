"""dots.llm1 record (`dots1`): its oracle cases (sliding-window and full layers mixed, Qwen3's q/k norm and
attention biases under DeepSeek-V3's router), greedy generate() and export refusals."""

from __future__ import annotations

import pytest
from transformers import Dots1Config

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, Case
from tests.conversion.families.test_glm4_moe import CASES as GLM4_MOE
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation
from tests.conversion.families.test_mixtral import CASES as MIXTRAL

DOTS = dict(TINY, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=3, n_shared_experts=1)  # fmt: skip
CASES = {
    "dots1_sliding_layers": Case(Dots1Config, dict(
        DOTS, attention_bias=True, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"]), True),
    "dots1_full": Case(Dots1Config, dict(
        DOTS, attention_bias=False, first_k_dense_replace=0, norm_topk_prob=False, sliding_window=None,
        layer_types=["full_attention"] * 3, tie_word_embeddings=True), False),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case], new_tokens=10)


def test_family_specific_fields() -> None:
    dots = config_to_moe(CASES["dots1_sliding_layers"].config())
    assert (dots.qk_norm, dots.scoring_func, dots.topk_method, dots.attention_out_bias) == ("head", "sigmoid",
                                                                                           "noaux_tc", True)
    assert dots.layer_types == CASES["dots1_sliding_layers"].fields["layer_types"] and dots.sliding_window == 4


def test_export_refuses_what_the_family_cannot_express() -> None:
    dots = config_to_moe(CASES["dots1_sliding_layers"].config())
    with pytest.raises(ValueError, match="sliding_window"):  # GLM-4.5 has no sliding windows
        config_from_moe(dots, "glm4_moe")
    mixtral = config_to_moe(MIXTRAL["mixtral"].config())  # a window on every layer, but not on some only
    mixtral.sliding_window, mixtral.layer_types = 4, ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        config_from_moe(mixtral, "mixtral")
    mixtral.layer_types = ["sliding_attention"] * 3
    assert config_from_moe(mixtral, "mixtral").sliding_window == 4
    glm = config_to_moe(GLM4_MOE["glm4_moe_partial_rotary"].config(attention_bias=False))
    with pytest.raises(ValueError, match="rope_parameters"):  # GLM's partial rotary
        config_from_moe(glm, "dots1")
    glm.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    assert config_from_moe(glm, "dots1").layer_types == ["full_attention"] * 3
