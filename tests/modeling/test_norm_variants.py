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


def test_training_step_with_every_variant_takes_the_reference_paths() -> None:
    """fp32 CPU with grad, where the fused kernels (rms_norm, swiglu, experts, lm_head_loss) would run: with biases,
    LayerNorm and the gpt-oss unit they step aside, so the loss is the cross-entropy of the logits."""
    import hf_moe  # noqa: F401 - registers the kernels

    torch.manual_seed(0)
    config = tiny_gqa_config(norm_type="layer_norm", lm_head_bias=True, mlp_bias=True, expert_bias=True,
                             router_bias=True, glu_type="gpt_oss", glu_limit=1.0, attention_sinks=True,
                             n_routed_experts=8, moe_intermediate_size=16)  # fmt: skip
    model = MoEForCausalLM(config).train()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(3, config.vocab_size, (2, 9))
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].reshape(-1, config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss - (out.aux_loss if out.aux_loss is not None else 0), expected)
    out.loss.backward()
    assert model.lm_head.bias.grad is not None and torch.count_nonzero(model.lm_head.bias.grad)
    assert model.model.layers[1].mlp.experts.gate_up_proj_bias.grad is not None
