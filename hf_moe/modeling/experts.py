"""Feed-forward networks: the gated MLP (dense layers, shared experts) and the routed experts.

Routed experts are stored as fused 3-D weights, `gate_up_proj (N, 2I, H)` (gate rows, then up rows) and
`down_proj (N, H, I)`, with optional biases `gate_up_proj_bias (N, 2I)` / `down_proj_bias (N, H)`: the layout of
transformers' experts interface, so `@use_experts_implementation` lets `config._experts_implementation` pick a
backend (eager reference below, grouped_mm, our fused kernels...); every backend applies the gated unit through
`_apply_gate`. The gated unit is `config.glu_type` (`gated_unit`):

    "glu":      act(g) * u                                  (Shazeer 2020: SwiGLU with silu, GeGLU with gelu)
    "gpt_oss":  g * sigmoid(alpha g) * (u + 1)              (gpt-oss)
with g clamped to (-inf, L] and u to [-L, L] first when `config.glu_limit` = L is set (clamped SwiGLU).

While torch.compile or torch.export traces (`tracing()`), the reference runs a shape-stable form without host
syncs instead of its per-expert loop over `.tolist()` sizes: `gathered_experts` (the chosen experts' weights
gathered per token-slot, for at most `num_experts` slots: decode) or `dense_experts` (every expert on every token,
weighted by the gates, zero for experts not chosen: exact, N/K times the FLOPs of the loop).
"""

from __future__ import annotations

from collections.abc import Callable

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


