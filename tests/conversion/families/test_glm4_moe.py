"""GLM-4.5 record (`glm4_moe`): its oracle cases (partial rotary, q/k/v biases, per-head q/k norm, groups), the
greedy generate() of transformers' class, export refusals and MTP modules in DeepSeek-V3's on-disk layout.

`assert_same_greedy_generation` (the generate() oracle) and `converted_logit_diff` (the logits oracle for a case
outside CASES) are shared by the attention-side family tests."""

from __future__ import annotations

import pytest
import torch
from transformers import Glm4MoeConfig, PreTrainedConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_from_moe, state_dict_to_moe
from tests.conversion.families.oracle import (
    TINY,
    Case,
    family_model,
    inputs,
    logits_of,
    ours_from,
    randomise,
    released_mtp_checkpoint,
)
from tests.conversion.families.test_deepseek_v3 import CASES as DEEPSEEK_V3

GLM = dict(TINY, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
           num_experts_per_tok=3, num_mtp_layers=0)  # fmt: skip
CASES = {
    "glm4_moe_partial_rotary": Case(Glm4MoeConfig, dict(
        GLM, attention_bias=True, use_qk_norm=True, n_shared_experts=1, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True), True),
    "glm4_moe_head_dim_tied": Case(Glm4MoeConfig, dict(
        GLM, head_dim=32, attention_bias=False, use_qk_norm=False, n_shared_experts=2, first_k_dense_replace=0,
        norm_topk_prob=False, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.25)), False),
}  # fmt: skip


def converted(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' randomised model of `case` and the hf_moe model converted from it."""
    theirs, their_config = family_model(case)
    moe_config = config_to_moe(their_config)
    return theirs, ours_from(moe_config, state_dict_to_moe(case.family, theirs.state_dict(), moe_config))


def converted_logit_diff(case: Case) -> float:
    """Max |fp32 logits difference| over the real tokens of a padded batch, transformers' class against ours."""
    theirs, ours = converted(case)
    input_ids, mask = inputs(True, theirs.config.vocab_size)
    return (logits_of(theirs, input_ids, mask) - logits_of(ours, input_ids, mask))[mask.bool()].abs().max().item()


def assert_same_greedy_generation(case: Case, new_tokens: int = 8) -> None:
    """Greedy generate() with the cache, transformers' class against the converted hf_moe model (padded batch)."""
    theirs, ours = converted(case)
    input_ids, mask = inputs(True, theirs.config.vocab_size)
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = theirs.generate(input_ids=input_ids, attention_mask=mask, **settings)
        got = ours.generate(input_ids=input_ids, attention_mask=mask, **settings)
    assert got.shape == expected.shape == (2, input_ids.shape[1] + new_tokens)
    assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case: str) -> None:
    assert_same_greedy_generation(CASES[case])


def test_family_specific_fields() -> None:
    glm = config_to_moe(CASES["glm4_moe_partial_rotary"].config())
    assert (glm.attention_type, glm.scoring_func, glm.topk_method, glm.qk_norm) == ("gqa", "sigmoid", "noaux_tc", "head")
    assert (glm.attention_bias, glm.attention_out_bias, glm.head_dim, glm.rotary_dim) == (True, False, 16, 8)
    assert config_to_moe(CASES["glm4_moe_head_dim_tied"].config()).rotary_dim == 8


def test_export_refuses_what_the_family_cannot_express() -> None:
    moe = config_to_moe(CASES["glm4_moe_partial_rotary"].config())
    for field, value in [("attention_out_bias", True), ("qk_norm", "full"), ("scoring_func", "softmax"),
                         ("sliding_window", 8)]:  # fmt: skip
        bad = config_to_moe(CASES["glm4_moe_partial_rotary"].config())
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=field):
            config_from_moe(bad, "glm4_moe")
    assert config_from_moe(moe, "glm4_moe").rope_parameters["partial_rotary_factor"] == 0.5
    with pytest.raises(ValueError, match="attention_type"):
        config_from_moe(config_to_moe(DEEPSEEK_V3["deepseek_v3_no_qlora"].config()), "glm4_moe")


def _export_keeps_rotary(config: PreTrainedConfig) -> float:
    return config.rope_parameters["partial_rotary_factor"]


def test_export_of_full_rotary_is_not_glm_default() -> None:
    """Glm4MoeConfig defaults a missing partial_rotary_factor to 0.5: export writes 1.0 for a full-rotary model."""
    moe = config_to_moe(CASES["glm4_moe_partial_rotary"].config())
    moe.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    moe.validate_moe()
    assert _export_keeps_rotary(config_from_moe(moe, "glm4_moe")) == 1.0


def test_glm4_moe_mtp_layers_map_both_ways() -> None:
    """GLM-4.5's MTP module N in DeepSeek-V3's layout (enorm/hnorm/eh_proj/shared_head, a GQA decoder layer)."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

    case = CASES["glm4_moe_partial_rotary"]
    theirs, config = family_model(case)
    n = config.num_hidden_layers
    torch.manual_seed(2)
    layer = Glm4MoeDecoderLayer(config, layer_idx=n)
    randomise(layer)
    disk = released_mtp_checkpoint(theirs, layer, n)
    moe = config_to_moe(case.config(num_mtp_layers=1))
    assert moe.num_nextn_predict_layers == 1
    ours = ours_from(moe, state_dict_to_moe("glm4_moe", disk, moe))
    assert torch.equal(ours.mtp[0].norm.weight, disk[f"model.layers.{n}.shared_head.norm.weight"])
    original = state_dict_from_moe("glm4_moe", ours.state_dict(), moe, layout="original")
    assert original.keys() == disk.keys()
    assert all(torch.equal(original[k], disk[k]) for k in disk)
