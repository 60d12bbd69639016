"""DecoderLayer: pre-norm attention then pre-norm FFN (dense MLP or MoEBlock), each with a residual."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import build_attention
from .configuration import MoEConfig
from .experts import MLP
from .moe import MoEBlock
from .normalization import build_norm
from .routing import RouterOutput
from .routing_inputs import RoutingInputs


class DecoderLayer(GradientCheckpointingLayer):
    """x = x + Attn(norm(x)); x = x + FFN(norm(x)). FFN is an MoEBlock where `config.is_moe_layer(idx)`."""

    def __init__(self, config: MoEConfig, layer_idx: int, moe: bool | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = build_attention(config, layer_idx)
        is_moe = config.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = MoEBlock(config) if is_moe else MLP(config, config.intermediate_size)
        self.input_layernorm = build_norm(config)
        self.post_attention_layernorm = build_norm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        routing_inputs: RoutingInputs | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, RouterOutput | None, torch.Tensor | None]:
        """Returns the new hidden states (B, T, H), the router's decision (MoE layers) and attention weights.
        token_mask (B*T,) bool: the real (non-padding) tokens, which alone count as expert load."""
        kwargs.pop("use_cache", None)
        kwargs.pop("position_ids", None)
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn_out
        routing = None
        if isinstance(self.mlp, MoEBlock):
            ffn_out, routing = self.mlp(self.post_attention_layernorm(hidden_states), token_mask, routing_inputs)
        else:
            ffn_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + ffn_out, routing, attn_weights
