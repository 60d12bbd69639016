"""MLA decoding with weight absorption equals the expanded form: greedy tokens identical and logits close, batch
> 1 with left padding, eager and sdpa masks, dynamic and static caches; prefill and training stay expanded."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from hf_moe import MoEForCausalLM
from hf_moe.modeling.attention import MultiHeadLatentAttention
from tests.conftest import tiny_config


def set_absorb(model: MoEForCausalLM, flag: bool) -> None:
    for layer in model.model.layers:
        layer.self_attn.absorb = flag


@pytest.fixture
def absorbed_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records (query length, cached length) of every absorbed attention call."""
    calls: list[tuple[int, int]] = []
    original = MultiHeadLatentAttention.absorbed_attention

    def spy(self: MultiHeadLatentAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
            k_pe: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((q_nope.shape[2], latent.shape[2]))
        return original(self, q_nope, q_pe, latent, k_pe, mask)

    monkeypatch.setattr(MultiHeadLatentAttention, "absorbed_attention", spy)
    return calls


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 9, 6 and 4, left-padded with pad id 0."""
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model: MoEForCausalLM, ids: torch.Tensor, mask: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_absorbed_generate_equals_expanded(attn_implementation: str, cache_implementation: str | None,
                                           absorbed_calls: list) -> None:
    model = MoEForCausalLM(tiny_config(attn_implementation=attn_implementation)).eval()
    ids, mask = padded_batch()
    kwargs = {"cache_implementation": cache_implementation} if cache_implementation else {}
    set_absorb(model, False)
    expanded_tokens, expanded_logits = greedy(model, ids, mask, **kwargs)
    assert absorbed_calls == []
    set_absorb(model, True)
    tokens, logits = greedy(model, ids, mask, **kwargs)
    assert torch.equal(tokens, expanded_tokens)
    torch.testing.assert_close(logits, expanded_logits, rtol=1e-5, atol=1e-5)
    # 7 decode steps x 3 layers absorbed; the 9-token prefill was not (its query length is 9, nothing cached)
    assert len(absorbed_calls) == 7 * 3 and all(length == 1 for length, _ in absorbed_calls)


def test_multi_token_step_with_cache_is_causal(absorbed_calls: list) -> None:
    """A 3-token step on a cache (speculative verification, chunked decode) with no mask passed: causal within
    the new tokens, aligned to the end of the cache."""
    model = MoEForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    ids = torch.randint(3, 97, (2, 10))
    results = []
    for absorb in (False, True):
        set_absorb(model, absorb)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :7], cache=cache, use_cache=True)
            results.append(model(ids[:, 7:], cache=cache, use_cache=True).logits)
    assert absorbed_calls and all(length == 3 for length, _ in absorbed_calls)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        full = model(ids).logits[:, 7:]
    torch.testing.assert_close(results[1], full, rtol=1e-5, atol=1e-5)


def test_absorbed_layer_matches_expanded_with_additive_and_bool_masks() -> None:
    """One layer, 2 new tokens on 5 cached ones, both mask kinds transformers' masking utilities produce."""
    config = tiny_config()
    attn = MultiHeadLatentAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    q = attn.project_queries(torch.randn(2, 2, config.hidden_size))
    q_nope, q_pe = q.split([config.qk_nope_head_dim, config.qk_rope_head_dim], -1)
    latent, k_pe = torch.randn(2, 1, 7, config.kv_lora_rank), torch.randn(2, 1, 7, config.qk_rope_head_dim)
    keep = torch.ones(2, 1, 2, 7, dtype=torch.bool)
    keep[0, :, :, :2] = False  # left padding of the first sequence
    keep[:, :, 0, 6] = False  # causal: the first new token does not see the second
    keys, values = attn.expand_kv(latent, k_pe)
    queries = torch.cat((q_nope, q_pe), -1)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    scores = queries @ keys.transpose(2, 3) * attn.scaling + additive
    want = (scores.softmax(-1) @ values).transpose(1, 2)
    for mask in (keep, additive):
        got, _ = attn.absorbed_attention(q_nope, q_pe, latent, k_pe, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_training_and_wrapped_projections_stay_expanded(absorbed_calls: list) -> None:
    model = MoEForCausalLM(tiny_config())
    ids = torch.randint(3, 97, (2, 6))
    model.train()
    model(ids, labels=ids).loss.backward()  # training: no cache
    model.eval()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)  # prefill
    assert absorbed_calls == []
    attn = model.model.layers[0].self_attn
    assert attn.use_absorption(1, 6, None)
    assert not attn.use_absorption(1, 0, None)  # nothing cached yet
    assert not attn.use_absorption(attn.absorb_max_query_len + 1, 6, None)  # long chunk: expanding is cheaper

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA or quantized layer: its `weight` is not the whole map
        pass

    attn.kv_b_proj.__class__ = Wrapped
    assert not attn.use_absorption(1, 6, None)


def test_kv_cache_holds_only_latent_and_rope_key() -> None:
    config = tiny_config()
    model = MoEForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 11)), cache=cache, use_cache=True)
    per_token = sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)
    assert per_token == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
