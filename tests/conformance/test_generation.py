"""Every GenerationMixin mode that runs offline, on hf_moe's MLA and GQA MoEForCausalLM against the oracle of
transformers' own classes with the same weights (DeepseekV3ForCausalLM, Qwen3MoeForCausalLM, converted by the
family records): same tokens, same scores. (transformers' GenerationTesterMixin is not in its sdist.)

Group beam search, constrained beam search (`force_words_ids`/`constraints`), DoLa and contrastive search are
no longer in transformers 5: `generate()` loads them from the Hub (transformers-community/...), so they cannot
run offline, for any model."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from hf_moe import MoEForCausalLM
from hf_moe.conversion.families import config_to_moe, state_dict_to_moe
from tests.conversion.families.oracle import family_model, ours_from
from tests.conversion.families.test_deepseek_v3 import CASES as DEEPSEEK_V3
from tests.conversion.families.test_qwen3_moe import CASES as QWEN3_MOE

ORACLES = {"mla": DEEPSEEK_V3["deepseek_v3_qlora_yarn"], "gqa": QWEN3_MOE["qwen3_moe"]}
PROMPTS = torch.tensor([[11, 5, 42, 17, 8, 30], [3, 9, 21, 50, 12, 7]])
LEFT_PADDED = torch.tensor([[1, 1, 42, 17, 8, 30], [3, 9, 21, 50, 12, 7]])
LEFT_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
COMMON = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=1, eos_token_id=None)


@pytest.fixture(scope="module", params=sorted(ORACLES))
def pair(request: pytest.FixtureRequest) -> tuple[MoEForCausalLM, PreTrainedModel]:
    """(ours, theirs): the same random weights in hf_moe's class and in transformers' own."""
    case = ORACLES[request.param]
    theirs, their_config = family_model(case)
    moe_config = config_to_moe(their_config)
    ours = ours_from(moe_config, state_dict_to_moe(case.family, theirs.state_dict(), moe_config))
    for model in (ours, theirs):
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 1, None
    return ours, theirs


def both(pair: tuple, seed: int | None = None, **kwargs: object) -> tuple:
    out = []
    for model in pair:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out.append(model.generate(**{"input_ids": PROMPTS, **COMMON, **kwargs}))
    return tuple(out)


def assert_same_tokens(got: object, want: object) -> None:
    got = got if isinstance(got, torch.Tensor) else got.sequences
    want = want if isinstance(want, torch.Tensor) else want.sequences
    assert torch.equal(got, want), f"\n{got}\n{want}"


def test_greedy(pair: tuple) -> None:
    ours, theirs = both(pair, do_sample=False)
    assert_same_tokens(ours, theirs)
    nocache = pair[0].generate(PROMPTS, do_sample=False, use_cache=False, **COMMON)
    assert_same_tokens(nocache, ours)


def test_sampling(pair: tuple) -> None:
    ours, theirs = both(pair, seed=3, do_sample=True, top_k=20, top_p=0.95, temperature=1.3)
    assert_same_tokens(ours, theirs)


def test_beam_search(pair: tuple) -> None:
    ours, theirs = both(pair, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True,
                        output_scores=True)
    assert_same_tokens(ours, theirs)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=1e-4, atol=1e-5)


def test_beam_sample(pair: tuple) -> None:
    ours, theirs = both(pair, seed=5, num_beams=2, do_sample=True, top_k=10)
    assert_same_tokens(ours, theirs)


def test_beam_search_within_allowed_tokens(pair: tuple) -> None:
    """prefix_allowed_tokens_fn: the offline way of constraining beam search in transformers 5."""
    allowed = list(range(20, 40))
    ours, theirs = both(pair, num_beams=2, prefix_allowed_tokens_fn=lambda batch, ids: allowed)
    assert_same_tokens(ours, theirs)
    assert set(ours[:, PROMPTS.shape[1]:].flatten().tolist()) <= set(allowed)


def test_assisted_decoding_with_an_assistant_and_with_prompt_lookup(pair: tuple) -> None:
    ours, theirs = pair
    greedy = theirs.generate(PROMPTS[:1], do_sample=False, **COMMON)
    assisted = ours.generate(PROMPTS[:1], assistant_model=ours, do_sample=False, **COMMON)
    assert_same_tokens(assisted, greedy)
    lookup = ours.generate(PROMPTS[:1], prompt_lookup_num_tokens=2, do_sample=False, **COMMON)
    assert_same_tokens(lookup, greedy)


def test_return_dict_in_generate_with_scores_logits_hidden_states_and_attentions(pair: tuple) -> None:
    ours, theirs = both(pair, do_sample=False, return_dict_in_generate=True, output_scores=True,
                        output_logits=True, output_hidden_states=True, output_attentions=True)
    assert_same_tokens(ours, theirs)
    for field in ("scores", "logits"):
        assert len(getattr(ours, field)) == COMMON["max_new_tokens"]
        for got, want in zip(getattr(ours, field), getattr(theirs, field)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for field in ("hidden_states", "attentions"):  # per step, per layer
        assert len(getattr(ours, field)) == COMMON["max_new_tokens"]
        for got_step, want_step in zip(getattr(ours, field), getattr(theirs, field)):
            assert len(got_step) == len(want_step)
            for got, want in zip(got_step, want_step):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_left_padding_gives_each_row_its_unpadded_tokens(pair: tuple) -> None:
    ours, theirs = pair
    batch = ours.generate(LEFT_PADDED, attention_mask=LEFT_MASK, do_sample=False, **COMMON)
    alone = ours.generate(LEFT_PADDED[:1, 2:], do_sample=False, **COMMON)
    assert torch.equal(batch[0, 2:], alone[0])
    assert_same_tokens(batch, theirs.generate(LEFT_PADDED, attention_mask=LEFT_MASK, do_sample=False, **COMMON))


@pytest.mark.parametrize("mode", [
    dict(penalty_alpha=0.6, top_k=4), dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    dict(num_beams=2, force_words_ids=[[30]]), dict(dola_layers="low"),
], ids=["contrastive", "group_beam", "constrained", "dola"])
def test_modes_that_transformers_loads_from_the_hub(mode: dict) -> None:
    pytest.skip(f"{mode}: transformers 5 runs this mode only as Hub code (transformers-community/...), which "
                "needs the network; it holds for every model (DeepseekV3 included)")
