"""SmolLM3 record (a dense source): its oracle cases (NoPE every 2nd layer, attention biases; a sliding window on
the NoPE layers)."""

from __future__ import annotations

from transformers import SmolLM3Config

from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, Case

SMOL = dict(DENSE_TINY, no_rope_layer_interval=2, pad_token_id=0)
CASES = {
    "smollm3_nope": Case(SmolLM3Config, dict(SMOL, attention_bias=True)),
    "smollm3_sliding_nope": Case(SmolLM3Config, dict(SMOL, use_sliding_window=True, sliding_window=4,
                                                     tie_word_embeddings=True)),
}  # fmt: skip


def test_nope_and_sliding_layers() -> None:
    fields = get_dense_family("smollm3").moe_fields(CASES["smollm3_sliding_nope"].config())
    assert (fields["nope_layers"], fields["layer_types"], fields["sliding_window"]) == (
        [1], ["full_attention", "sliding_attention"], 4)
    plain = get_dense_family("smollm3").moe_fields(CASES["smollm3_nope"].config())
    assert (plain["nope_layers"], plain["layer_types"], plain["sliding_window"]) == ([1], None, None)
