"""Qwen3 record (a dense source): its oracle case (per-head q/k norm, head_dim not hidden / heads)."""

from __future__ import annotations

from transformers import Qwen3Config

from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, Case

CASES = {"qwen3": Case(Qwen3Config, dict(DENSE_TINY, head_dim=16))}


def test_per_head_qk_norm() -> None:
    fields = get_dense_family("qwen3").moe_fields(CASES["qwen3"].config())
    assert (fields["qk_norm"], fields["head_dim"], fields["attention_bias"]) == ("head", 16, False)
