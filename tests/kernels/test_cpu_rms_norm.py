"""The "rms_norm" kernel (`RMSNormFunction`) equals transformers' LlamaRMSNorm, forward bit-identical and
backward tight; bf16 keeps the reference math."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_moe.kernels.cpu import rms_norm as normalization
from hf_moe.modeling.normalization import RMSNorm
from tests.kernels.helpers import spy_calls


def parameter_grads(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    out = module(x)
    return [out, *torch.autograd.grad(out, (x, *module.parameters()), grad)]


def test_rms_norm_equals_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, normalization.RMSNormFunction, "apply")
    ours, theirs = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad = torch.randn(3, 7, 48)
    mine, reference = parameter_grads(ours, x, grad), parameter_grads(theirs, x, grad)
    assert calls == [1]
    assert torch.equal(mine[0], reference[0])  # the forward is the same arithmetic
    for a, b in zip(mine[1:], reference[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_keeps_the_reference_math_in_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, normalization.RMSNormFunction, "apply")
    ours, theirs = RMSNorm(16).to(torch.bfloat16), LlamaRMSNorm(16).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))
    assert calls == []


