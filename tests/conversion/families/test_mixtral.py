"""Mixtral record: its oracle cases (plain, sliding window; released checkpoints name the experts
`block_sparse_moe.experts.{e}.w1/w3/w2`) and its Switch balance-loss coefficient."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig

from hf_moe.conversion.families import config_from_moe, config_to_moe
from hf_moe.modeling.configuration import MoEConfig
from tests.conversion.families.oracle import TINY, Case

NAMING = ("block_sparse_moe", ("w1", "w3", "w2"))
CASES = {
    "mixtral": Case(MixtralConfig, dict(
        TINY, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02), True, NAMING),
    "mixtral_sliding": Case(MixtralConfig, dict(
        TINY, num_key_value_heads=1, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4), False, NAMING),
}  # fmt: skip


def test_family_specific_fields() -> None:
    mixtral = config_to_moe(CASES["mixtral_sliding"].config())
    assert (mixtral.norm_topk_prob, mixtral.n_shared_experts, mixtral.first_k_dense_replace) == (True, 0, 0)
    assert (mixtral.sliding_window, mixtral.router_bias_update_rate) == (4, 0.0)
    converted = config_to_moe(CASES["mixtral"].config())
    layers = len(converted.moe_layer_indices)
    assert converted.aux_loss_alpha == pytest.approx(0.02 * 2 / layers)  # coef * K / L: same strength


def test_export_refuses_what_the_family_cannot_express() -> None:
    moe = config_to_moe(CASES["mixtral"].config())
    sigmoid = MoEConfig(**{**moe.to_dict(), "scoring_func": "sigmoid", "norm_topk_prob": True})
    with pytest.raises(ValueError, match="scoring_func"):
        config_from_moe(sigmoid, "mixtral")


def test_switch_loss_coefficient_maps_to_the_same_loss_value() -> None:
    """One MoE layer: transformers' Mixtral balance loss == our aux loss with the converted coefficient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from hf_moe.modeling.losses import moe_auxiliary_loss
    from hf_moe.modeling.routing import RouterOutput

    mixtral = CASES["mixtral"].config(num_hidden_layers=1)
    ours = config_to_moe(mixtral)
    logits = torch.randn(12, 4)
    topk_ids = logits.softmax(-1).topk(2, dim=-1).indices
    theirs = mixtral.router_aux_loss_coef * load_balancing_loss_func((logits,), 4, 2)
    routing = RouterOutput(logits=logits, topk_ids=topk_ids, topk_weights=torch.ones(12, 2))
    torch.testing.assert_close(moe_auxiliary_loss([routing], None, (3, 4), ours), theirs)
    back = config_from_moe(ours, "mixtral")
    assert back.router_aux_loss_coef == pytest.approx(mixtral.router_aux_loss_coef)
