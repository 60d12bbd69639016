"""Mixture of attention heads (MoA, Zhang et al. 2022; JetMoE, Shen et al. 2024): each token picks K of E
attention experts by a top-k-then-softmax router; expert e owns a query projection Q_e (kv_heads * d rows) and an
output projection O_e, while keys and values are shared (GQA with kv_heads heads). Slot k's queries form
kv_heads heads that attend to the shared keys and values, and

    y_t = sum_k g_{t,k} O_{e_{t,k}} attn(Q_{e_{t,k}} x_t, K, V) + b                        (JetMoE §2.2, eqs. 4-6)

Our query heads are ordered kv-head-major (head h * K + k), so the usual `repeat_kv` pairs head (h, k) with kv
head h. The router is a plain top-k router (no balancing bias; hf_moe's balancing applies to the FFN routers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .configuration import MoEConfig
from .experts import tracing
from .rotary import apply_rope


def per_expert_linear(rows: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows (S, in) through their experts' matrices weight (E, out, in): (S, out), one product per used expert;
    while torch.compile / torch.export traces, one batched product of the gathered matrices (no host sync)."""
    if tracing():
        return torch.bmm(weight.index_select(0, expert_ids), rows.unsqueeze(-1)).squeeze(-1)
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    for expert in torch.unique(expert_ids).tolist():
        slots = (expert_ids == expert).nonzero().squeeze(-1)
        out[slots] = F.linear(rows[slots], weight[expert])
    return out


class MixtureOfAttentionHeads(nn.Module):
    """MoA with `config.moa_experts` experts, `config.moa_top_k` per token (see the module docstring);
    `attention_out_bias` is the bias b of the mixed output."""

    def __init__(self, config: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.top_k = config.moa_top_k
        self.num_heads = self.num_kv_heads * self.top_k
        self.num_key_value_groups = self.top_k
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.sliding_window = None
        self.is_causal = True
        hidden, width, experts = config.hidden_size, self.num_kv_heads * self.head_dim, config.moa_experts
        self.router = nn.Linear(hidden, experts, bias=False)
        self.q_proj = nn.Parameter(torch.empty(experts, width, hidden))  # (E, kv_heads * d, H)
        self.o_proj = nn.Parameter(torch.empty(experts, hidden, width))  # (E, H, kv_heads * d)
        self.k_proj = nn.Linear(hidden, width, bias=False)
        self.v_proj = nn.Linear(hidden, width, bias=False)
        self.o_bias = nn.Parameter(torch.zeros(hidden)) if config.attention_out_bias else None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, H) -> expert ids (N, K) and gates (N, K): softmax of the top-k logits, in fp32."""
        top = F.linear(tokens.float(), self.router.weight.float()).topk(self.top_k, dim=-1)
        return top.indices, top.values.softmax(dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from .attention import attention_function  # attention imports this module

        batch, length, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)
        ids, gates = self.route(tokens)
        slot_ids = ids.reshape(-1)  # (N * K,) token-major
        q = per_expert_linear(tokens.repeat_interleave(self.top_k, dim=0), slot_ids, self.q_proj)
        q = q.view(batch, length, self.top_k, self.num_kv_heads, self.head_dim).transpose(2, 3)  # heads h * K + k
        q = q.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, d)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if cache is not None:  # kwargs: what the paged cache of continuous batching reads (and fills in)
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        output, weights = attention_function(self.config)(
            self, q, k, v, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )  # (B, T, heads, d)
        slots = output.reshape(batch, length, self.num_kv_heads, self.top_k, self.head_dim).transpose(2, 3)
        slots = slots.reshape(-1, self.num_kv_heads * self.head_dim)  # (N * K, kv_heads * d) token-major
        mixed = per_expert_linear(slots, slot_ids, self.o_proj) * gates.reshape(-1, 1).to(slots.dtype)
        out = mixed.view(batch * length, self.top_k, hidden).sum(dim=1).view(batch, length, hidden)
        return (out if self.o_bias is None else out + self.o_bias), weights
