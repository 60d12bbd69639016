"""OLMoE record: its oracle case (q/k norm over the whole projection, clip_qkv, no renormalisation)."""

from __future__ import annotations

from transformers import OlmoeConfig

from hf_moe.conversion.families import config_to_moe
from tests.conversion.families.oracle import TINY, Case

CASES = {
    "olmoe": Case(OlmoeConfig, dict(
        TINY, num_key_value_heads=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=0.6,
        eos_token_id=2, norm_topk_prob=False), True),
}  # fmt: skip


def test_family_specific_fields() -> None:
    olmoe = config_to_moe(CASES["olmoe"].config())
    assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.norm_topk_prob) == ("full", 0.6, False)
