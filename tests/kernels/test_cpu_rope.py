"""The rotation: the reference (`apply_rope`, fp64 here, so no kernel) equals transformers' Llama and DeepSeek-V3
(interleaved) RoPE, and the "rope" kernel (`RotaryFunction`, fp32 training on CPU) equals the reference, forward
and backward."""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_moe.kernels.cpu import rope as rope_module
from hf_moe.modeling.kernel_hooks import register_kernel, unregister_kernel
from hf_moe.modeling.rotary import apply_rope
from tests.kernels.helpers import grads, leaf, spy_calls
from tests.kernels.test_cpu_mla_attention import rope_tables


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_equals_transformers(interleaved: bool) -> None:
    """Our rotation (output half-split) against transformers' Llama and DeepSeek-V3 (interleaved) RoPE."""
    q, k = leaf(2, 3, 11, 8), leaf(2, 1, 11, 8)
    cos, sin = rope_tables(2, 11, 8)
    oracle = apply_rotary_pos_emb_interleave if interleaved else apply_rotary_pos_emb
    reference_q, reference_k = oracle(q, k, cos, sin)
    ours_q, ours_k = apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)
    torch.testing.assert_close(ours_q, reference_q, rtol=0, atol=1e-14)
    torch.testing.assert_close(ours_k, reference_k, rtol=0, atol=1e-14)
    grad = torch.randn_like(ours_q)
    torch.testing.assert_close(grads(ours_q, (q,), grad)[0], grads(reference_q, (q,), grad)[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_kernel_equals_the_reference(interleaved: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, rope_module.RotaryFunction, "apply")
    x = torch.randn(2, 3, 11, 8, requires_grad=True)
    cos, sin = (t.float() for t in rope_tables(2, 11, 8))
    grad = torch.randn(2, 3, 11, 8)
    ours = apply_rope(x, cos, sin, interleaved)
    assert calls == [1]
    kernel = unregister_kernel("rope")
    try:
        reference = apply_rope(x, cos, sin, interleaved)
    finally:
        register_kernel("rope", kernel)
    assert calls == [1]
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads(ours, (x,), grad)[0], grads(reference, (x,), grad)[0], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # without a graph the reference runs, the same arithmetic as the kernel's forward
        assert torch.equal(apply_rope(x, cos, sin, interleaved), ours.detach())
    assert calls == [1]
