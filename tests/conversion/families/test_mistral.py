"""Mistral record (a dense source): its oracle case (a sliding window on every layer, head_dim not hidden / heads)."""

from __future__ import annotations

from transformers import MistralConfig

from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, Case

CASES = {"mistral": Case(MistralConfig, dict(DENSE_TINY, sliding_window=5, head_dim=16))}


def test_window_on_every_layer_and_no_biases() -> None:
    fields = get_dense_family("mistral").moe_fields(CASES["mistral"].config())
    assert (fields["sliding_window"], fields["head_dim"]) == (5, 16)
    assert (fields["attention_bias"], fields["attention_out_bias"]) == (False, False)
