"""Llama 4 text record: its oracle cases (sigmoid of the top-k logits scaling the expert input, one shared
expert, MoE every layer or every second one, interleaved RoPE; Scout's attention: NoPE layers with temperature
tuning, chunked attention on the rotating layers, the weightless q/k L2 norm there), greedy generation, and what
is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4TextConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import TINY, TOL, Case, family_model, inputs, logits_of, ours_from
from tests.conversion.families.test_mixtral import CASES as MIXTRAL

_BASE = dict(TINY, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
             intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1, use_qk_norm=False,
             no_rope_layers=[1] * 4, attention_chunk_size=None, eos_token_id=2, pad_token_id=0)  # fmt: skip
#: Scout's attention at a scale the prompt reaches: NoPE every second layer (transformers' default rule with
#: interval 2), chunks of 4 on the rotating layers, the q/k L2 norm there, a temperature that steps every 3 tokens
_SCOUT = dict(_BASE, no_rope_layers=None, no_rope_layer_interval=2, attention_chunk_size=4, use_qk_norm=True,
              attn_temperature_tuning=True, floor_scale=3, attn_scale=0.5)  # fmt: skip
CASES = {
    "llama4_text": Case(Llama4TextConfig, dict(_BASE, interleave_moe_layer_step=2), True, None),
    "llama4_text_scout": Case(Llama4TextConfig, _SCOUT, True, None),
    "llama4_text_maverick": Case(Llama4TextConfig, dict(_SCOUT, use_qk_norm=False, interleave_moe_layer_step=2,
                                                        attention_bias=True), False, None),
    "llama4_text_top2": Case(Llama4TextConfig, dict(_BASE, num_experts_per_tok=2, attention_bias=True), False, None),
}  # fmt: skip


def test_family_specific_fields() -> None:
    moe = config_to_moe(CASES["llama4_text"].config())
    assert moe.moe_layer_indices == [1, 3] and (moe.intermediate_size, moe.moe_intermediate_size) == (96, 32)
    assert (moe.scoring_func, moe.norm_topk_prob, moe.gate_on_expert_input, moe.shared_intermediate_size) == (
        "sigmoid", False, True, 32)
    assert config_to_moe(CASES["llama4_text_top2"].config()).moe_layer_indices == [0, 1, 2, 3]


def test_scout_attention_fields() -> None:
    moe = config_to_moe(CASES["llama4_text_scout"].config())
    chunked, full = "chunked_attention", "full_attention"
    assert (moe.nope_layers, moe.layer_types, moe.attention_chunk_size) == ([1, 3], [chunked, full] * 2, 4)
    assert (moe.qk_norm, moe.qk_norm_weight, moe.qk_norm_after_rope, moe.qk_norm_skip_nope) == ("head", False, True, True)
    assert (moe.attention_temperature_scale, moe.attention_temperature_floor) == (0.5, 3)
    back = config_from_moe(moe, "llama4_text")
    assert (back.no_rope_layers, back.layer_types, back.use_qk_norm) == ([1, 0, 1, 0], [chunked, full] * 2, True)
    assert (back.attn_temperature_tuning, back.attn_scale, back.floor_scale) == (True, 0.5, 3)
    plain = config_to_moe(CASES["llama4_text_maverick"].config(attn_temperature_tuning=False))
    assert plain.qk_norm is None and plain.attention_temperature_scale is None
    assert not config_from_moe(plain, "llama4_text").attn_temperature_tuning


@pytest.mark.parametrize("knob", ["nope_layers", "layer_types", "qk_norm_skip_nope", "attention_temperature_scale"])
def test_each_attention_knob_matters(knob: str) -> None:
    """Scout's case converts within TOL; with any one of its attention knobs reset, the logits move."""
    theirs, config = family_model(CASES["llama4_text_scout"])
    input_ids, mask = inputs(True)
    valid = mask.bool()
    expected = logits_of(theirs, input_ids, mask)[valid]
    moe_config = config_to_moe(config)
    state = state_dict_to_moe("llama4_text", theirs.state_dict(), moe_config)
    assert (logits_of(ours_from(moe_config, state), input_ids, mask)[valid] - expected).abs().max() < TOL
    reset = {"nope_layers": None, "layer_types": ["full_attention"] * 4, "qk_norm_skip_nope": False,
             "attention_temperature_scale": None}[knob]  # fmt: skip
    wrong = MoEConfig(**{**moe_config.to_dict(), knob: reset})
    assert (logits_of(ours_from(wrong, state), input_ids, mask)[valid] - expected).abs().max() > 1e-3


