"""DBRX record: its oracle cases (fused Wqkv with clip_qkv, LayerNorms without bias, p-norm renormalised
gates, flat experts), greedy generation, and what is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DbrxConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_from_moe, state_dict_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import Case, family_model

_BASE = dict(d_model=64, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=96, eos_token_id=2, pad_token_id=0)
CASES = {
    "dbrx": Case(DbrxConfig, dict(
        _BASE, attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=3, moe_normalize_expert_weights=2.0)),
        True, None),
    "dbrx_plain": Case(DbrxConfig, dict(
        _BASE, attn_config=dict(kv_n_heads=4, clip_qkv=8.0, rope_theta=10000.0), ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2,
                                                                 moe_normalize_expert_weights=None)), False, None),
}  # fmt: skip


def test_family_specific_fields() -> None:
    moe = config_to_moe(CASES["dbrx"].config())
    assert (moe.norm_type, moe.norm_bias, moe.rms_norm_eps, moe.clip_qkv) == ("layer_norm", False, 1e-5, 1.0)
    assert (moe.norm_topk_prob, moe.norm_topk_p, moe.num_key_value_heads, moe.head_dim) == (True, 2.0, 2, 16)
    assert not config_to_moe(CASES["dbrx_plain"].config()).norm_topk_prob


def test_fused_qkv_is_split_and_fused_back() -> None:
    theirs, config = family_model(CASES["dbrx"])
    state = theirs.state_dict()
    moe_config = config_to_moe(config)
    ours = state_dict_to_moe("dbrx", state, moe_config)
    wqkv = state["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"]  # (64 + 2 * 32, 64)
    prefix = "model.layers.0.self_attn."
    assert torch.equal(ours[prefix + "q_proj.weight"], wqkv[:64]) and torch.equal(ours[prefix + "v_proj.weight"], wqkv[96:])
    back = state_dict_from_moe("dbrx", ours, moe_config)
    assert torch.equal(back["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"], wqkv)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_refuses_what_dbrx_cannot_express() -> None:
    moe = config_to_moe(CASES["dbrx"].config())
    for field, value in [("norm_bias", True), ("attention_bias", True), ("n_shared_experts", 1), ("mlp_bias", True),
                         ("clip_qkv", None)]:  # fmt: skip
        with pytest.raises(ValueError, match=field if field not in ("norm_bias", "n_shared_experts") else
                           {"norm_bias": "norm_type", "n_shared_experts": "shared_intermediate_size"}[field]):
            config_from_moe(MoEConfig(**{**moe.to_dict(), field: value}), "dbrx")
