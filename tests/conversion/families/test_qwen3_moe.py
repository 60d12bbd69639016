"""Qwen3-MoE record: its oracle case (per-head q/k norm, a head_dim that is not hidden / heads, a tied head)."""

from __future__ import annotations

import pytest
from transformers import Qwen3MoeConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from tests.conversion.families.oracle import TINY, Case
from tests.conversion.families.test_mixtral import CASES as MIXTRAL

CASES = {
    "qwen3_moe": Case(Qwen3MoeConfig, dict(
        TINY, num_key_value_heads=2, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True), True),
}  # fmt: skip


def test_family_specific_fields() -> None:
    assert config_to_moe(CASES["qwen3_moe"].config()).qk_norm == "head"


def test_export_refuses_what_the_family_cannot_express() -> None:
    with pytest.raises(ValueError, match="qk_norm"):
        config_from_moe(config_to_moe(MIXTRAL["mixtral"].config()), "qwen3_moe")
