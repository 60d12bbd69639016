"""The explicit-softmax attention kernel equals torch's scaled_dot_product_attention, forward and backward (fp64,
tight), causal over several row blocks and with padding masks; "hf_moe_sdpa" runs it where it wins and defers to
transformers' sdpa elsewhere; a model under "hf_moe_sdpa" trains like one under "eager"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward as transformers_sdpa

from hf_moe import MoEForCausalLM
from hf_moe.kernels.cpu import attention as softmax_attention
from hf_moe.kernels.cpu import mla_attention as mla_module
from hf_moe.kernels.cpu.attention import CAUSAL_BLOCK, explicit_attention, hf_moe_sdpa_attention
from tests.conftest import tiny_config, tiny_gqa_config
from tests.kernels.helpers import grads, leaf, spy_calls

LONG = CAUSAL_BLOCK * 2 + 44  # three causal row blocks, the last one partial


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


def test_sdpa_wrapper_with_gqa_equals_transformers_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, softmax_attention, "explicit_attention")
    module = _Module(groups=2)
    q, k, v = leaf(2, 4, 33, 8), leaf(2, 2, 33, 8), leaf(2, 2, 33, 8)
    ours, _ = hf_moe_sdpa_attention(module, q, k, v, None, scaling=0.4)
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
    hf_moe_sdpa_attention(_Module(1), q, k, v, None, dropout=0.1 if case == "dropout" else 0.0)
    assert calls == []
    if case == "large-same-width":  # value width differs: torch would use its math path, so ours still runs
        hf_moe_sdpa_attention(_Module(1), q, k, v[..., :4], None)
        assert calls == [1]


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
def test_model_hf_moe_sdpa_training_equals_eager(make_config: object, monkeypatch: pytest.MonkeyPatch) -> None:
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
    for implementation in ("hf_moe_sdpa", "eager"):
        model.config._attn_implementation = implementation
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results[implementation] = out.loss, out.logits[mask.bool()], {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(results["hf_moe_sdpa"][0], results["eager"][0], rtol=0, atol=2e-6)
    torch.testing.assert_close(results["hf_moe_sdpa"][1], results["eager"][1], rtol=0, atol=2e-5)
    for name, grad in results["eager"][2].items():
        torch.testing.assert_close(results["hf_moe_sdpa"][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
