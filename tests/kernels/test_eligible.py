"""The one eligibility rule: the kernels step aside under autocast, for wrapped or hooked modules (accelerate's
offload hooks) and off CPU, and the model then runs its reference paths."""

from __future__ import annotations

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.kernels.cpu import attention as softmax_attention
from hf_moe.kernels.cpu import gemm
from hf_moe.kernels.cpu import lm_loss as cross_entropy
from hf_moe.kernels.cpu import mla_attention as mla_module
from hf_moe.kernels.cpu import swiglu as experts
from tests.conftest import tiny_config, tiny_gqa_config
from tests.kernels.helpers import spy_calls


@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
@pytest.mark.usefixtures("cpu_gemm")
def test_bf16_autocast_trains_and_generates_on_the_module_paths(make_config: object,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written Functions do not follow autocast's per-op dtypes: under autocast the module paths run
    (the loss stays close to fp32's, gradients flow) and generation works."""
    calls: list[int] = []
    for owner in (experts.SwiGLUFunction, cross_entropy.LinearCrossEntropyFunction, mla_module.MLAAttentionFunction,
                  softmax_attention.SoftmaxAttentionFunction, gemm.LinearFunction):
        spy_calls(monkeypatch, owner, "apply", calls)
    model = MoEForCausalLM(make_config()).train()
    ids = torch.randint(3, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert calls == []
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.embed_tokens.parameters())
    torch.testing.assert_close(loss.float(), model(input_ids=ids, labels=ids).loss, rtol=0.05, atol=0.05)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


@pytest.mark.usefixtures("cpu_gemm")
def test_accelerate_offload_hooks_keep_the_module_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate replaces `forward` of offloaded modules (no torch hook to see): such linears are not plain."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    fused_loss = spy_calls(monkeypatch, cross_entropy.LinearCrossEntropyFunction, "apply")
    swiglu = spy_calls(monkeypatch, experts.SwiGLUFunction, "apply")
    model = MoEForCausalLM(tiny_config(num_hidden_layers=2)).train()  # a dense MLP, then a shared-expert MLP
    add_hook_to_module(model.lm_head, ModelHook())
    add_hook_to_module(model.model.layers[0].mlp.down_proj, ModelHook())
    ids = torch.randint(3, 97, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert fused_loss == [] and swiglu == [1]  # only the shared experts' MLP, which nothing hooks
