"""What conversion and upcycling call "exact" must be true: NaN/inf never hide in the comparison, and
non-floating-point weights (cast to fp32 by the probe, so they "agree" with themselves) are refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import hf_moe
from hf_moe.conversion.checkpoint_io import CheckpointError
from hf_moe.conversion.upcycle import upcycle_model
from hf_moe.conversion.validation import nan_max, non_finite_logits

TINY = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
POISONED = "model.layers.1.mlp.down_proj.weight"


def llama(folder: Path, edit=None) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(folder)
    if edit is not None:
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_max_keeps_a_nan() -> None:
    assert math.isnan(nan_max(0.0, math.nan)) and math.isnan(nan_max(math.nan, 5.0))
    assert nan_max(1.0, 2.0) == 2.0 and nan_max(2.0, 1.0) == 2.0
    assert non_finite_logits(1e-7, 30.0) is None


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_checkpoint_is_not_exact(value: float, tmp_path: Path) -> None:
    """Before: max(0.0, nan) = 0.0 reported "max |dlogit| = 0, exact" for a checkpoint holding a NaN."""

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[POISONED][0, 0] = value

    src = llama(tmp_path / "dense", poison)
    report = hf_moe.upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    assert report.expected_exact and not report.exact
    assert math.isnan(report.max_abs_logit_diff)
    assert any("probe logits are not finite" in why for why in report.why_not_exact)
    assert "NOT exact" in str(report)
    recorded = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycled_from"]["function_preservation"]
    assert recorded["exact"] is False and recorded["max_abs_logit_diff"] is None
    assert any("not finite" in why for why in recorded["why_not_exact"])


def test_non_finite_in_memory_upcycle_is_not_exact() -> None:
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        dense.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
    report = upcycle_model(dense, num_experts=4, top_k=2).upcycle_report
    assert not report.exact and any("not finite" in why for why in report.why_not_exact)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_upcycle_refuses_non_floating_weights(dtype: torch.dtype, tmp_path: Path) -> None:
    def cast(tensors: dict[str, torch.Tensor]) -> None:
        tensors[POISONED] = (tensors[POISONED] * 100).to(dtype)

    src = llama(tmp_path / "dense", cast)
    with pytest.raises(CheckpointError, match=rf"1 non-floating-point weights: {POISONED} \({dtype}\)"):
        hf_moe.upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    assert not (tmp_path / "moe").exists()


def test_in_memory_upcycle_refuses_non_floating_weights() -> None:
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    dense.model.norm.weight = torch.nn.Parameter(torch.ones(32, dtype=torch.int64), requires_grad=False)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight \(torch\.int64\)"):
        upcycle_model(dense, num_experts=4, top_k=2)


def test_convert_refuses_non_floating_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(torch.int32)
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight \(torch\.int32\)"):
        hf_moe.convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
