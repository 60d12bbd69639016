"""OLMo 2 record (a dense source): its oracle case (norms on sub-layer outputs, q/k norm over the projection,
attention biases)."""

from __future__ import annotations

from transformers import Olmo2Config

from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, Case

CASES = {"olmo2": Case(Olmo2Config, dict(DENSE_TINY, attention_bias=True))}


def test_post_sublayer_norms() -> None:
    fields = get_dense_family("olmo2").moe_fields(CASES["olmo2"].config())
    assert (fields["sublayer_norm"], fields["qk_norm"], fields["attention_out_bias"]) == ("post", "full", True)
