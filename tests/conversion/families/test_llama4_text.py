"""Llama 4 text record: its oracle cases (sigmoid of the top-k logits scaling the expert input, one shared
expert, MoE every layer or every second one, interleaved RoPE), greedy generation, and what is refused."""

from __future__ import annotations

import pytest
from transformers import Llama4TextConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import TINY, Case

_BASE = dict(TINY, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
             intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1, use_qk_norm=False,
             no_rope_layers=[1] * 4, attention_chunk_size=None, eos_token_id=2, pad_token_id=0)  # fmt: skip
CASES = {
    "llama4_text": Case(Llama4TextConfig, dict(_BASE, interleave_moe_layer_step=2), True, None),
    "llama4_text_top2": Case(Llama4TextConfig, dict(_BASE, num_experts_per_tok=2, attention_bias=True), False, None),
}  # fmt: skip


def test_family_specific_fields() -> None:
    moe = config_to_moe(CASES["llama4_text"].config())
    assert moe.moe_layer_indices == [1, 3] and (moe.intermediate_size, moe.moe_intermediate_size) == (96, 32)
    assert (moe.scoring_func, moe.norm_topk_prob, moe.gate_on_expert_input, moe.shared_intermediate_size) == (
        "sigmoid", False, True, 32)
    assert config_to_moe(CASES["llama4_text_top2"].config()).moe_layer_indices == [0, 1, 2, 3]


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_refuses_what_llama4_cannot_express() -> None:
    for field, value in [("use_qk_norm", True), ("no_rope_layers", [1, 1, 1, 0]), ("attention_chunk_size", 8)]:
        with pytest.raises(ValueError, match=field if field != "attention_chunk_size" else "layer_types"):
            config_to_moe(CASES["llama4_text"].config(**{field: value}))
    with pytest.raises(ValueError, match="moe_layers"):
        config_to_moe(CASES["llama4_text"].config(moe_layers=[0, 1, 3]))
    moe = config_to_moe(CASES["llama4_text"].config())
    for field, value in [("gate_on_expert_input", False), ("norm_topk_prob", True), ("n_shared_experts", 2)]:
        with pytest.raises(ValueError, match=field if field != "n_shared_experts" else "shared_intermediate_size"):
            config_from_moe(MoEConfig(**{**moe.to_dict(), field: value}), "llama4_text")
