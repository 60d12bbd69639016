"""Granite record (a dense source): its oracle case (muP's attention, embedding, residual and logits multipliers,
attention biases)."""

from __future__ import annotations

from transformers import GraniteConfig

from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, Case

MUP = dict(attention_multiplier=0.2, embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=0.5)
CASES = {"granite": Case(GraniteConfig, dict(DENSE_TINY, attention_bias=True, **MUP))}


def test_mup_multipliers() -> None:
    fields = get_dense_family("granite").moe_fields(CASES["granite"].config())
    assert {k: fields[k] for k in MUP} == MUP
