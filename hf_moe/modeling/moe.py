"""MoEBlock: router + routed experts + shared experts (DeepSeekMoE eq. 3-5; Qwen2-MoE's gated shared expert).

With `config.gate_on_expert_input` (Llama 4) the gate scales each chosen expert's input instead of its output,
h = sum_k FFN_k(g_k x): every (token, choice) slot becomes a row of its own with weight 1 (`gated_inputs`), so
every experts backend computes it unchanged."""

from __future__ import annotations

import torch
from torch import nn

from .configuration import MoEConfig
from .experts import MLP, RoutedExperts
from .router_types import build_router
from .routing import RouterOutput
from .routing_inputs import RoutingInputs


class MoEBlock(nn.Module):
    """h = sum_k g_k FFN_k(x) [+ b] + [sigmoid(x w_s)] * SharedFFN(x). Returns the output and the router's decision."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = build_router(config)  # config.router_type
        self.experts = RoutedExperts(config)
        self.shared_experts = MLP(config, config.shared_intermediate_size) if config.shared_intermediate_size else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.moe_output_bias else None  # JetMoE

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
        routing_inputs: RoutingInputs | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        """hidden_states (B, T, H); token_mask (B*T,) bool of real tokens (for the router's load counters);
        routing_inputs: token ids / replayed choices for the router."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # (T, H)
        routing = self.gate(tokens, token_mask, routing_inputs)
        if self.config.gate_on_expert_input:
            output = gated_inputs(self.experts, tokens, routing.topk_ids, routing.topk_weights)
        else:
            output = self.experts(tokens, routing.topk_ids, routing.topk_weights.to(tokens.dtype))  # (T, H)
        if self.bias is not None:
            output = output + self.bias
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            output = output + shared
        return output.view(shape), routing


def gated_inputs(experts: nn.Module, tokens: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
                 ) -> torch.Tensor:  # fmt: skip
    """sum_k FFN_{e_k}(g_k x) for tokens (T, H), ids and gates (T, K): one row per slot, gate 1, summed over k."""
    num_tokens, top_k = topk_ids.shape
    rows = tokens.repeat_interleave(top_k, dim=0) * topk_weights.reshape(-1, 1).to(tokens.dtype)  # (T*K, H)
    ones = torch.ones(num_tokens * top_k, 1, dtype=tokens.dtype, device=tokens.device)
    out = experts(rows, topk_ids.reshape(-1, 1), ones)  # (T*K, H)
    out = out * (topk_weights.reshape(-1, 1) != 0).to(out.dtype)  # a dropped slot adds nothing, even FFN_e(0) != 0
    return out.view(num_tokens, top_k, -1).sum(dim=1)
