"""Feed-forward networks: the SwiGLU MLP (dense layers, shared experts) and the routed experts.

Routed experts are stored as fused 3-D weights, `gate_up_proj (N, 2I, H)` (gate rows, then up rows) and
`down_proj (N, H, I)`, the layout of transformers' experts interface: `@use_experts_implementation` lets
`config._experts_implementation` pick a backend (eager reference below, grouped_mm, our fused kernels...).

While torch.compile or torch.export traces (`tracing()`), the reference runs a shape-stable form without host
syncs instead of its per-expert loop over `.tolist()` sizes: `gathered_experts` (the chosen experts' weights
gathered per token-slot, for at most `num_experts` slots: decode) or `dense_experts` (every expert on every token,
weighted by the gates, zero for experts not chosen: exact, N/K times the FLOPs of the loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .configuration import MoEConfig
from .kernel_hooks import run_kernel


def tracing() -> bool:
    """torch.compile (Dynamo) or torch.export traces this call: data-dependent host syncs must not run."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def gathered_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: nn.Module = F.silu) -> torch.Tensor:
    """y_t = sum_k w_tk W_d[e_tk] (act(g) * u), [g; u] = W_gu[e_tk] x_t with the weights of each token-slot's expert
    gathered: static shapes, no host sync, no per-expert loop. Reads (and copies) T*K experts' weights: the decode
    form (T*K <= N). hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
    num_tokens, top_k = top_k_index.shape
    slot_experts = top_k_index.reshape(-1)  # (S,)
    x_slots = hidden_states.repeat_interleave(top_k, dim=0) if top_k > 1 else hidden_states  # (S, H)
    gate_up = torch.bmm(gate_up_proj.index_select(0, slot_experts), x_slots.unsqueeze(-1)).squeeze(-1)  # (S, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    act = act_fn(gate) * up * top_k_weights.reshape(-1, 1).to(up.dtype)  # (S, I), gate before the down projection
    out = torch.bmm(down_proj.index_select(0, slot_experts), act.unsqueeze(-1)).squeeze(-1)  # (S, H)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def dense_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: nn.Module = F.silu) -> torch.Tensor:
    """The same sum with every expert applied to every token and weighted by its gate (0 where not chosen): static
    shapes, no host sync, N/K times the FLOPs. hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
    num_experts = gate_up_proj.shape[0]
    gates = torch.zeros(top_k_index.shape[0], num_experts, dtype=top_k_weights.dtype, device=top_k_weights.device)
    gates = gates.scatter_add(1, top_k_index, top_k_weights)  # (T, N); repeated ids add up, as in the loop
    gate_up = torch.einsum("th,nih->nti", hidden_states, gate_up_proj)  # (N, T, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    act = act_fn(gate) * up * gates.t().unsqueeze(-1).to(up.dtype)  # (N, T, I)
    return torch.einsum("nti,nhi->th", act, down_proj).to(hidden_states.dtype)


def static_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: nn.Module = F.silu) -> torch.Tensor:
    """The shape-stable experts for traced code: `gathered_experts` for at most N token-slots, else `dense_experts`."""
    few = top_k_index.numel() <= gate_up_proj.shape[0]
    experts = gathered_experts if few else dense_experts
    return experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn)


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
        if tracing():  # no `.tolist()` under torch.compile / torch.export
            return static_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                                  self.act_fn)
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
