"""DecoderLayer: attention then FFN (dense MLP or MoEBlock), each with a residual (scaled by muP's
`residual_multiplier`, Granite) and an RMSNorm: on the sub-layer's input (`sublayer_norm="pre"`, Llama) or on its
output before the residual add ("post", OLMo 2 / FlexOlmo). Its attention type (`config.layer_types`) picks its
mask where the model builds one per type."""

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
    """x = x + m * Attn(norm(x)); x = x + m * FFN(norm(x)) with m = `config.residual_multiplier` (1 but for muP);
    with `sublayer_norm="post"`: x = x + m * norm(Attn(x)); x = x + m * norm(FFN(x)) (OLMo 2, its norms named
    post_attention_layernorm / post_feedforward_layernorm as there). FFN is an MoEBlock where
    `config.is_moe_layer(idx)`."""

    def __init__(self, config: MoEConfig, layer_idx: int, moe: bool | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_type = config.layer_type(layer_idx)
        self.residual_multiplier = config.residual_multiplier
        self.self_attn = build_attention(config, layer_idx)
        is_moe = config.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = MoEBlock(config) if is_moe else MLP(config, config.intermediate_size)
        self.norm_after = config.sublayer_norm == "post"
        if not self.norm_after:
            self.input_layernorm = build_norm(config)
        self.post_attention_layernorm = build_norm(config)
        if self.norm_after:
            self.post_feedforward_layernorm = build_norm(config)

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
        token_mask (B*T,) bool: the real (non-padding) tokens, which alone count as expert load. attention_mask may
        be a dict of masks by attention type (layers of several types), of which the layer takes its own."""
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask[self.attention_type]
        kwargs.pop("use_cache", None)
        kwargs.pop("position_ids", None)
        attn_in = hidden_states if self.norm_after else self.input_layernorm(hidden_states)
        attn_out, attn_weights = self.self_attn(attn_in, position_embeddings, attention_mask, cache=cache, **kwargs)
        if self.norm_after:
            attn_out = self.post_attention_layernorm(attn_out)
        hidden_states = hidden_states + self.scaled(attn_out)
        routing = None
        ffn_in = hidden_states if self.norm_after else self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, MoEBlock):
            ffn_out, routing = self.mlp(ffn_in, token_mask, routing_inputs)
        else:
            ffn_out = self.mlp(ffn_in)
        if self.norm_after:
            ffn_out = self.post_feedforward_layernorm(ffn_out)
        return hidden_states + self.scaled(ffn_out), routing, attn_weights

    def scaled(self, branch: torch.Tensor) -> torch.Tensor:
        """A residual branch times muP's residual multiplier (unchanged when it is 1)."""
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier
