"""Feed-forward networks: the SwiGLU MLP (dense layers, shared experts) and the routed experts.

Routed experts are stored as fused 3-D weights, `gate_up_proj (N, 2I, H)` (gate rows, then up rows) and
`down_proj (N, H, I)`, the layout of transformers' experts interface: `@use_experts_implementation` lets
`config._experts_implementation` pick a backend (eager reference below, grouped_mm, our fused kernels...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .configuration import MoEConfig
from .kernel_hooks import run_kernel


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer 2020, SwiGLU). The "swiglu" kernel takes the calls it is eligible for."""

    def __init__(self, config: MoEConfig, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused = config.hidden_act in ("silu", "swish")  # SwiGLU proper: kernels may fuse it; False forbids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_kernel("swiglu", self, x)
        if out is not None:
            return out
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class RoutedExperts(nn.Module):
    """N SwiGLU experts in two fused 3-D parameters. `forward` is the eager reference every backend must match:
    y_t = sum_k g_{t,k} * FFN_{e_{t,k}}(x_t) (DeepSeekMoE eq. 3)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
        output = torch.zeros_like(hidden_states)
        slot_tokens, slot_experts = top_k_index.shape[1], top_k_index.reshape(-1)  # (T*K,)
        order = torch.argsort(slot_experts, stable=True)  # slots grouped by expert
        counts = torch.bincount(slot_experts, minlength=self.num_experts).tolist()
        for expert, slots in zip(range(self.num_experts), order.split(counts)):
            if slots.numel() == 0:
                continue
            tokens = slots // slot_tokens  # (S_e,)
            gate, up = F.linear(hidden_states[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])  # (S_e, H)
            weights = top_k_weights.reshape(-1)[slots, None].to(expert_out.dtype)
            output.index_add_(0, tokens, (expert_out * weights).to(output.dtype))
        return output
