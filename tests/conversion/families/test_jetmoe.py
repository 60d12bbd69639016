"""JetMoE record: its oracle cases (mixture of attention heads with a fused kv projection, an MoE FFN with an
output bias, both top-k-then-softmax routed), greedy generation, and what is refused."""

from __future__ import annotations

import pytest
from transformers import JetMoeConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import Case

_BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, max_position_embeddings=64, eos_token_id=2,
             pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
CASES = {
    "jetmoe": Case(JetMoeConfig, dict(_BASE, num_key_value_heads=2, kv_channels=16, intermediate_size=32,
                                      num_local_experts=4, num_experts_per_tok=2), True, None),
    "jetmoe_tied": Case(JetMoeConfig, dict(_BASE, num_key_value_heads=4, kv_channels=8, intermediate_size=24,
                                           num_local_experts=8, num_experts_per_tok=3, tie_word_embeddings=True),
                        False, None),
}  # fmt: skip


def test_family_specific_fields() -> None:
    moe = config_to_moe(CASES["jetmoe"].config())
    assert (moe.moa_experts, moe.moa_top_k, moe.num_attention_heads, moe.head_dim) == (4, 2, 4, 16)
    assert (moe.moe_output_bias, moe.attention_out_bias, moe.topk_before_softmax) == (True, True, True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_refuses_what_jetmoe_cannot_express() -> None:
    with pytest.raises(ValueError, match="rms_norm_eps"):
        config_to_moe(CASES["jetmoe"].config(rms_norm_eps=1e-5))
    moe = config_to_moe(CASES["jetmoe"].config())
    for field, value in [("moe_output_bias", False), ("attention_out_bias", False), ("n_shared_experts", 1)]:
        with pytest.raises(ValueError, match=field if field != "n_shared_experts" else "shared_intermediate_size"):
            config_from_moe(MoEConfig(**{**moe.to_dict(), field: value}), "jetmoe")