def test_scout_config_converts() -> None:
    """A real Scout text config as Llama4TextConfig's defaults describe it (48 layers, NoPE every 4th, chunks of
    8192, the q/k norm, temperature tuning) converts, and exports back to the same attention fields."""
    scout = Llama4TextConfig()
    moe = config_to_moe(scout)
    assert moe.nope_layers == list(range(3, 48, 4)) and moe.attention_chunk_size == 8192
    assert moe.layer_types.count("chunked_attention") == 36 and moe.qk_norm_skip_nope
    back = config_from_moe(moe, "llama4_text")
    for name in ("no_rope_layers", "layer_types", "attention_chunk_size", "use_qk_norm", "attn_temperature_tuning",
                 "floor_scale", "attn_scale", "moe_layers"):  # fmt: skip
        assert getattr(back, name) == getattr(scout, name), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_refuses_what_llama4_cannot_express() -> None:
    sliding = ["sliding_attention"] + ["full_attention"] * 3
    with pytest.raises(ValueError, match="layer_types"):
        config_to_moe(CASES["llama4_text"].config(layer_types=sliding))
    scout = config_to_moe(CASES["llama4_text_scout"].config())
    for field, value in [("qk_norm_skip_nope", False), ("qk_norm_weight", True), ("qk_norm_after_rope", False)]:
        with pytest.raises(ValueError, match="qk_norm"):
            config_from_moe(MoEConfig(**{**scout.to_dict(), field: value}), "llama4_text")
    mixtral = config_to_moe(MIXTRAL["mixtral"].config(sliding_window=None))
    for field, value in [("attention_temperature_scale", 0.1), ("nope_layers", [1])]:  # not mixtral's
        with pytest.raises(ValueError, match=field):
            config_from_moe(MoEConfig(**{**mixtral.to_dict(), field: value}), "mixtral")
    skipping = MoEConfig(**{**mixtral.to_dict(), "qk_norm": "head", "qk_norm_skip_nope": True})
    with pytest.raises(ValueError, match="qk_norm_skip_nope"):
        config_from_moe(skipping, "qwen3_moe")
    with pytest.raises(ValueError, match="moe_layers"):
        config_to_moe(CASES["llama4_text"].config(moe_layers=[0, 1, 3]))
    moe = config_to_moe(CASES["llama4_text"].config())
    for field, value in [("gate_on_expert_input", False), ("norm_topk_prob", True), ("n_shared_experts", 2)]:
        with pytest.raises(ValueError, match=field if field != "n_shared_experts" else "shared_intermediate_size"):
            config_from_moe(MoEConfig(**{**moe.to_dict(), field: value}), "llama4_text")


@pytest.mark.parametrize("preset", ["llama-4-scout", "llama-4-maverick"])
def test_presets_export_to_llama4(preset: str) -> None:
    """The presets carry Llama 4's attention: they export to llama4_text and back unchanged."""
    moe = MoEConfig.from_preset(preset)
    back = config_from_moe(moe, "llama4_text")
    assert back.no_rope_layers == [int((i + 1) % 4 != 0) for i in range(48)] and back.attention_chunk_size == 8192
    assert back.use_qk_norm == (preset == "llama-4-scout") and back.attn_temperature_tuning
    again = config_to_moe(back)
    for field in ("nope_layers", "layer_types", "qk_norm", "qk_norm_skip_nope", "attention_temperature_scale"):
        assert getattr(again, field) == getattr(moe, field), field


@pytest.mark.parametrize("implementation", ["sdpa", "hf_moe_sdpa"])
def test_scout_under_sdpa_and_hf_moe_kernels(implementation: str) -> None:
    """The temperature scales the queries before the attention function, so sdpa and hf_moe's CPU attention
    kernel run Scout's layers as the eager oracle does (chunked masks, padded batch, cached greedy decoding)."""
    import hf_moe  # noqa: F401  (registers hf_moe_sdpa)

    theirs, config = family_model(CASES["llama4_text_scout"])
    moe_config = config_to_moe(config)
    ours = ours_from(moe_config, state_dict_to_moe("llama4_text", theirs.state_dict(), moe_config))
    ours.config._attn_implementation = implementation
    input_ids, mask = inputs(True)
    valid = mask.bool()
    assert (logits_of(ours, input_ids, mask) - logits_of(theirs, input_ids, mask))[valid].abs().max() < TOL
    args = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids, **args), theirs.generate(input_ids, **args))
