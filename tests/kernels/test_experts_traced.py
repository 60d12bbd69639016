"""The shape-stable experts forms (gathered decode, dense) and the hf_moe::fused_experts op equal the eager
reference, forward and backward, and trace into one graph without host syncs."""

from __future__ import annotations

import pytest
import torch

from hf_moe.kernels.experts.traced import fused_experts_op, traced_fused_experts
from hf_moe.modeling.experts import RoutedExperts, dense_experts, gathered_experts, static_experts
from tests.conftest import tiny_config

NUM_EXPERTS, TOP_K = 8, 2


def setup(tokens: int) -> tuple[RoutedExperts, torch.Tensor, torch.Tensor, torch.Tensor]:
    experts = RoutedExperts(tiny_config())
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    hidden = torch.randn(tokens, experts.hidden_dim, requires_grad=True)
    ids = torch.randn(tokens, NUM_EXPERTS).topk(TOP_K, dim=-1).indices
    weights = torch.rand(tokens, TOP_K, requires_grad=True)
    return experts, hidden, ids, weights


def reference(experts: RoutedExperts, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return type(experts).forward.__wrapped__(experts, hidden, ids, weights)  # the eager loop


def grads(out: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out.square().sum(), inputs)


@pytest.mark.parametrize(("form", "tokens"), [(gathered_experts, 1), (gathered_experts, 3), (dense_experts, 11),
                                              (static_experts, 2), (static_experts, 11)])
def test_static_forms_equal_the_loop(form: object, tokens: int) -> None:
    experts, hidden, ids, weights = setup(tokens)
    params = (hidden, experts.gate_up_proj, experts.down_proj, weights)
    expected = reference(experts, hidden, ids, weights)
    got = form(hidden, ids, weights, experts.gate_up_proj, experts.down_proj)  # default unit: SwiGLU
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads(got, *params), grads(expected, *params)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", [gathered_experts, dense_experts])
def test_static_forms_apply_the_configured_unit_and_expert_biases(form: object) -> None:
    """gpt-oss's clamped unit with expert biases (fam variants): the traced forms equal the eager loop."""
    config = tiny_config(glu_type="gpt_oss", glu_limit=0.5, expert_bias=True)
    experts = RoutedExperts(config)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.3)
    hidden = torch.randn(3, experts.hidden_dim)
    ids = torch.randn(3, NUM_EXPERTS).topk(TOP_K, dim=-1).indices
    weights = torch.rand(3, TOP_K)
    expected = reference(experts, hidden, ids, weights)
    got = form(hidden, ids, weights, experts.gate_up_proj, experts.down_proj, experts.unit,
               experts.gate_up_proj_bias, experts.down_proj_bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = form(hidden, ids, weights, experts.gate_up_proj, experts.down_proj)
    assert (plain - expected).abs().max() > 1e-3  # the unit and biases matter here


@pytest.mark.parametrize("mode", ["loop", "grouped_mm"])
def test_fused_experts_op_equals_the_loop_forward_and_backward(mode: str) -> None:
    experts, hidden, ids, weights = setup(13)  # 26 slots > 8 experts: the op, not the gathered form
    params = (hidden, experts.gate_up_proj, experts.down_proj, weights)
    expected = reference(experts, hidden, ids, weights)
    got = traced_fused_experts(hidden, ids, weights, experts.gate_up_proj, experts.down_proj, mode)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads(got, *params), grads(expected, *params)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_fused_experts_op_passes_torch_opcheck() -> None:
    experts, hidden, ids, weights = setup(6)
    args = (hidden, experts.gate_up_proj, experts.down_proj, ids, weights, "loop")
    torch.library.opcheck(fused_experts_op, args, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))


@pytest.mark.parametrize("tokens", [1, 13])  # the gathered form, the op
def test_backends_trace_into_one_graph(tokens: int) -> None:
    """hf_moe_auto / hf_moe_fused traced with fullgraph=True (no `.tolist()`, no graph break), values unchanged."""
    from hf_moe.kernels.experts.backends import BACKENDS

    experts, hidden, ids, weights = setup(tokens)
    expected = reference(experts, hidden, ids, weights)
    for name in ("hf_moe_auto", "hf_moe_fused"):
        torch._dynamo.reset()
        compiled = torch.compile(BACKENDS[name], backend="aot_eager", fullgraph=True)
        got = compiled(experts, hidden, ids, weights)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        grads(got, hidden)  # backward through the traced graph
    torch._dynamo.reset()
