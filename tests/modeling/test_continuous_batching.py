"""Continuous batching (`generate_batch`, the paged cache behind `transformers serve`) gives generate()'s greedy
tokens, for MLA (the paged cache's latent allocator) and GQA, with hf_moe's default attention and with "eager"."""

from __future__ import annotations

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from hf_moe import MoEForCausalLM
from hf_moe.modeling.attention import HF_MOE_ATTENTION
from tests.conftest import tiny_config, tiny_gqa_config

NEW_TOKENS = 5
SMALL_PAGED_CACHE = dict(num_blocks=16, page_size=16, max_batch_tokens=64)  # CPU: size the cache, not by free RAM


def build(kind: str, attn_implementation: str | None) -> MoEForCausalLM:
    config = tiny_config() if kind == "mla" else tiny_gqa_config()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = MoEForCausalLM(config).eval()
    if kind == "gqa":  # transformers' paged cache picks its MLA allocator whenever the config has a kv_lora_rank
        assert model.config.kv_lora_rank is None
    with torch.no_grad():  # non-trivial routing bias and norms
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


@pytest.mark.parametrize(("kind", "attn"), [("mla", None), ("gqa", None), ("mla", "eager"), ("gqa", "eager")])
def test_generate_batch_gives_generates_greedy_tokens(kind: str, attn: str | None) -> None:
    model = build(kind, attn)
    before = model.config._attn_implementation
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (7, 3, 11)]
    expected = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    results = model.generate_batch(
        prompts, generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1,
                                                    pad_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(**SMALL_PAGED_CACHE), warmup=False)
    got = [result.generated_tokens for result in results.values()]
    assert [r.error for r in results.values()] == [None] * len(prompts)
    assert got == expected
    assert model.config._attn_implementation == before  # the manager switched back when it stopped
    if attn is None:
        assert before == HF_MOE_ATTENTION
