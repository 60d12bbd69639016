"""The eager reference experts (`RoutedExperts.forward`, what every backend must match) against a plain loop
over tokens and their chosen experts, and against transformers' own MixtralExperts; forward and backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_moe.modeling.experts import RoutedExperts
from tests.conftest import tiny_config

E, H, I, T, K = 4, 6, 5, 7, 2  # noqa: E741 - experts, hidden, intermediate, tokens, experts per token


def make_experts() -> RoutedExperts:
    config = tiny_config(n_routed_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                         n_group=1, topk_group=1, topk_method="greedy")
    config._experts_implementation = "eager"
    experts = RoutedExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H) * 0.5)
        experts.down_proj.copy_(torch.randn(E, H, I) * 0.5)
    return experts


def routing_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (T, H), chosen experts (T, K) (expert 3 never chosen) and gates (T, K) (one dropped slot, 0)."""
    hidden = torch.randn(T, H)
    ids = torch.tensor([[0, 1], [1, 0], [2, 0], [1, 2], [0, 2], [2, 1], [1, 0]])
    weights = torch.rand(T, K) + 0.1
    weights[4, 1] = 0.0
    return hidden, ids, weights


def loop_reference(experts: RoutedExperts, hidden: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k g_{t,k} W_down[e] (silu(W_gate[e] x_t) * W_up[e] x_t), gate rows first in gate_up_proj."""
    rows = []
    for t in range(hidden.shape[0]):
        y = torch.zeros(H)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate = experts.gate_up_proj[e, :I] @ hidden[t]  # (I,)
            up = experts.gate_up_proj[e, I:] @ hidden[t]
            y = y + weights[t, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
        rows.append(y)
    return torch.stack(rows)


def forward_and_grads(function: object, experts: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hidden, weights = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    out = function(experts, hidden, ids, weights)
    upstream = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (hidden, weights, experts.gate_up_proj, experts.down_proj), upstream)
    return out, list(grads)


def test_eager_experts_equal_a_loop_over_tokens_forward_and_backward() -> None:
    experts = make_experts()
    hidden, ids, weights = routing_inputs()
    out, grads = forward_and_grads(lambda m, *a: m(*a), experts, hidden, ids, weights)
    ref, ref_grads = forward_and_grads(loop_reference, experts, hidden, ids, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, grad, ref_grad in zip(("hidden", "weights", "gate_up_proj", "down_proj"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6, msg=name)


def test_an_unused_expert_gets_zero_gradient_and_a_zero_gate_adds_nothing() -> None:
    experts = make_experts()
    hidden, ids, weights = routing_inputs()
    _, (_, _, grad_gate_up, grad_down) = forward_and_grads(lambda m, *a: m(*a), experts, hidden, ids, weights)
    assert torch.count_nonzero(grad_gate_up[3]) == 0 and torch.count_nonzero(grad_down[3]) == 0
    assert torch.count_nonzero(grad_down[2]) > 0
    with torch.no_grad():
        dropped = experts(hidden, ids, weights)
        alone = experts(hidden, ids[:, :1], weights[:, :1])  # token 4 keeps only its first slot
    torch.testing.assert_close(dropped[4], alone[4], rtol=1e-6, atol=1e-7)


def test_eager_experts_equal_transformers_mixtral_experts() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    ours = make_experts()
    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "eager"
    theirs = MixtralExperts(config)
    theirs.load_state_dict(ours.state_dict())
    hidden, ids, weights = routing_inputs()
    out, grads = forward_and_grads(lambda m, *a: m(*a), ours, hidden, ids, weights)
    ref, ref_grads = forward_and_grads(lambda m, *a: m(*a), theirs, hidden, ids, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
