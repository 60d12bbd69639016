"""The router on tiny hand-computed examples: scores, top-k, groups, bias, gate values, capacity, noise, counts.

Every router here has hidden size = number of experts and an identity weight, so its logits are its inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling.routing import Router, drop_over_capacity, expert_capacity, valid_tokens
from tests.conftest import tiny_config


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def make_router(experts: int = 4, top_k: int = 2, **overrides: object) -> Router:
    fields: dict = dict(hidden_size=experts, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=1,
                        topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                        routed_scaling_factor=1.0)
    fields.update(overrides)
    router = Router(tiny_config(**fields)).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
    return router


X = [2.0, 1.0, 0.0, -1.0]


def route(router: Router, rows: list[list[float]]) -> tuple[list[list[int]], list[list[float]]]:
    out = router(torch.tensor(rows))
    return out.topk_ids.tolist(), out.topk_weights.tolist()


def test_softmax_scores_pick_the_top_k_and_gate_with_their_probabilities() -> None:
    ids, weights = route(make_router(), [X])
    p = softmax(X)
    assert ids == [[0, 1]]
    assert weights[0] == pytest.approx([p[0], p[1]], rel=1e-6)


def test_sigmoid_gates_renormalised_then_scaled() -> None:
    """DeepSeek-V3 eq. 13-16: g = s / sum of the chosen s, times routed_scaling_factor."""
    ids, weights = route(make_router(scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5), [X])
    s0, s1 = sigmoid(2.0), sigmoid(1.0)
    assert ids == [[0, 1]]
    assert weights[0] == pytest.approx([2.5 * s0 / (s0 + s1), 2.5 * s1 / (s0 + s1)], rel=1e-6)
    _, plain = route(make_router(scoring_func="sigmoid", routed_scaling_factor=2.5), [X])
    assert plain[0] == pytest.approx([2.5 * s0, 2.5 * s1], rel=1e-6)  # without norm_topk_prob


def test_the_bias_chooses_but_the_gates_use_the_unbiased_scores() -> None:
    router = make_router(scoring_func="sigmoid")
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    ids, weights = route(router, [X])
    assert ids == [[2, 0]]  # 0.5 + 5 beats sigmoid(2) + 0
    assert weights[0] == pytest.approx([sigmoid(0.0), sigmoid(2.0)], rel=1e-6)


def test_mixtral_softmax_over_the_top_k_logits() -> None:
    ids, weights = route(make_router(topk_before_softmax=True), [X])
    assert ids == [[0, 1]]
    assert weights[0] == pytest.approx(softmax([2.0, 1.0]), rel=1e-6)


GROUPED = [3.0, -3.0, 1.0, 0.9, 0.5, 0.4, -3.0, -3.0]  # 4 groups of 2 experts


def best_groups(group_scores: list[float], keep: int) -> list[int]:
    return sorted(range(len(group_scores)), key=lambda g: -group_scores[g])[:keep]


def test_group_limited_top_k_deepseek_v3_sums_each_groups_top_two() -> None:
    """noaux_tc: group score = sum of its two best sigmoid scores; experts only from the 2 best groups."""
    s = [sigmoid(x) for x in GROUPED]
    groups = best_groups([s[2 * g] + s[2 * g + 1] for g in range(4)], 2)
    assert sorted(groups) == [1, 2]  # group 0 holds the single best expert but the weakest pair but one
    allowed = [e for g in groups for e in (2 * g, 2 * g + 1)]
    expected = sorted(allowed, key=lambda e: -s[e])[:2]
    router = make_router(8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)
    ids, weights = route(router, [GROUPED])
    assert ids == [expected] == [[2, 3]]
    assert weights[0] == pytest.approx([s[2], s[3]], rel=1e-6)


def test_group_limited_top_k_deepseek_v2_takes_each_groups_best() -> None:
    """group_limited_greedy: group score = its best softmax score."""
    p = softmax(GROUPED)
    groups = best_groups([max(p[2 * g], p[2 * g + 1]) for g in range(4)], 2)
    allowed = [e for g in groups for e in (2 * g, 2 * g + 1)]
    expected = sorted(allowed, key=lambda e: -p[e])[:2]
    router = make_router(8, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    ids, weights = route(router, [GROUPED])
    assert ids == [expected] == [[0, 2]]
    assert weights[0] == pytest.approx([p[0], p[2]], rel=1e-6)


def test_the_bias_takes_part_in_the_group_choice() -> None:
    """DeepSeek-V3 scores groups with the biased scores: a bias on expert 6 lifts group 3 above group 2."""
    router = make_router(8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 0, 2.0, 0]))
    ids, _ = route(router, [GROUPED])
    assert ids == [[6, 2]]  # sigmoid(-3) + 2 > sigmoid(1) > sigmoid(0.9)


def test_capacity_is_the_ceiling_of_the_fair_share() -> None:
    assert expert_capacity(num_tokens=4, top_k=2, num_experts=4, capacity_factor=1.0) == 2
    assert expert_capacity(num_tokens=4, top_k=2, num_experts=4, capacity_factor=1.25) == 3  # ceil(2.5)
    assert expert_capacity(num_tokens=3, top_k=1, num_experts=4, capacity_factor=1.0) == 1  # ceil(0.75)


CHOICES = [[0, 1], [0, 2], [0, 1], [1, 0]]  # (tokens 4, K 2): first then second choice of each token


def test_gshard_capacity_keeps_every_first_choice_before_any_second_choice() -> None:
    """Capacity 2 per expert. In GShard's order (all first choices in token order, then all second choices):
    expert 0 takes the first choices of tokens 0 and 1, so token 2's first choice and token 3's second choice
    (both expert 0) drop; expert 1 takes token 3's first choice and token 0's second, so token 2's second
    drops. Token order alone would have kept token 2's second choice and dropped token 3's first."""
    kept = drop_over_capacity(torch.tensor(CHOICES), torch.ones(4, 2), num_experts=4, capacity_factor=1.0)
    assert kept.tolist() == [[1, 1], [1, 1], [0, 0], [1, 0]]


def test_router_with_capacity_zeroes_dropped_gates_and_does_not_count_them() -> None:
    rows = [[3.0, 2.0, 0.0, -1.0], [3.0, 0.0, 2.0, -1.0], [3.0, 2.0, -1.0, 0.0], [2.0, 3.0, 0.0, -1.0]]  # CHOICES
    router = make_router(capacity_factor=1.0).train()
    out = router(torch.tensor(rows))
    assert out.topk_ids.tolist() == CHOICES
    assert (out.topk_weights != 0).tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert out.topk_weights[0].tolist() == pytest.approx(softmax(rows[0])[:2], rel=1e-6)
    assert router.tokens_per_expert.tolist() == [2, 2, 1, 0]  # the kept slots only


def test_jitter_multiplies_the_inputs_in_training_only() -> None:
    """Switch: x * U(1 - eps, 1 + eps) in training; the logits (= inputs here) stay within that band."""
    router = make_router(router_jitter_noise=0.1)
    x = torch.tensor([X] * 64)
    assert torch.equal(router(x).logits, x)  # eval: no jitter
    router.train()
    first, second = router(x).logits, router(x).logits
    ratio = first[x != 0] / x[x != 0]
    assert not torch.equal(first, x) and not torch.equal(first, second)
    assert ((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6)).all()
    assert torch.equal(first[x == 0], x[x == 0])


def test_logit_noise_changes_the_choice_in_training_but_not_the_reported_logits() -> None:
    """Noisy top-k (Shazeer 2017): Gaussian noise on the logits before scoring, in training only; the router
    returns the clean logits (what the balance losses read)."""
    router = make_router(router_logit_noise=2.0)
    x = torch.tensor([X] * 64)
    clean = router(x)
    assert (clean.topk_ids == torch.tensor([0, 1])).all()
    router.train()
    noisy = router(x)
    assert torch.equal(noisy.logits, x)
    assert (noisy.topk_ids != clean.topk_ids).any()  # 64 identical tokens, some routed elsewhere
    assert not torch.allclose(noisy.topk_weights, clean.topk_weights)


def test_load_is_counted_only_in_training_with_grad_and_only_for_real_tokens() -> None:
    router = make_router()
    x = torch.tensor([X, [0.0, 0.0, 3.0, 2.0], X])  # top-2: {0, 1}, {2, 3}, {0, 1}
    router(x)
    assert router.tokens_per_expert.sum() == 0  # eval
    router.train()
    with torch.no_grad():
        router(x)
    assert router.tokens_per_expert.sum() == 0  # no grad (e.g. evaluation inside training)
    router(x, token_mask=torch.tensor([True, True, False]))  # the last token is padding
    assert router.tokens_per_expert.tolist() == [1, 1, 1, 1]


def test_valid_tokens_reads_the_current_positions_of_a_2d_mask() -> None:
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # (B, past 1 + current 3)
    assert valid_tokens(mask, 3).tolist() == [[True, True, True], [True, False, False]]
    assert valid_tokens(None, 3) is None
    assert valid_tokens(torch.ones(2, 1, 3, 3), 3) is None  # a 4-D attention mask is no padding mask


def test_router_state_stays_fp32_when_the_model_is_cast() -> None:
    model = MoEForCausalLM(tiny_config()).to(torch.bfloat16)
    router = model.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.tokens_per_expert.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    out = model(torch.randint(3, 97, (1, 4)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
