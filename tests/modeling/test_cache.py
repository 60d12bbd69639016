"""MoECache (in-place appends into growable buffers) behaves as transformers' DynamicCache: same contents through
appends, crops, batch selection and beam reordering; the same greedy generations; generate() creates it by
default and keeps any cache the caller asks for."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from hf_moe import MoEForCausalLM
from hf_moe.modeling.cache import GrowableLayer, MoECache
from tests.conftest import tiny_config, tiny_gqa_config


def assert_same_contents(ours: MoECache, theirs: DynamicCache) -> None:
    assert ours.get_seq_length() == theirs.get_seq_length()
    for mine, reference in zip(ours.layers, theirs.layers):
        assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)


@torch.no_grad()  # as in generate(): appends that autograd records concatenate (tested below)
def test_appends_crops_and_batch_edits_equal_dynamic_cache() -> None:
    config = tiny_config()
    ours, theirs = MoECache(config=config), DynamicCache(config=config)
    assert all(type(layer) is GrowableLayer for layer in ours.layers)

    def append(length: int) -> None:
        batch = theirs.layers[0].keys.shape[0] if theirs.get_seq_length() else 3
        for layer in range(config.num_hidden_layers):
            keys, values = torch.randn(batch, 1, length, 16), torch.randn(batch, 1, length, 8)
            got, want = ours.update(keys, values, layer), theirs.update(keys.clone(), values.clone(), layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    append(5)
    first = ours.layers[0].key_buffer
    for _ in range(40):  # decode steps: no new buffer until the spare capacity is used up
        append(1)
    assert ours.layers[0].key_buffer is first
    append(300)  # beyond the capacity: re-buffered, contents kept
    assert ours.layers[0].key_buffer is not first
    assert_same_contents(ours, theirs)
    for cache in (ours, theirs):
        cache.crop(-7)  # rejected drafts: the next append overwrites them
    append(2)
    assert_same_contents(ours, theirs)
    for cache in (ours, theirs):
        cache.batch_select_indices(torch.tensor([2, 0]))
        cache.reorder_cache(torch.tensor([1, 1]))
    append(1)
    assert_same_contents(ours, theirs)


def test_buffers_made_under_inference_mode_are_replaced_outside_it() -> None:
    cache = MoECache(config=tiny_config(num_hidden_layers=1))
    with torch.inference_mode():
        cache.update(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 8), 0)
    with torch.no_grad():
        keys, _ = cache.update(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 8), 0)
    assert keys.shape[-2] == 5 and not keys.is_inference()


@pytest.mark.parametrize("trainable", ["all", "queries only"])
def test_appends_that_autograd_records_concatenate(trainable: str) -> None:
    """use_cache in training forwards: writing the second chunk into a buffer the first chunk's outputs were
    computed from would make their backward fail ("modified by an inplace operation"), also when the cached
    keys themselves need no gradient."""
    model = MoEForCausalLM(tiny_config()).train()
    if trainable == "queries only":
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.self_attn.q_b_proj.weight.requires_grad_(True)
    ids = torch.randint(3, 97, (2, 9))
    cache = MoECache(config=model.config)
    first = model(input_ids=ids[:, :5], cache=cache, use_cache=True).logits
    second = model(input_ids=ids[:, 5:], cache=cache, use_cache=True).logits
    (first.sum() + second.sum()).backward()
    assert cache.get_seq_length() == 9


@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["mla", "gqa"])
def test_generate_uses_moe_cache_and_matches_dynamic_cache(make_config: object) -> None:
    model = MoEForCausalLM(make_config()).eval()
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                  return_dict_in_generate=True, output_logits=True)
    default = model.generate(ids, **kwargs)
    explicit = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    assert all(type(layer) is GrowableLayer for layer in default.past_key_values.layers)
    assert all(type(layer) is DynamicLayer for layer in explicit.past_key_values.layers)
    assert torch.equal(default.sequences, explicit.sequences)
    torch.testing.assert_close(torch.stack(default.logits), torch.stack(explicit.logits), rtol=0, atol=1e-5)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert isinstance(static.past_key_values, StaticCache)
    assert torch.equal(static.sequences, default.sequences)


def test_cache_data_is_kept() -> None:
    keys, values = torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 8)
    cache = MoECache(ddp_cache_data=[(keys, values)])
    assert type(cache.layers[0]) is GrowableLayer and cache.get_seq_length() == 5
    assert torch.equal(cache.layers[0].keys, keys) and torch.equal(cache.layers[0].values, values)


def test_assisted_generation_with_a_sliding_window_assistant() -> None:
    """The assistant's default cache must stay croppable (transformers records past states for it)."""
    main = MoEForCausalLM(tiny_gqa_config(sliding_window=6)).eval()
    assistant = MoEForCausalLM(tiny_gqa_config(sliding_window=6, num_hidden_layers=1)).eval()
    ids = torch.randint(3, 97, (1, 9))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assisted = main.generate(ids, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, main.generate(ids, **kwargs))


def test_sliding_window_layers_stay_dynamic_sliding() -> None:
    cache = MoECache(config=tiny_gqa_config(sliding_window=4))
    assert all(type(layer) is not DynamicLayer for layer in cache.layers)
    assert not any(isinstance(layer, GrowableLayer) for layer in cache.layers)
