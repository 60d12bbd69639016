"""MoEBlock = routed experts weighted by the router's gates + the (optionally gated) shared experts, by hand;
tokens over an expert's capacity lose that expert's contribution and nothing else."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_moe.modeling.moe import MoEBlock
from tests.conftest import tiny_config

N, I = 4, 3  # noqa: E741 - experts (= hidden size, so that the identity router's logits are the tokens)
ROWS = [[3.0, 2.0, 0.0, -1.0], [3.0, 0.0, 2.0, -1.0], [3.0, 2.0, -1.0, 0.0], [2.0, 3.0, 0.0, -1.0]]
CHOICES = [[0, 1], [0, 2], [0, 1], [1, 0]]  # the top-2 of each row


def make_block(**overrides: object) -> MoEBlock:
    fields: dict = dict(hidden_size=N, n_routed_experts=N, num_experts_per_tok=2, moe_intermediate_size=I,
                        n_shared_experts=1, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                        norm_topk_prob=False, routed_scaling_factor=1.0)
    fields.update(overrides)
    config = tiny_config(**fields)
    config._experts_implementation = "eager"
    block = MoEBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
        block.gate.weight.copy_(torch.eye(N))
    return block


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down (silu(gate x) * up x) for one token x (H,)."""
    return down @ (F.silu(gate @ x) * (up @ x))


def by_hand(block: MoEBlock, x: torch.Tensor, gates: list[list[float]]) -> torch.Tensor:
    """sum_k g_k FFN_{e_k}(x_t) + [sigmoid(w_s x_t)] Shared(x_t) for every token, with the given gates."""
    experts, shared = block.experts, block.shared_experts
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(N)
        for e, g in zip(CHOICES[t], gates[t]):
            y = y + g * swiglu(x[t], experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:], experts.down_proj[e])
        if shared is not None:
            s = swiglu(x[t], shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
            if block.shared_expert_gate is not None:
                s = torch.sigmoid(block.shared_expert_gate.weight[0] @ x[t]) * s
            y = y + s
        rows.append(y)
    return torch.stack(rows)


def softmax_gates() -> list[list[float]]:
    gates = []
    for row, chosen in zip(ROWS, CHOICES):
        exps = [math.exp(v) for v in row]
        gates.append([exps[e] / sum(exps) for e in chosen])
    return gates


def test_block_output_is_gated_routed_experts_plus_the_gated_shared_expert() -> None:
    block = make_block(shared_expert_gate=True)
    x = torch.tensor(ROWS)
    with torch.no_grad():
        out, routing = block(x.view(2, 2, N))  # (B, T, H) in, the same shape out
    assert out.shape == (2, 2, N) and routing.topk_ids.tolist() == CHOICES
    torch.testing.assert_close(out.view(4, N), by_hand(block, x, softmax_gates()), rtol=1e-5, atol=1e-6)


def test_without_shared_experts_only_the_routed_experts_remain() -> None:
    block = make_block(n_shared_experts=0)
    assert block.shared_experts is None and block.shared_expert_gate is None
    x = torch.tensor(ROWS)
    with torch.no_grad():
        out, _ = block(x.view(1, 4, N))
    torch.testing.assert_close(out.view(4, N), by_hand(block, x, softmax_gates()), rtol=1e-5, atol=1e-6)


def test_capacity_drops_only_the_routed_contributions_over_capacity() -> None:
    """Capacity 2 (GShard order, see test_routing): token 2 loses both experts (only the shared expert is left),
    token 3 loses its second choice."""
    block = make_block(capacity_factor=1.0)
    x = torch.tensor(ROWS)
    with torch.no_grad():
        out, routing = block(x.view(1, 4, N))
    gates = softmax_gates()
    gates[2] = [0.0, 0.0]
    gates[3][1] = 0.0
    torch.testing.assert_close(out.view(4, N), by_hand(block, x, gates), rtol=1e-5, atol=1e-6)
    shared = block.shared_experts
    only_shared = swiglu(x[2], shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
    torch.testing.assert_close(out.view(4, N)[2], only_shared, rtol=1e-5, atol=1e-6)
    assert (routing.topk_weights != 0).tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_padding_is_routed_but_not_counted_as_load() -> None:
    block = make_block().train()
    block(torch.tensor(ROWS).view(1, 4, N), token_mask=torch.tensor([True, True, True, False]))
    assert block.gate.tokens_per_expert.tolist() == [3, 2, 1, 0]  # tokens 0-2 only
