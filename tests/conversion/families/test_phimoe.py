"""Phi-3.5-MoE record: its oracle cases (SparseMixer top-2 routing, LayerNorms with bias, attention and head
biases, a window on every layer), greedy generation, and what is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import PhimoeConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.greedy import assert_same_greedy
from tests.conversion.families.oracle import TINY, Case, family_model, inputs, ours_from

_NAMING = ("block_sparse_moe", ("w1", "w3", "w2"))
_RENAMES = (("mlp.router.weight", "block_sparse_moe.gate.weight"),)
CASES = {
    "phimoe": Case(PhimoeConfig, dict(
        TINY, num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3, eos_token_id=2), True, _NAMING, _RENAMES),
    "phimoe_window": Case(PhimoeConfig, dict(
        TINY, num_key_value_heads=4, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4, router_jitter_noise=0.01, eos_token_id=2), False, _NAMING, _RENAMES),
}  # fmt: skip


def test_family_specific_fields() -> None:
    phimoe = config_to_moe(CASES["phimoe"].config())
    assert (phimoe.topk_method, phimoe.sparsemixer_eps, phimoe.norm_type, phimoe.norm_bias) == (
        "sparsemixer", 0.3, "layer_norm", True)
    assert (phimoe.attention_bias, phimoe.attention_out_bias, phimoe.lm_head_bias) == (True, True, True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(case: str) -> None:
    assert_same_greedy(CASES[case])


def test_refuses_what_phimoe_cannot_express() -> None:
    moe = config_to_moe(CASES["phimoe"].config())
    for field, value in [("topk_method", "greedy"), ("norm_bias", False), ("mlp_bias", True)]:
        bad = MoEConfig(**{**moe.to_dict(), field: value})
        with pytest.raises(ValueError, match=field if field != "norm_bias" else "norm_type"):
            config_from_moe(bad, "phimoe")
    longrope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                    short_mscale=1.0, long_mscale=1.2, original_max_position_embeddings=32)  # fmt: skip
    with pytest.raises(ValueError, match="rope_parameters"):
        config_to_moe(CASES["phimoe"].config(rope_parameters=longrope))


def test_training_forward_and_gradients_match_transformers() -> None:
    """In training mode (SparseMixer sampling, Heun-scaled gates), seeded alike: same loss and router gradients."""
    theirs, config = family_model(CASES["phimoe"]._replace(fields={**CASES["phimoe"].fields,
                                                                  "router_aux_loss_coef": 0.0}))  # CE only
    moe_config = config_to_moe(config)
    ours = ours_from(moe_config, state_dict_to_moe("phimoe", theirs.state_dict(), moe_config))
    input_ids, mask = inputs(False)
    losses, grads = [], []
    for model, router in ((theirs, "model.layers.1.mlp.router.weight"), (ours, "model.layers.1.mlp.gate.weight")):
        model.train()
        torch.manual_seed(3)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(dict(model.named_parameters())[router].grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
