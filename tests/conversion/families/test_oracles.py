"""Every case of every registered family record against transformers' own classes (see `oracle`'s docstring):
MoE families convert in with the same fp32 logits and back bit-identical, in both layouts; dense families
upcycle with exact recipes to the same function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_moe
from hf_moe.conversion.families import config_from_moe, config_to_moe, state_dict_from_moe, state_dict_to_moe
from hf_moe.conversion.records import DenseFamily, MoEFamily
from tests.conversion.families.oracle import (
    RECIPES,
    TOL,
    cases,
    dense_checkpoint,
    family_model,
    inputs,
    logits_of,
    max_logit_diff,
    ours_from,
)

MOE_CASES = cases(MoEFamily)
DENSE_CASES = cases(DenseFamily)


@pytest.mark.usefixtures("cpu_gemm")  # our products on torch.mm and on oneDNN
@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_oracle_logits_and_round_trip(case: str, tmp_path) -> None:
    family = MOE_CASES[case].family
    theirs, their_config = family_model(MOE_CASES[case])
    input_ids, mask = inputs(MOE_CASES[case].left_padding)
    expected = logits_of(theirs, input_ids, mask)
    their_state = theirs.state_dict()

    moe_config = config_to_moe(their_config)
    ours_state = state_dict_to_moe(family, their_state, moe_config)
    ours = ours_from(moe_config, ours_state)
    got = logits_of(ours, input_ids, mask)
    valid = mask.bool()
    diff = (got - expected)[valid].abs().max().item()
    assert diff < TOL, f"{case}: max |logits diff| = {diff:.3g}"

    # the original per-expert naming imports to the same tensors
    from_original = state_dict_to_moe(family, MOE_CASES[case].original(their_state), moe_config)
    assert from_original.keys() == ours_state.keys()
    assert all(torch.equal(from_original[k], ours_state[k]) for k in ours_state)

    # export: identical tensors, strict load into transformers' class built from the exported config
    exported = state_dict_from_moe(family, ours.state_dict(), moe_config)
    assert exported.keys() == their_state.keys()
    for key, tensor in their_state.items():
        assert torch.equal(exported[key], tensor), key
    back_config = config_from_moe(moe_config, family)
    back = AutoModelForCausalLM.from_config(back_config, attn_implementation="eager", experts_implementation="eager")
    back.load_state_dict(exported, strict=True)
    assert torch.equal(logits_of(back.eval(), input_ids, mask), expected)

    # export in the original layout: transformers' from_pretrained converts it back to its fused tensors
    original = state_dict_from_moe(family, ours.state_dict(), moe_config, layout="original")
    assert original.keys() == MOE_CASES[case].original(their_state).keys() - (
        {"lm_head.weight"} if moe_config.tie_word_embeddings else set()
    )
    back_config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    assert torch.equal(logits_of(loaded.eval(), input_ids, mask), expected)


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_config_round_trip_keeps_every_mapped_field(case: str) -> None:
    their_config = MOE_CASES[case].config()
    moe_config = config_to_moe(their_config)
    back = config_from_moe(moe_config, their_config.model_type)
    assert type(back) is MOE_CASES[case].config_class
    for name in MOE_CASES[case].fields:
        if name == "mlp_only_layers":  # re-expressed through decoder_sparse_step; same MoE layers
            continue
        assert getattr(back, name) == getattr(their_config, name), (case, name)
    assert config_to_moe(back).to_dict() == moe_config.to_dict(), case


@pytest.fixture(scope="module", params=sorted(DENSE_CASES))
def dense(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, Path]:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    return dense_checkpoint(folder, DENSE_CASES[request.param]), folder


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_upcycled_logits_equal_dense(dense: tuple[PreTrainedModel, Path], recipe: str, scoring: str, tmp_path: Path
                                     ) -> None:  # fmt: skip
    model, src = dense
    report = hf_moe.upcycle(src, tmp_path / "moe", scoring_func=scoring, progress=False, **RECIPES[recipe])
    diff, scale = max_logit_diff(model, tmp_path / "moe")
    assert scale > 1.0  # logits are not trivially small
    assert diff < TOL, diff
    assert report.expected_exact and report.exact and report.why_not_exact == []
    assert report.max_abs_logit_diff < TOL and report.probe_tokens > 0
    recorded = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycled_from"]
    assert recorded["function_preservation"]["exact"] is True
    assert recorded["base_model_type"] == model.config.model_type and recorded["num_experts"] == RECIPES[recipe][
        "num_experts"]
