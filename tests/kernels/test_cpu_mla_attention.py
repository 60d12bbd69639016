"""The token-major MLA attention kernel equals the expanded MLA reference (rotate, concatenate, head-major
softmax attention), forward and backward (fp64, tight): causal over several row blocks, with padding masks, an
empty static cache and single-token queries."""

from __future__ import annotations

import pytest
import torch

from hf_moe.kernels.cpu.attention import CAUSAL_BLOCK
from hf_moe.kernels.cpu.mla_attention import mla_attention
from hf_moe.modeling.rotary import apply_rope
from tests.kernels.helpers import grads, leaf
from tests.kernels.test_cpu_attention import padding_mask

LONG = CAUSAL_BLOCK * 2 + 44  # three causal row blocks, the last one partial


def mla_reference(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor | None, nope: int, scale: float, interleaved: bool) -> torch.Tensor:
    """The generic path: rotate, concatenate, expand the shared rotary key, head-major softmax attention."""
    heads = q.shape[2]
    q_nope, q_rope = q.transpose(1, 2).split([nope, q.shape[-1] - nope], -1)  # (B, h, T, .)
    k_nope, values = kv.transpose(1, 2).split([nope, kv.shape[-1] - nope], -1)
    queries = torch.cat((q_nope, apply_rope(q_rope, cos, sin, interleaved)), -1)
    keys = torch.cat((k_nope, k_rope[:, None].expand(-1, heads, -1, -1)), -1)
    scores = queries @ keys.transpose(-1, -2) * scale
    if mask is None and q.shape[1] > 1:
        mask = torch.ones(q.shape[1], kv.shape[1], dtype=torch.bool).tril()[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ values).transpose(1, 2)


def rope_tables(batch: int, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(batch, length, dim // 2, dtype=torch.float64) * 6
    angles = torch.cat((angles, angles), -1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("length", [1, 7, LONG])
@pytest.mark.parametrize("interleaved", [True, False])
def test_mla_attention_equals_expanded_reference(length: int, interleaved: bool) -> None:
    batch, heads, nope, rope, value = 2, 3, 6, 4, 5
    q, kv, k_rope = leaf(batch, length, heads, nope + rope), leaf(batch, length, heads, nope + value), leaf(
        batch, length, rope)
    cos, sin = rope_tables(batch, length, rope)
    ours = mla_attention(q, kv, k_rope, cos, sin, None, nope, 0.3, interleaved)
    reference = mla_reference(q, kv, k_rope, cos, sin, None, nope, 0.3, interleaved)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    for a, b in zip(grads(ours, (q, kv, k_rope), grad), grads(reference, (q, kv, k_rope), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_mla_attention_with_padding_and_an_empty_static_cache() -> None:
    batch, heads, nope, rope, value, length = 3, 2, 4, 4, 6, 30
    q, kv, k_rope = leaf(batch, length, heads, nope + rope), leaf(batch, length, heads, nope + value), leaf(
        batch, length, rope)
    cos, sin = rope_tables(batch, length, rope)
    mask = padding_mask(batch, length)
    real = mask[:, 0].any(-1)
    ours = mla_attention(q, kv, k_rope, cos, sin, mask, nope, 0.5, True)
    reference = mla_reference(q, kv, k_rope, cos, sin, mask, nope, 0.5, True)
    grad = torch.randn_like(ours) * real[:, :, None, None]
    torch.testing.assert_close(ours[real], reference[real], rtol=0, atol=1e-12)
    for a, b in zip(grads(ours, (q, kv, k_rope), grad), grads(reference, (q, kv, k_rope), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # a static cache holds more (still empty) slots than the prompt: without a mask they are never attended
    padded_kv = torch.cat((kv, torch.randn(batch, 9, heads, nope + value, dtype=torch.float64)), 1)
    padded_rope = torch.cat((k_rope, torch.randn(batch, 9, rope, dtype=torch.float64)), 1)
    cropped = mla_attention(q, padded_kv, padded_rope, cos, sin, None, nope, 0.5, True)
    torch.testing.assert_close(cropped, mla_attention(q, kv, k_rope, cos, sin, None, nope, 0.5, True), rtol=0, atol=0)


