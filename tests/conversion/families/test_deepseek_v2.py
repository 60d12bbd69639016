"""DeepSeek-V2 record: its oracle cases (group-limited greedy, greedy with q-LoRA) and what it maps as
transformers computes it (no renormalisation, interleaved RoPE) rather than by field name."""

from __future__ import annotations

import pytest
from transformers import DeepseekV2Config

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import MLA, TINY, Case
from tests.conversion.families.test_deepseek_v3 import CASES as V3

CASES = {
    "deepseek_v2_group_limited": Case(DeepseekV2Config, dict(
        TINY, **MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, first_k_dense_replace=1, routed_scaling_factor=1.5), True),
    "deepseek_v2_greedy_qlora": Case(DeepseekV2Config, dict(
        TINY, **MLA, q_lora_rank=24, n_shared_experts=1, topk_method="greedy", first_k_dense_replace=0),
        False),
}  # fmt: skip


def test_family_specific_fields() -> None:
    v2 = config_to_moe(DeepseekV2Config(**CASES["deepseek_v2_group_limited"].fields, norm_topk_prob=True))
    assert (v2.scoring_func, v2.topk_method, v2.norm_topk_prob, v2.rope_interleave) == (
        "softmax", "group_limited_greedy", False, True)  # fmt: skip


def test_import_refuses_what_hf_moe_cannot_express() -> None:
    with pytest.raises(ValueError, match="topk_method"):
        config_to_moe(CASES["deepseek_v2_greedy_qlora"].config(topk_method="noaux_tc"))


def test_export_refuses_what_the_family_cannot_express() -> None:
    v3 = config_to_moe(V3["deepseek_v3_no_qlora"].config())
    with pytest.raises(ValueError, match="norm_topk_prob|scoring_func"):
        config_from_moe(v3, "deepseek_v2")
