"""Hunyuan-A13B record (`hunyuan_v1_moe`): its oracle cases (per-head q/k norm after RoPE, q/k/v/o biases, a
shared MLP, renamed router), greedy generate(), NTK-alpha RoPE and what it refuses."""

from __future__ import annotations

import pytest
from transformers import HunYuanMoEV1Config

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, TOL, Case
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation, converted_logit_diff
from tests.conversion.families.test_qwen3_moe import CASES as QWEN3_MOE

HUNYUAN = dict(TINY, num_key_value_heads=2, head_dim=16, intermediate_size=32, num_experts=8, moe_topk=2)
CASES = {
    "hunyuan_v1_moe_bias": Case(HunYuanMoEV1Config, dict(HUNYUAN, attention_bias=True), True),
    "hunyuan_v1_moe_head_dim_tied": Case(HunYuanMoEV1Config, dict(
        HUNYUAN, head_dim=32, num_key_value_heads=4, attention_bias=False, tie_word_embeddings=True), False),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    hy = config_to_moe(CASES["hunyuan_v1_moe_bias"].config())
    assert (hy.qk_norm, hy.qk_norm_after_rope, hy.attention_out_bias, hy.shared_intermediate_size) == ("head", True,
                                                                                                       True, 32)


def test_ntk_alpha_rope_is_default_rope_of_a_stretched_base() -> None:
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0}
    case = CASES["hunyuan_v1_moe_bias"]._replace(fields=dict(HUNYUAN, attention_bias=True, rope_parameters=rope))
    moe = config_to_moe(case.config())
    assert moe.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0 * 1000.0 ** (16 / 14)}
    assert converted_logit_diff(case) < TOL


def test_refusals() -> None:
    with pytest.raises(ValueError, match="moe_topk"):
        config_to_moe(CASES["hunyuan_v1_moe_bias"].config(moe_topk=[2, 1, 2]))
    hy = config_to_moe(CASES["hunyuan_v1_moe_bias"].config())
    assert config_from_moe(config_to_moe(CASES["hunyuan_v1_moe_bias"].config(moe_topk=[2, 2, 2])), "hunyuan_v1_moe")
    hy.n_shared_experts = 0
    with pytest.raises(ValueError, match="qk_norm_after_rope"):  # Qwen3 normalises before RoPE
        config_from_moe(hy, "qwen3_moe")
    with pytest.raises(ValueError, match="qk_norm_after_rope"):
        config_from_moe(config_to_moe(QWEN3_MOE["qwen3_moe"].config(moe_intermediate_size=96)), "hunyuan_v1_moe")
