"""K-EXAONE record (`exaone_moe`): its oracle cases (sliding layers with RoPE, full layers without, per-head q/k
norm, DeepSeek-V3's router, the bias's released name), greedy generate() and what it refuses."""

from __future__ import annotations

import pytest
from transformers import ExaoneMoeConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import PER_EXPERT, TINY, Case
from tests.conversion.families.test_dots1 import CASES as DOTS1
from tests.conversion.families.test_glm4_moe import assert_same_greedy_generation

#: the released checkpoints keep the balancing bias beside the router
NAMING = (*PER_EXPERT, ((".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"),))
EXAONE = dict(TINY, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
              num_experts_per_tok=3, num_shared_experts=1)  # fmt: skip
CASES = {
    "exaone_moe_hybrid_nope": Case(ExaoneMoeConfig, dict(
        EXAONE, sliding_window=4, sliding_window_pattern=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        mlp_layer_types=["dense", "sparse", "sparse"]), True, NAMING),
    "exaone_moe_all_nope": Case(ExaoneMoeConfig, dict(
        EXAONE, sliding_window=4, layer_types=["full_attention"] * 3, norm_topk_prob=False,
        mlp_layer_types=["dense", "dense", "sparse"], tie_word_embeddings=True), False, NAMING),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case], new_tokens=10)


def test_family_specific_fields() -> None:
    ex = config_to_moe(CASES["exaone_moe_hybrid_nope"].config())
    assert ex.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert (ex.nope_layers, ex.sliding_window, ex.first_k_dense_replace) == ([2], 4, 1)
    full = config_to_moe(CASES["exaone_moe_all_nope"].config())  # its window always set: full layers are NoPE
    assert (full.nope_layers, full.first_k_dense_replace) == ([0, 1, 2], 2)


def test_export_refuses_what_the_family_cannot_express() -> None:
    ex = config_to_moe(CASES["exaone_moe_hybrid_nope"].config())
    with pytest.raises(ValueError, match="nope_layers"):  # dots.llm1 rotates every layer
        config_from_moe(ex, "dots1")
    ex.nope_layers = None
    with pytest.raises(ValueError, match="nope_layers"):  # EXAONE's full layers must be NoPE
        config_from_moe(ex, "exaone_moe")
    dots = config_to_moe(DOTS1["dots1_sliding_layers"].config(attention_bias=False))
    with pytest.raises(ValueError, match="nope_layers"):
        config_from_moe(dots, "exaone_moe")
    dots = config_to_moe(DOTS1["dots1_full"].config())  # no window: EXAONE-MoE always has one
    with pytest.raises(ValueError, match="sliding_window"):
        config_from_moe(dots, "exaone_moe")
