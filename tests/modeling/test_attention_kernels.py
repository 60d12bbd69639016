"""The CPU attention kernels equal torch's scaled_dot_product_attention and the expanded MLA reference, forward
and backward (fp64, tight), causal over several row blocks, with padding masks, an empty static cache and
single-token queries; `attn_implementation="sdpa"` really runs them where they win and defers elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward as transformers_sdpa
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_moe import MoEForCausalLM
from hf_moe.modeling import mla_attention as mla_module
from hf_moe.modeling import softmax_attention
from hf_moe.modeling.mla_attention import mla_attention
from hf_moe.modeling.rotary import apply_rope
from hf_moe.modeling.softmax_attention import CAUSAL_BLOCK, explicit_attention, sdpa_attention_forward
from tests.conftest import tiny_config, tiny_gqa_config

LONG = CAUSAL_BLOCK * 2 + 44  # three causal row blocks, the last one partial


def grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(output, inputs, grad)


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """(B, 1, T, T) bool causal mask with left padding: row b's first 3*b positions are padding."""
    keep = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        keep[b, : 3 * b] = False
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal[None, None] & keep[:, None, None, :]


@pytest.mark.parametrize("length", [1, 5, CAUSAL_BLOCK, LONG])
@pytest.mark.parametrize("causal", [True, False])
def test_explicit_attention_equals_sdpa(length: int, causal: bool) -> None:
    q, k, v = leaf(2, 3, length, 12), leaf(2, 3, length, 12), leaf(2, 3, length, 7)  # value width != qk width
    causal = causal and length > 1
    ours = explicit_attention(q, k, v, None, 0.3, causal)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    for a, b in zip(grads(ours, (q, k, v), grad), grads(reference, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_explicit_attention_with_padding_mask(kind: str) -> None:
    q, k, v = leaf(3, 2, 40, 8), leaf(3, 2, 40, 8), leaf(3, 2, 40, 5)
    mask = padding_mask(3, 40)
    if kind == "additive":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    ours = explicit_attention(q, k, v, mask, 0.25, False)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    real = padding_mask(3, 40)[:, 0].any(-1)  # (B, T): query rows with at least one visible key
    grad = torch.randn_like(ours) * real[:, None, :, None]
    torch.testing.assert_close(ours.transpose(1, 2)[real], reference.transpose(1, 2)[real], rtol=0, atol=1e-12)
    for a, b in zip(grads(ours, (q, k, v), grad), grads(reference, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


class _Module(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def spy_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, calls: list[int] | None = None) -> list[int]:
    """Counts the calls of owner.name (appending to `calls` when given)."""
    calls = [] if calls is None else calls
    original = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_sdpa_wrapper_with_gqa_equals_transformers_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, softmax_attention, "explicit_attention")
    module = _Module(groups=2)
    q, k, v = leaf(2, 4, 33, 8), leaf(2, 2, 33, 8), leaf(2, 2, 33, 8)
    ours, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.4)
    reference, _ = transformers_sdpa(module, q, k, v, None, scaling=0.4)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    for a, b in zip(grads(ours, (q, k, v), grad), grads(reference, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    assert calls == [1]


@pytest.mark.parametrize("case", ["dropout", "bfloat16", "large-same-width"])
def test_sdpa_wrapper_defers_to_torch_where_it_does_not_win(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, softmax_attention, "explicit_attention")
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    q = k = v = torch.randn(1, 2, 16, 8, dtype=dtype)
    if case == "large-same-width":
        monkeypatch.setattr(softmax_attention, "EXPLICIT_MAX_PROBS", 16 * 16)
    sdpa_attention_forward(_Module(1), q, k, v, None, dropout=0.1 if case == "dropout" else 0.0)
    assert calls == []
    if case == "large-same-width":  # value width differs: torch would use its math path, so ours still runs
        sdpa_attention_forward(_Module(1), q, k, v[..., :4], None)
        assert calls == [1]


# ---------------------------------------------------------------------------------------------- MLA
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


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
def test_model_sdpa_training_equals_eager(make_config: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A padded training batch: same loss, logits of real tokens and parameter gradients with the kernels as with
    transformers-style eager attention (fp32), and the kernels really ran."""
    calls = spy_calls(monkeypatch, mla_module.MLAAttentionFunction, "apply")
    spy_calls(monkeypatch, softmax_attention.SoftmaxAttentionFunction, "apply", calls)
    model = MoEForCausalLM(make_config(max_position_embeddings=512)).train()
    ids = torch.randint(3, 97, (3, LONG))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :40] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results[implementation] = out.loss, out.logits[mask.bool()], {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=0, atol=2e-6)
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=0, atol=2e-5)
    for name, grad in results["eager"][2].items():
        torch.testing.assert_close(results["sdpa"][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
