"""Ernie 4.5 MoE record: its oracle cases (use_bias on attention, FFNs and head; interleaved RoPE; a balancing
bias; MoE layers between start and end index every interval), greedy generation, and what is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import Ernie4_5_MoeConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import TINY, Case, family_model

_BASE = dict(TINY, num_hidden_layers=5, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
             moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, tie_word_embeddings=False, pad_token_id=0)  # fmt: skip
CASES = {
    "ernie4_5_moe": Case(Ernie4_5_MoeConfig, dict(
        _BASE, use_bias=True, moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=2,
        moe_norm_min=0.5), True),
    "ernie4_5_moe_tied": Case(Ernie4_5_MoeConfig, dict(
        _BASE, use_bias=False, tie_word_embeddings=True, moe_layer_start_index=1, moe_num_shared_experts=0), False),
}  # fmt: skip
# the released checkpoints' name for the balancing bias
CASES = {name: c._replace(renames=(("mlp.gate.moe_statics.", "mlp.moe_statics."),)) for name, c in CASES.items()}


def test_family_specific_fields() -> None:
    ernie = config_to_moe(CASES["ernie4_5_moe"].config())
    assert ernie.moe_layer_indices == [1, 3]  # (i + 1) % 2 == 0 within [1, 3] of 5 layers
    assert (ernie.first_k_dense_replace, ernie.moe_layer_freq, ernie.last_k_dense_replace) == (1, 2, 1)
    assert (ernie.attention_bias, ernie.attention_out_bias, ernie.mlp_bias, ernie.lm_head_bias) == (True,) * 4
    assert (ernie.norm_topk_min, ernie.shared_intermediate_size, ernie.scoring_func) == (0.5, 32, "softmax")


def test_balancing_bias_and_interleaved_rope_are_converted() -> None:
    theirs, config = family_model(CASES["ernie4_5_moe"])
    state = theirs.state_dict()
    bias = state["model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"]
    assert bias.shape == (1, 8) and torch.count_nonzero(bias)
    ours = state_dict_to_moe("ernie4_5_moe", state, config_to_moe(config))
    assert torch.equal(ours["model.layers.1.mlp.gate.e_score_correction_bias"], bias[0])
    q, ours_q = state["model.layers.0.self_attn.q_proj.weight"], ours["model.layers.0.self_attn.q_proj.weight"]
    head_dim = 16
    assert torch.equal(ours_q[: head_dim // 2], q[0:head_dim:2])  # each head's pairs become its two halves
    assert torch.equal(ours_q[head_dim // 2 : head_dim], q[1:head_dim:2])


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_export_refuses_what_ernie_cannot_express() -> None:
    moe = config_to_moe(CASES["ernie4_5_moe"].config())
    for field, value in [("mlp_bias", False), ("moe_layer_freq", 3), ("expert_bias", True),
                         ("norm_type", "layer_norm"), ("norm_topk_prob", False)]:  # fmt: skip
        bad = MoEConfig(**{**moe.to_dict(), field: value})
        with pytest.raises(ValueError, match=field if field != "moe_layer_freq" else "first_k_dense_replace"):
            config_from_moe(bad, "ernie4_5_moe")
    with pytest.raises(ValueError, match="num_mtp_layers"):
        config_to_moe(CASES["ernie4_5_moe"].config(num_mtp_layers=1))
