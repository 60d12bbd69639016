"""The "swiglu" kernel (`SwiGLUFunction`) equals transformers' LlamaMLP, forward and backward, on torch.mm and
on oneDNN; wrapped or hooked projections keep the module path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from hf_moe.kernels.cpu import swiglu as experts
from hf_moe.modeling.experts import MLP
from tests.conftest import tiny_config
from tests.kernels.helpers import spy_calls
from tests.kernels.test_cpu_rms_norm import parameter_grads


def llama_mlp_pair(hidden: int = 32, inter: int = 40) -> tuple[MLP, LlamaMLP]:
    ours = MLP(tiny_config(hidden_size=hidden), inter)
    theirs = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu"))
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours, name).weight.normal_(0, 0.3)
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
    return ours, theirs


@pytest.mark.usefixtures("cpu_gemm")
def test_swiglu_mlp_equals_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, experts.SwiGLUFunction, "apply")
    ours, theirs = llama_mlp_pair()
    x = torch.randn(2, 9, 32, requires_grad=True)
    grad = torch.randn(2, 9, 32)
    mine, reference = parameter_grads(ours, x, grad), parameter_grads(theirs, x, grad)
    assert calls == [1]
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_mlp_uses_the_modules_when_they_are_wrapped_or_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, experts.SwiGLUFunction, "apply")
    ours, _ = llama_mlp_pair()
    seen = []
    handle = ours.up_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ours(torch.randn(5, 32))
    assert calls == [] and seen == [torch.Size([5, 40])]
    handle.remove()
    ours(torch.randn(5, 32))
    assert calls == [1]


