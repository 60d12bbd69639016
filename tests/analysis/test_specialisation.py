"""Specialisation scores on routing we know: fixed by token id (1.0), uniformly random (~0), a planted split."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe.analysis import (
    domain_specialisation,
    group_specialisation,
    position_buckets,
    position_specialisation,
    token_id_specialisation,
    trace_routing,
)
from hf_moe.analysis.specialisation import normalised_mutual_information

from .conftest import EXPERTS, HALF, domain_sequences, expert_pair, hand_set_model, random_trace

# uniformly random routing of a few thousand tokens: the rescaled scores' spread around 0 (measured over seeds
# at about +-0.01); 0.05 leaves room without letting a real effect (a planted split scores ~1) pass
RANDOM_TOLERANCE = 0.05


def test_hand_set_router_routes_by_token_id_and_scores_one() -> None:
    model = hand_set_model()
    trace = trace_routing(model, domain_sequences(6, 24), ["low ids", "high ids"], batch_size=4, progress=False)
    assert trace.layers == ["layer_0", "layer_1"] and trace.num_tokens == 12 * 24
    expected = torch.tensor([sorted(expert_pair(int(t))) for t in trace.token_ids])
    for layer in range(2):
        assert torch.equal(trace.expert_sets(layer), expected)  # the router does what it was set to do
    spec = token_id_specialisation(trace, min_count=2)
    assert spec.concentration == [1.0, 1.0] and spec.score == [1.0, 1.0]
    assert spec.explained == [1.0, 1.0] and spec.explained_score == [1.0, 1.0]
    assert all(c < 0.9 for c in spec.chance)  # the baseline is well below: the 1.0 is not a degenerate 0/0
    top = spec.top_tokens[0][0]  # expert 0 takes ids whose pair holds 0, each with all its occurrences
    assert top and all(0 in expert_pair(token) and share == 1.0 for token, share, _ in top)
    # the planted domain split: ids < HALF use experts 0-3 only, the others 4-7 only
    domain = domain_specialisation(trace)
    assert domain.score == pytest.approx([1.0, 1.0], abs=1e-12) and domain.nmi == pytest.approx([1.0, 1.0], abs=1e-12)
    assert torch.all(domain.shares[:, 0, 4:] == 0) and torch.all(domain.shares[:, 1, :4] == 0)
    assert torch.allclose(domain.shares.sum(dim=-1), torch.full((2, 2), 2.0))  # each token chose K = 2


def test_uniform_random_routing_scores_about_zero() -> None:
    trace = random_trace(tokens=4000)
    token = token_id_specialisation(trace)
    for value in token.score + token.explained_score:
        assert abs(value) < RANDOM_TOLERANCE
    assert all(c > 0.02 for c in token.concentration)  # raw concentration is not 0: finite samples
    for spec in (domain_specialisation(trace), position_specialisation(trace, num_buckets=4)):
        assert all(abs(v) < RANDOM_TOLERANCE for v in spec.score)
        assert torch.allclose(spec.ratio, torch.ones_like(spec.ratio), atol=0.25)


def test_planted_domain_split_in_a_random_trace_is_detected() -> None:
    trace = random_trace(tokens=4000)
    half = trace.domains == 1  # domain 1 moves three quarters of its tokens to experts 4-7 (keeping K distinct)
    moved = half & (torch.arange(trace.num_tokens) % 4 != 0)
    for layer in range(2):
        ids = trace.topk_ids[layer]
        ids[moved] = torch.stack([torch.randperm(4)[:2] + 4 for _ in range(int(moved.sum()))])
        ids[~half] = torch.stack([torch.randperm(4)[:2] for _ in range(int((~half).sum()))])
    spec = domain_specialisation(trace)
    assert all(0.4 < s < 1.0 for s in spec.score)
    assert torch.all(spec.ratio[:, 0, :4] > 1.5) and torch.all(spec.ratio[:, 1, :4] < 0.5)


def test_position_specialisation_finds_a_first_token_expert() -> None:
    trace = random_trace(tokens=2048, seq_len=32)
    first = trace.positions < 4
    trace.topk_ids[:, first, 0] = 7  # the first tokens always choose expert 7 first
    trace.topk_ids[:, first, 1] = torch.randint(0, 7, (int(first.sum()),))
    trace.topk_ids[:, ~first] = torch.rand(2, int((~first).sum()), 7).argsort(dim=-1)[..., :2]  # the others never
    spec = position_specialisation(trace, num_buckets=8, length=32)
    assert spec.groups[0] == "0-3" and spec.groups[-1] == "28-31"
    assert torch.all(spec.shares[:, 0, 7] == 1.0) and torch.all(spec.shares[:, 1:, 7] == 0)
    assert torch.all(spec.ratio[:, 0, 7] > 7.5)  # 1/8 of the tokens make all of expert 7's load
    assert all(s > RANDOM_TOLERANCE for s in spec.score)


def test_position_split_in_halves_scores_one_third_of_eight_buckets() -> None:
    """Positions 0-15 use experts 0-3, positions 16-31 experts 4-7: an expert names the half, not the bucket
    inside it, so I(bucket; expert) = log 2 of H(bucket) = log 8."""
    trace = random_trace(tokens=4096, seq_len=32)
    late = trace.positions >= 16
    trace.topk_ids[:] = torch.rand(2, trace.num_tokens, 4).argsort(dim=-1)[..., :2] + 4 * late.view(1, -1, 1)
    spec = position_specialisation(trace, num_buckets=8, length=32)
    assert spec.score == pytest.approx([1 / 3, 1 / 3], abs=0.02)


def test_position_buckets_cover_every_position() -> None:
    index, labels = position_buckets(torch.arange(10), 4, length=10)
    assert labels == ["0-1", "2-4", "5-6", "7-9"]
    assert index.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    index, labels = position_buckets(torch.arange(3), 8)  # fewer positions than buckets
    assert labels == ["0-0", "1-1", "2-2"] and index.tolist() == [0, 1, 2]


def test_normalised_mutual_information_by_hand() -> None:
    assert normalised_mutual_information(torch.tensor([[5.0, 0], [0, 5]])) == pytest.approx(1.0, abs=1e-12)
    assert abs(normalised_mutual_information(torch.tensor([[3.0, 3], [1, 1]]))) < 1e-12
    # G uniform over 2, E | G=0 ~ (1, 0), E | G=1 ~ (1/2, 1/2): I = H(E) - H(E|G)
    h_e = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (h_e - 0.5 * math.log(2)) / math.log(2)
    assert abs(normalised_mutual_information(torch.tensor([[4.0, 0], [2, 2]])) - expected) < 1e-12
    assert math.isnan(normalised_mutual_information(torch.tensor([[3.0, 1]])))  # one group: H(G) = 0


def test_group_specialisation_shares_are_token_fractions() -> None:
    trace = random_trace(tokens=8, layers=1, experts=4, top_k=2)
    trace.topk_ids[0] = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [0, 1], [0, 1], [2, 3], [2, 3]])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    spec = group_specialisation(trace, groups, ["x", "y"], permutations=0)
    assert spec.shares[0, 0].tolist() == [0.75, 0.5, 0.5, 0.25] and spec.shares[0, 1].tolist() == [0.5, 0.5, 0.5, 0.5]
    assert spec.overall[0].tolist() == [5 / 8, 4 / 8, 4 / 8, 3 / 8]
    assert torch.allclose(spec.ratio[0, 0], torch.tensor([0.75 / 0.625, 1, 1, 0.25 / 0.375]))
    assert spec.chance == [0.0] and spec.score == spec.nmi


def test_hand_set_router_sets_are_as_designed() -> None:
    pairs = {expert_pair(t) for t in range(2 * HALF)}
    assert all(a != b for a, b in pairs)
    assert all(max(p) < 4 for p in map(expert_pair, range(HALF)))
    assert all(min(p) >= 4 and max(p) < EXPERTS for p in map(expert_pair, range(HALF, 2 * HALF)))
