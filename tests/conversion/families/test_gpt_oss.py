"""gpt-oss record: its oracle cases (router and expert biases, the clamped gpt-oss unit on interleaved
transposed experts, attention sinks, q/k/v/o biases; every layer full, every layer sliding, or alternating
sliding/full layers as the released models), greedy generation, and what is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_to_moe
from hf_moe.modeling.configuration import MoEConfig
from hf_moe.modeling.model import MoEForCausalLM
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import TINY, TOL, Case, family_model, inputs, logits_of, ours_from

_BASE = dict(TINY, num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=8,
             num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
             swiglu_limit=0.3, eos_token_id=2, pad_token_id=0)  # fmt: skip
CASES = {
    "gpt_oss": Case(GptOssConfig, dict(_BASE, layer_types=["full_attention"] * 3), True, None),
    "gpt_oss_sliding": Case(GptOssConfig, dict(
        _BASE, num_local_experts=4, layer_types=["sliding_attention"] * 3, sliding_window=4), False, None),
    # the released pattern: sliding, full, sliding, full (a window shorter than the prompt, so it matters)
    "gpt_oss_alternating": Case(GptOssConfig, dict(
        _BASE, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=3),
        True, None),
}  # fmt: skip


def test_family_specific_fields() -> None:
    moe = config_to_moe(CASES["gpt_oss"].config())
    assert (moe.glu_type, moe.glu_limit, moe.glu_alpha, moe.router_bias, moe.expert_bias) == (
        "gpt_oss", 0.3, 1.702, True, True)
    assert (moe.attention_sinks, moe.topk_before_softmax, moe.layer_types) == (True, True, ["full_attention"] * 3)
    assert config_to_moe(CASES["gpt_oss_sliding"].config()).sliding_window == 4
    mixed = config_to_moe(CASES["gpt_oss_alternating"].config())
    assert mixed.layer_types == ["sliding_attention", "full_attention"] * 2 and mixed.sliding_window == 3
    assert config_from_moe(mixed, "gpt_oss").layer_types == mixed.layer_types


def test_alternating_layers_need_their_types() -> None:
    """Dropping the per-layer types (every layer sliding, or every layer full) changes the logits: the
    alternating case's oracle holds only with `layer_types` converted."""
    theirs, config = family_model(CASES["gpt_oss_alternating"])
    input_ids, mask = inputs(True)
    expected = logits_of(theirs, input_ids, mask)[mask.bool()]
    moe_config = config_to_moe(config)
    state = state_dict_to_moe("gpt_oss", theirs.state_dict(), moe_config)
    assert (logits_of(ours_from(moe_config, state), input_ids, mask)[mask.bool()] - expected).abs().max() < TOL
    for kinds in (["sliding_attention"] * 4, ["full_attention"] * 4):
        wrong = MoEConfig(**{**moe_config.to_dict(), "layer_types": kinds})
        got = logits_of(ours_from(wrong, state), input_ids, mask)[mask.bool()]
        assert (got - expected).abs().max() > 1e-3, kinds


def test_expert_layout_is_re_laid() -> None:
    theirs, config = family_model(CASES["gpt_oss"])
    state = theirs.state_dict()
    ours = state_dict_to_moe("gpt_oss", state, config_to_moe(config))
    fused = state["model.layers.0.mlp.experts.gate_up_proj"]  # (E, H, 2I), gate/up interleaved columns
    gate_up = ours["model.layers.0.mlp.experts.gate_up_proj"]  # (E, 2I, H), gate rows first
    assert torch.equal(gate_up[:, :32], fused[..., ::2].transpose(1, 2))
    assert torch.equal(gate_up[:, 32:], fused[..., 1::2].transpose(1, 2))
    assert torch.count_nonzero(ours["model.layers.0.self_attn.sinks"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_refuses_what_gpt_oss_cannot_express() -> None:
    moe = config_to_moe(CASES["gpt_oss"].config())
    for field, value in [("glu_type", "glu"), ("router_bias", False), ("attention_sinks", False),
                         ("norm_topk_p", 2.0), ("nope_layers", [1])]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            config_from_moe(MoEConfig(**{**moe.to_dict(), field: value}), "gpt_oss")
    chunked = MoEConfig(**{**moe.to_dict(), "layer_types": ["chunked_attention"] * 3, "attention_chunk_size": 4})
    with pytest.raises(ValueError, match="layer_types|attention_chunk_size"):
        config_from_moe(chunked, "gpt_oss")


@pytest.mark.parametrize("implementation", ["sdpa", "hf_moe_sdpa"])
@pytest.mark.parametrize("left_padding", [False, True])
def test_sinks_under_sdpa_style_masks(implementation: str, left_padding: bool) -> None:
    """Sinks run our eager sink attention whatever the configured implementation: its boolean or skipped
    (causal) masks are honoured, in a forward and in cached greedy decoding."""
    theirs, config = family_model(CASES["gpt_oss"])
    moe_config = config_to_moe(config)
    ours = MoEForCausalLM(moe_config).eval()
    ours.load_state_dict(state_dict_to_moe("gpt_oss", theirs.state_dict(), moe_config), strict=False)
    ours.config._attn_implementation = implementation
    input_ids, mask = inputs(left_padding)
    valid = mask.bool()
    diff = (logits_of(ours, input_ids, mask) - logits_of(theirs, input_ids, mask))[valid].abs().max().item()
    assert diff < TOL, diff
    args = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids, **args), theirs.generate(input_ids, **args))


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gpt-oss-120b"])
def test_presets_export_to_gpt_oss(preset: str) -> None:
    """The presets' alternating layers export as the released config.json spells them."""
    back = config_from_moe(MoEConfig.from_preset(preset), "gpt_oss")
    assert back.layer_types == ["sliding_attention", "full_attention"] * (back.num_hidden_layers // 2)
    assert back.sliding_window == 128
