"""DecoderLayer: x + Attn(norm(x)), then + FFN(norm(x)); a dense FFN or an MoE block where the config says."""

from __future__ import annotations

import torch
from torch import nn

from hf_moe.modeling.decoder import DecoderLayer
from hf_moe.modeling.experts import MLP
from hf_moe.modeling.moe import MoEBlock
from hf_moe.modeling.routing import RouterOutput
from tests.conftest import tiny_config


class Affine(nn.Module):
    """x -> a * x + b, standing in for a sublayer so that the layer's wiring can be computed by hand."""

    def __init__(self, a: float, b: float, returns_weights: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.returns_weights = a, b, returns_weights

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor | tuple:
        y = self.a * x + self.b
        return (y, "attention weights") if self.returns_weights else y


def test_pre_norm_residual_wiring() -> None:
    """With norm1 = x + 1, attn = 2x, norm2 = 3x, ffn = x - 0.5: h = x + 2(x + 1) = 3x + 2 and
    out = h + (3h - 0.5) = 12x + 7.5."""
    layer = DecoderLayer(tiny_config(), layer_idx=0)  # dense (first_k_dense_replace=1)
    layer.input_layernorm, layer.self_attn = Affine(1.0, 1.0), Affine(2.0, 0.0, returns_weights=True)
    layer.post_attention_layernorm, layer.mlp = Affine(3.0, 0.0), Affine(1.0, -0.5)
    x = torch.tensor([[[0.0, 1.0], [-2.0, 0.5]]])
    out, routing, weights = layer(x)
    torch.testing.assert_close(out, 12 * x + 7.5)
    assert routing is None and weights == "attention weights"


def test_dense_and_moe_layers_follow_the_config() -> None:
    config = tiny_config(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    kinds = [type(DecoderLayer(config, i).mlp) for i in range(5)]
    assert kinds == [MLP, MoEBlock, MLP, MoEBlock, MLP]
    assert DecoderLayer(config, 1).mlp.experts.num_experts == config.n_routed_experts
    assert DecoderLayer(config, 0).mlp.intermediate_size == config.intermediate_size
    assert isinstance(DecoderLayer(config, 0, moe=True).mlp, MoEBlock)  # what an MTP block asks for
    assert isinstance(DecoderLayer(config, 1, moe=False).mlp, MLP)


def test_an_moe_layer_returns_its_routing_and_passes_the_token_mask_to_the_router() -> None:
    config = tiny_config()
    config._experts_implementation = "eager"
    layer = DecoderLayer(config, layer_idx=1).train()
    with torch.no_grad():
        for param in layer.parameters():  # the fused experts are allocated uninitialised
            param.copy_(torch.randn_like(param) * 0.3)
    layer.self_attn = Affine(0.0, 0.0, returns_weights=True)  # attention adds nothing: h = x
    x = torch.randn(1, 3, config.hidden_size)
    out, routing, _ = layer(x, token_mask=torch.tensor([True, False, True]))
    assert isinstance(routing, RouterOutput) and routing.topk_ids.shape == (3, config.num_experts_per_tok)
    counted = layer.mlp.gate.tokens_per_expert
    assert counted.sum() == 2 * config.num_experts_per_tok  # the masked token is not load
    with torch.no_grad():
        ffn, _ = layer.mlp(layer.post_attention_layernorm(x))
    torch.testing.assert_close(out, x + ffn)
