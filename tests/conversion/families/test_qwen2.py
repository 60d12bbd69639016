"""Qwen2 record (a dense source): its oracle case; q/k/v biases without an o_proj bias; a sliding window is
exact on every layer and refused on some."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Qwen2Config

import hf_moe
from hf_moe.conversion.families import get_dense_family
from tests.conversion.families.oracle import DENSE_TINY, TOL, Case, dense_checkpoint, max_logit_diff

CASES = {"qwen2": Case(Qwen2Config, dict(DENSE_TINY))}


def test_q_k_v_biases_without_o_proj_bias() -> None:
    fields = get_dense_family("qwen2").moe_fields(CASES["qwen2"].config())
    assert (fields["attention_bias"], fields["attention_out_bias"], fields["sliding_window"]) == (True, False, None)


def test_window_on_some_layers_is_refused() -> None:
    mixed = CASES["qwen2"].config(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="layer_types=.*mixes sliding and full attention"):
        get_dense_family("qwen2").moe_fields(mixed)


def test_qwen2_sliding_window_on_every_layer_is_exact(tmp_path: Path) -> None:
    model = dense_checkpoint(tmp_path / "dense", CASES["qwen2"], use_sliding_window=True, sliding_window=4,
                             max_window_layers=0)  # fmt: skip
    report = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    assert hf_moe.MoEConfig.from_pretrained(tmp_path / "moe").sliding_window == 4
    assert report.exact and max_logit_diff(model, tmp_path / "moe")[0] < TOL
