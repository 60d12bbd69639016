"""Finetuned deltas: only what training could change is saved, and it re-applies onto its base model."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.training.delta import apply_finetuned_delta, save_finetuned_delta
from hf_moe.training.recipes import apply_recipe
from tests.conftest import tiny_config
from tests.training.test_recipes import SELECTION, tiny_model, train


def test_delta_holds_only_what_changed_and_reapplies(tmp_path) -> None:
    model = tiny_model()
    report = apply_recipe(model, "esft", experts=SELECTION, bias_update=True, verbose=False)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    manifest = save_finetuned_delta(model, tmp_path, task="unit-test")
    assert manifest["recipe"] == "esft" and manifest["task"] == "unit-test"
    assert manifest["tensors"]["model.layers.1.mlp.experts.gate_up_proj"] == {"experts": SELECTION[1]}

    from safetensors.torch import load_file

    stored = load_file(tmp_path / "delta.safetensors")
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert sum(t.numel() for t in stored.values()) == report.trainable + biases

    base = tiny_model()  # the same initial weights (seeded)
    assert not all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))
    apply_finetuned_delta(base, tmp_path)
    for (name, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name


def test_delta_refuses_a_different_base(tmp_path) -> None:
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    save_finetuned_delta(model, tmp_path)
    torch.manual_seed(0)
    other = MoEForCausalLM(tiny_config(num_nextn_predict_layers=1, moe_intermediate_size=12))
    with pytest.raises(ValueError, match="shape"):
        apply_finetuned_delta(other, tmp_path)