def swiglu_unit(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(g) * u: SwiGLU's gated unit (Shazeer 2020), the default of the traced forms."""
    return F.silu(gate) * up


GatedUnit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gathered_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     gate_up_proj: torch.Tensor, down_proj: torch.Tensor, unit: GatedUnit = swiglu_unit,
                     gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = sum_k w_tk (W_d[e_tk] unit(g, u) + b_d), [g; u] = W_gu[e_tk] x_t + b_gu with the weights of each
    token-slot's expert gathered: static shapes, no host sync, no per-expert loop. Reads (and copies) T*K experts'
    weights: the decode form (T*K <= N). hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
    num_tokens, top_k = top_k_index.shape
    slot_experts = top_k_index.reshape(-1)  # (S,)
    x_slots = hidden_states.repeat_interleave(top_k, dim=0) if top_k > 1 else hidden_states  # (S, H)
    gate_up = torch.bmm(gate_up_proj.index_select(0, slot_experts), x_slots.unsqueeze(-1)).squeeze(-1)  # (S, 2I)
    if gate_up_bias is not None:
        gate_up = gate_up + gate_up_bias.index_select(0, slot_experts)
    slot_weights = top_k_weights.reshape(-1, 1).to(gate_up.dtype)  # (S, 1)
    act = unit(*gate_up.chunk(2, dim=-1)) * slot_weights  # (S, I), gated before the down projection
    out = torch.bmm(down_proj.index_select(0, slot_experts), act.unsqueeze(-1)).squeeze(-1)  # (S, H)
    if down_bias is not None:
        out = out + down_bias.index_select(0, slot_experts) * slot_weights
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def dense_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up_proj: torch.Tensor, down_proj: torch.Tensor, unit: GatedUnit = swiglu_unit,
                  gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same sum with every expert applied to every token and weighted by its gate (0 where not chosen): static
    shapes, no host sync, N/K times the FLOPs. hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
    num_experts = gate_up_proj.shape[0]
    gates = torch.zeros(top_k_index.shape[0], num_experts, dtype=top_k_weights.dtype, device=top_k_weights.device)
    gates = gates.scatter_add(1, top_k_index, top_k_weights)  # (T, N); repeated ids add up, as in the loop
    gate_up = torch.einsum("th,nih->nti", hidden_states, gate_up_proj)  # (N, T, 2I)
    if gate_up_bias is not None:
        gate_up = gate_up + gate_up_bias.unsqueeze(1)
    expert_gates = gates.t().unsqueeze(-1).to(gate_up.dtype)  # (N, T, 1)
    act = unit(*gate_up.chunk(2, dim=-1)) * expert_gates  # (N, T, I)
    out = torch.einsum("nti,nhi->th", act, down_proj)  # (T, H)
    if down_bias is not None:
        out = out + torch.einsum("nt,nh->th", gates.t().to(out.dtype), down_bias)
    return out.to(hidden_states.dtype)


def static_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor, unit: GatedUnit = swiglu_unit,
                   gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The shape-stable experts for traced code: `gathered_experts` for at most N token-slots, else `dense_experts`."""
    few = top_k_index.numel() <= gate_up_proj.shape[0]
    experts = gathered_experts if few else dense_experts
    return experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, unit, gate_up_bias, down_bias)


def gated_unit(config: MoEConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The gated unit of `config` (see the module docstring): (gate, up) -> hidden, element-wise."""
    act, limit, alpha = ACT2FN[config.hidden_act], config.glu_limit, config.glu_alpha

    def unit(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        if config.glu_type == "gpt_oss":
            return gate * torch.sigmoid(gate * alpha) * (up + 1)
        return act(gate) * up

    return unit


def plain_swiglu(config: MoEConfig) -> bool:
    """Whether the gated unit is SwiGLU proper (silu, unclamped), the only one the fused kernels implement."""
    return config.glu_type == "glu" and config.glu_limit is None and config.hidden_act in ("silu", "swish")


class MLP(nn.Module):
    """down(unit(gate(x), up(x))), SwiGLU by default (Shazeer 2020), biases when `config.mlp_bias`. The "swiglu"
    kernel takes the calls it is eligible for (bias-free SwiGLU proper)."""

    def __init__(self, config: MoEConfig, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.unit = gated_unit(config)
        self.fused = plain_swiglu(config) and not bias  # SwiGLU proper: kernels may fuse it; False forbids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_kernel("swiglu", self, x)
        if out is not None:
            return out
        return self.down_proj(self.unit(self.gate_proj(x), self.up_proj(x)))


@use_experts_implementation
class RoutedExperts(nn.Module):
    """N gated experts in two fused 3-D parameters (plus biases when `config.expert_bias`). `forward` is the
    eager reference every backend must match: y_t = sum_k g_{t,k} * FFN_{e_{t,k}}(x_t) (DeepSeekMoE eq. 3)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        if config.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, 2 * self.intermediate_dim))
            self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        self.act_fn = ACT2FN[config.hidden_act]
        self.unit = gated_unit(config)
        self.plain_glu = plain_swiglu(config)  # False: the fused kernels step aside (kernels.experts.fused)

    @property
    def has_bias(self) -> bool:
        """Whether the experts have biases (read by transformers' experts backends)."""
        return self.gate_up_proj_bias is not None

    @has_bias.setter
    def has_bias(self, value: bool) -> None:
        """`@use_experts_implementation` sets its class-wide default here; ours follows the config (above)."""

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """(S, 2I) gate and up outputs, concatenated -> (S, I) (transformers' experts interface calls it)."""
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.unit(gate, up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, H), top_k_index / top_k_weights (T, K) -> (T, H)."""
        if tracing():  # no `.tolist()` under torch.compile / torch.export
            return static_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                                  self.unit, self.gate_up_proj_bias, self.down_proj_bias)
        output = torch.zeros_like(hidden_states)
        slot_tokens, slot_experts = top_k_index.shape[1], top_k_index.reshape(-1)  # (T*K,)
        order = torch.argsort(slot_experts, stable=True)  # slots grouped by expert
        counts = torch.bincount(slot_experts, minlength=self.num_experts).tolist()
        for expert, slots in zip(range(self.num_experts), order.split(counts)):
            if slots.numel() == 0:
                continue
            tokens = slots // slot_tokens  # (S_e,)
            biased = self.has_bias
            gate_up = F.linear(hidden_states[tokens], self.gate_up_proj[expert],
                               self.gate_up_proj_bias[expert] if biased else None)  # fmt: skip
            expert_out = F.linear(self._apply_gate(gate_up), self.down_proj[expert],
                                  self.down_proj_bias[expert] if biased else None)  # (S_e, H)  # fmt: skip
            weights = top_k_weights.reshape(-1)[slots, None].to(expert_out.dtype)
            output.index_add_(0, tokens, (expert_out * weights).to(output.dtype))
        return output
