"""Drops by position: a hand count on a tiny trace, and the offline replay equals the model's own drops."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.analysis import TokenSequence, drop_rate_by_position, dropped_slots, trace_routing

from ..conftest import tiny_config
from .conftest import random_trace


def _trace_of(topk_ids: list[list[int]], positions: list[int], sequences: list[int], batches: list[int], experts: int):
    trace = random_trace(tokens=len(positions), layers=1, experts=experts, top_k=len(topk_ids[0]))
    trace.topk_ids = torch.tensor([topk_ids])
    trace.positions, trace.sequences, trace.batches = (torch.tensor(v) for v in (positions, sequences, batches))
    return trace


def test_drop_rates_by_position_match_a_hand_count() -> None:
    # 3 experts, top-2, capacity factor 1: ceil(1 * 3 tokens * 2 / 3) = 2 slots per expert and group.
    # One group = one batch of one sequence of 3 tokens: t0 (0, 1), t1 (0, 2), t2 (0, 1).
    # First choices in token order: expert 0 takes t0, t1; t2's first choice is over capacity (dropped).
    # Second choices: expert 1 takes t0, t2 (2 slots), expert 2 takes t1: nothing else dropped.
    choices = [[0, 1], [0, 2], [0, 1]]
    assert dropped_slots(torch.tensor(choices), 3, 1.0).tolist() == [[False, False], [False, False], [True, False]]
    # two batches of this sequence: drops per position are 0, 0, 1 slot in each
    trace = _trace_of(choices * 2, [0, 1, 2] * 2, [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], experts=3)
    drops = drop_rate_by_position(trace, capacity_factor=1.0, num_buckets=3, length=3)
    assert drops.buckets == ["0-0", "1-1", "2-2"]
    assert drops.dropped[0].tolist() == [0, 0, 2] and drops.slots.tolist() == [4, 4, 4]
    assert drops.rates[0].tolist() == [0.0, 0.0, 0.5] and drops.overall == [pytest.approx(2 / 12)]
    assert drops.capacities == [2]
    # both sequences in one batch: 6 tokens, capacity ceil(6 * 2 / 3) = 4; first choices 0 x 6: the last two
    # (t1 and t2 of the second sequence) are dropped; second choices: expert 1 gets 4, expert 2 gets 2.
    trace.batches = torch.zeros(6, dtype=torch.long)
    drops = drop_rate_by_position(trace, capacity_factor=1.0, num_buckets=3, length=3)
    assert drops.dropped[0].tolist() == [0, 1, 1] and drops.capacities == [4]
    # grouped by sequence again whatever the batches
    drops = drop_rate_by_position(trace, capacity_factor=1.0, num_buckets=3, length=3, group_by="sequence")
    assert drops.dropped[0].tolist() == [0, 0, 2]
    # a generous capacity drops nothing
    assert drop_rate_by_position(trace, capacity_factor=3.0, num_buckets=3).dropped.sum() == 0


def test_drop_rate_needs_a_capacity_factor_and_valid_grouping() -> None:
    trace = random_trace(tokens=64)
    with pytest.raises(ValueError, match="dropless"):
        drop_rate_by_position(trace)
    with pytest.raises(ValueError, match="group_by='token'"):
        drop_rate_by_position(trace, 1.0, group_by="token")
    with pytest.raises(ValueError, match="capacity_factor=0"):
        drop_rate_by_position(trace, 0)


def test_offline_replay_equals_the_models_own_drops() -> None:
    """A model with capacity_factor 1 zeroes the gates of the slots it drops; replaying its rule offline on
    the traced choices of each batch must find exactly those slots."""
    model = MoEForCausalLM(tiny_config(capacity_factor=1.0, num_hidden_layers=3)).eval()
    sequences = [TokenSequence(0, torch.randint(3, 97, (20,))) for _ in range(6)]  # equal lengths: no padding
    trace = trace_routing(model, sequences, batch_size=3, progress=False)
    assert trace.capacity_factor == 1.0
    dropped_by_model = trace.topk_weights == 0
    assert dropped_by_model.any()  # the check below is not vacuous
    for layer in range(len(trace.layers)):
        for batch in range(2):
            rows = trace.batches == batch
            replayed = dropped_slots(trace.topk_ids[layer, rows], trace.num_experts, 1.0)
            assert torch.equal(replayed, dropped_by_model[layer, rows])
    drops = drop_rate_by_position(trace, num_buckets=4)  # the model's own factor by default
    assert drops.capacity_factor == 1.0
    assert drops.dropped.sum() == dropped_by_model.sum()
