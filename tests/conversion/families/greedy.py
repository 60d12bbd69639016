"""Greedy generate() of a converted model against transformers' own (the acceptance of every new family)."""

from __future__ import annotations

import torch

from hf_moe.conversion.families import config_to_moe, state_dict_to_moe
from tests.conversion.families.oracle import Case, family_model, inputs, ours_from


def assert_same_greedy(case: Case, new_tokens: int = 8) -> None:
    """Both models left-padded (when the case pads), cache on, greedy: the same tokens."""
    theirs, their_config = family_model(case)
    moe_config = config_to_moe(their_config)
    ours = ours_from(moe_config, state_dict_to_moe(case.family, theirs.state_dict(), moe_config))
    input_ids, mask = inputs(case.left_padding, their_config.vocab_size)
    args = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        expected = theirs.generate(input_ids, **args)
        got = ours.generate(input_ids, **args)
    assert torch.equal(got, expected), (got, expected)
