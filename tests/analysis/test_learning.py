"""Early routing learning: identical checkpoints agree fully, a perturbed router agrees less."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_moe.analysis import routing_agreement, set_agreement, trace_routing

from .conftest import domain_sequences, hand_set_model, random_trace


def test_set_agreement_ignores_order_and_counts_shared_experts() -> None:
    a = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    b = torch.tensor([[1, 0], [2, 4], [6, 7], [6, 7]])
    equal, overlap = set_agreement(a, b)
    assert equal == 0.5  # rows 0 (same set, other order) and 3
    assert overlap == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_identical_checkpoint_agrees_fully_and_a_perturbed_one_less() -> None:
    model = hand_set_model()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in perturbed.model.layers:  # another expert wins for some tokens
            layer.mlp.gate.weight[:, :8] += 12 * torch.randn(8, 8)
    data = domain_sequences(4, 16)
    final = trace_routing(model, data, ["a", "b"], progress=False)
    same = trace_routing(copy.deepcopy(model), data, ["a", "b"], progress=False)
    other = trace_routing(perturbed, data, ["a", "b"], progress=False)
    result = routing_agreement(final, [other, same], ["perturbed", "same"], steps=[10, 20])
    assert result.agreement[1].tolist() == [1.0, 1.0] and result.overlap[1].tolist() == [1.0, 1.0]
    assert torch.all(result.agreement[0] < 1.0) and torch.all(result.overlap[0] >= result.agreement[0])
    assert result.steps == [10, 20] and result.layers == final.layers


def test_agreement_refuses_traces_of_other_tokens_or_shapes() -> None:
    final = random_trace(tokens=100)
    with pytest.raises(ValueError, match="other tokens"):
        routing_agreement(final, [random_trace(tokens=100, seed=1)], ["c1"])
    with pytest.raises(ValueError, match="experts"):
        routing_agreement(final, [random_trace(tokens=100, experts=16)], ["c1"])
