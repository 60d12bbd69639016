"""`build_norm`: RMSNorm or LayerNorm with or without bias, used by every decoder norm and the final norm."""

from __future__ import annotations

import torch
from torch import nn

from hf_moe.modeling.model import MoEForCausalLM
from hf_moe.modeling.normalization import RMSNorm, build_norm
from tests.conftest import tiny_gqa_config


def test_build_norm_kinds() -> None:
    assert isinstance(build_norm(tiny_gqa_config()), RMSNorm)
    layer_norm = build_norm(tiny_gqa_config(norm_type="layer_norm", rms_norm_eps=1e-5))
    assert isinstance(layer_norm, nn.LayerNorm) and layer_norm.bias is not None and layer_norm.eps == 1e-5
    no_bias = build_norm(tiny_gqa_config(norm_type="layer_norm", norm_bias=False), 12)
    assert no_bias.bias is None and no_bias.normalized_shape == (12,)
    x = torch.randn(3, 32) * 3 + 1
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer_norm(x), expected, rtol=1e-5, atol=1e-5)


def test_model_uses_the_configured_norm() -> None:
    model = MoEForCausalLM(tiny_gqa_config(norm_type="layer_norm", norm_bias=False, lm_head_bias=True))
    norms = [model.model.norm] + [m for layer in model.model.layers
                                  for m in (layer.input_layernorm, layer.post_attention_layernorm)]  # fmt: skip
    assert all(type(n) is nn.LayerNorm and n.bias is None for n in norms)
    assert model.lm_head.bias is not None
    assert all(isinstance(n, RMSNorm) for n in [MoEForCausalLM(tiny_gqa_config()).model.norm])
