"""Llama record (a dense source): its oracle case (llama3 RoPE scaling, a tied head, attention biases)."""

from __future__ import annotations

from transformers import LlamaConfig

from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, Case

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # fmt: skip
CASES = {"llama": Case(LlamaConfig, dict(DENSE_TINY, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                         attention_bias=True))}  # fmt: skip


def test_one_bias_flag_for_q_k_v_and_o() -> None:
    record = get_dense_family("llama")
    fields = record.moe_fields(CASES["llama"].config())
    assert (fields["attention_bias"], fields["attention_out_bias"], fields["qk_norm"]) == (True, True, None)
    assert fields["rope_parameters"]["rope_type"] == "llama3"
    plain = record.moe_fields(CASES["llama"].config(attention_bias=False))
    assert (plain["attention_bias"], plain["attention_out_bias"]) == (False, False)
