"""Qwen2-MoE record: its oracle cases (MoE every second layer, a dense first layer) with the gated shared
expert, and the layer patterns and per-layer windows hf_moe cannot express."""

from __future__ import annotations

import pytest
from transformers import Qwen2MoeConfig

from hf_moe.conversion.families import config_to_moe
from tests.conversion.families.oracle import TINY, Case

CASES = {
    "qwen2_moe": Case(Qwen2MoeConfig, dict(
        TINY, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2,
        norm_topk_prob=False), True),
    "qwen2_moe_mlp_only": Case(Qwen2MoeConfig, dict(
        TINY, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
        norm_topk_prob=True), False),
}  # fmt: skip


def test_family_specific_fields() -> None:
    qwen2 = config_to_moe(CASES["qwen2_moe"].config())
    assert (qwen2.first_k_dense_replace, qwen2.moe_layer_freq, qwen2.moe_layer_indices) == (1, 2, [1, 3])
    assert (qwen2.shared_expert_gate, qwen2.shared_intermediate_size) == (True, 48)
    assert (qwen2.attention_bias, qwen2.attention_out_bias) == (True, False)


def test_import_refuses_what_hf_moe_cannot_express() -> None:
    base = CASES["qwen2_moe_mlp_only"].fields
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config_to_moe(Qwen2MoeConfig(**{**base, "mlp_only_layers": [2]}))  # MoE layers 0, 1 of 3
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_to_moe(Qwen2MoeConfig(**base, use_sliding_window=True, sliding_window=4, max_window_layers=3))
