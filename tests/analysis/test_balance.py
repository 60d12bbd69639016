"""Load balance summary and co-activation by hand; the shared metric functions of hf_moe.training."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe.analysis import coactivation, load_balance
from hf_moe.training import dead_experts, load_percentiles, max_violation, routing_entropy

from .conftest import random_trace


def test_shared_metrics_by_hand() -> None:
    loads = torch.tensor([[4.0, 0, 2, 2], [0, 0, 0, 0]])
    dead = dead_experts(loads)
    assert dead[0].item() == 0.25 and math.isnan(dead[1].item())
    pct = load_percentiles(loads, (0.0, 0.5, 1.0))
    assert pct[0].tolist() == [0.0, 1.0, 2.0] and pct[1].isnan().all()
    uniform = routing_entropy(torch.full((3, 4), 0.25))
    assert torch.allclose(uniform, torch.full((3,), math.log(4)))
    assert routing_entropy(torch.tensor([[1.0, 0, 0, 0]])).item() == 0.0
    # sigmoid scores are normalised first: (0.5, 0.5) is the uniform distribution over 2 experts
    assert routing_entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))


def test_load_balance_summary_of_a_trace() -> None:
    trace = random_trace(tokens=4, layers=1, experts=4, top_k=2)
    trace.topk_ids[0] = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    trace.entropy[0] = torch.tensor([1.0, 2.0, 3.0, 2.0])
    balance = load_balance(trace)
    assert balance.loads[0].tolist() == [4, 3, 1, 0]
    assert balance.max_vio == [pytest.approx(max_violation(torch.tensor([4.0, 3, 1, 0])).item())]
    assert balance.max_vio[0] == pytest.approx(4 / 2 - 1)
    assert balance.dead == [0.25] and balance.entropy == [2.0]
    assert balance.entropy_fraction == [pytest.approx(2.0 / math.log(4))]
    assert balance.percentiles[0, 0].item() == 0.0 and balance.percentiles[0, -1].item() == 2.0


def test_coactivation_counts_and_lift_by_hand() -> None:
    trace = random_trace(tokens=4, layers=1, experts=4, top_k=2)
    trace.topk_ids[0] = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 2]])
    co = coactivation(trace)
    assert co.counts[0].tolist() == [[3, 2, 1, 0], [2, 2, 0, 0], [1, 0, 2, 1], [0, 0, 1, 1]]
    c = (2 - 1) * 4 / (2 * 3)  # pairs under uniform top-2 of 4 relative to P(i) P(j)
    assert co.lift[0, 0, 1].item() == pytest.approx((2 / 4) / (c * (3 / 4) * (2 / 4)))
    assert co.lift[0, 0, 3].item() == 0.0 and co.lift[0].diagonal().isnan().all()
    assert co.top_pairs(0, 1)[0][:2] == (2, 3)  # lift (1/4) / (c * 2/4 * 1/4) = 3


def test_uniform_top_k_has_lift_about_one() -> None:
    co = coactivation(random_trace(tokens=20000, layers=1))
    off = co.lift[0][~torch.eye(8, dtype=torch.bool)]
    assert torch.allclose(off, torch.ones_like(off), atol=0.1)
