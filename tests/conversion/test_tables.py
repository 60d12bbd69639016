"""The generic machinery of `hf_moe.conversion.tables`: named invertible ops, binding a record to a config,
the streaming converter (any order, per-expert groups complete, unknown and incomplete keys named)."""

from __future__ import annotations

import pytest
import torch

from hf_moe.conversion.families import get_family, state_dict_from_moe, state_dict_to_moe
from hf_moe.conversion.records import MoEFamily
from hf_moe.conversion.tables import OPS, Binding, Rule, StateDictConverter, bind_table
from tests.conversion.families.oracle import cases, family_model, per_expert
from tests.conversion.families.test_mixtral import NAMING as MIXTRAL_NAMING

E, ROWS, H = 3, 4, 5  # experts, rows of one expert matrix, hidden


@pytest.mark.parametrize("op", ["copy", "stack", "stack_cat", "duplicate"])
def test_ops_invert_each_other(op: str) -> None:
    """from_moe(to_moe(parts)) gives the parts back, bit for bit (duplicate: the copies of the main tensor)."""
    keys = {"copy": 1, "stack": E, "stack_cat": 2 * E, "duplicate": 3}[op]
    binding = Binding("fam", "ours", tuple(f"theirs.{j}" for j in range(keys)), op, None)
    main = torch.randn(ROWS, H)
    parts = [main.clone() for _ in range(keys)] if op == "duplicate" else [torch.randn(ROWS, H) for _ in range(keys)]
    spec = OPS[op]
    made = spec.to_moe(binding, parts)
    if op == "duplicate":
        assert made is None  # checked, nothing of ours: the main key has its own copy row
        made = main
    else:
        assert spec.part_shape(tuple(made.shape)) == (ROWS, H)
    back = spec.from_moe(binding, made)
    written = spec.written_keys(binding)
    assert len(back) == len(written)
    expected = parts[1:] if op == "duplicate" else parts
    assert all(torch.equal(a, b) for a, b in zip(back, expected))
    if op == "stack_cat":  # gate rows first: expert e's gate is part e, its up part E + e
        assert torch.equal(made[1, :ROWS], parts[1]) and torch.equal(made[1, ROWS:], parts[E + 1])


def test_zeros_and_drop_ops() -> None:
    router = Binding("fam", "bias", ("router.weight",), "zeros", None)
    zeros = OPS["zeros"].to_moe(router, [torch.randn(E, H)])
    assert zeros.dtype == torch.float32 and torch.equal(zeros, torch.zeros(E))
    assert OPS["zeros"].from_moe(router, zeros) == [] and OPS["zeros"].written_keys(router) == ()
    with pytest.raises(ValueError, match="Cannot export 'bias' to fam: .*non-zero"):
        OPS["zeros"].from_moe(router, torch.full((E,), 0.01))
    with pytest.raises(ValueError, match="Rule.op='fuse' is invalid"):
        Rule("a", ("b",), "fuse")


def test_tables_bind_every_family() -> None:
    for case, spec in cases(MoEFamily).items():
        record = get_family(spec.family)
        moe = record.config_to_moe(spec.config())
        for layout in ("transformers", "original"):
            bindings = bind_table(record, moe, layout)
            ours_keys = [b.ours for b in bindings if b.op not in ("duplicate", "drop")]
            assert len(ours_keys) == len(set(ours_keys)), (case, layout)


def test_export_refuses_a_trained_balancing_bias() -> None:
    """A trained (non-zero) balancing bias has no place in a family without one."""
    theirs, their_config = family_model(cases()["qwen3_moe"])
    moe = get_family("qwen3_moe").config_to_moe(their_config)
    state = state_dict_to_moe("qwen3_moe", theirs.state_dict(), moe)
    state["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.full((8,), 0.01)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        state_dict_from_moe("qwen3_moe", state, moe)


def test_unknown_and_incomplete_keys_are_reported() -> None:
    theirs, their_config = family_model(cases()["mixtral"])
    state = per_expert(theirs.state_dict(), MIXTRAL_NAMING)
    with pytest.raises(ValueError, match="not in the conversion table"):
        state_dict_to_moe("mixtral", {**state, "model.layers.0.block_sparse_moe.extra.weight": torch.ones(1)},
                          their_config)  # fmt: skip
    del state["model.layers.2.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match="incomplete"):
        state_dict_to_moe("mixtral", state, their_config)


def test_streaming_push_emits_stacked_experts_when_complete() -> None:
    theirs, their_config = family_model(cases()["olmoe"])
    record = get_family("olmoe")
    moe = record.config_to_moe(their_config)
    state = per_expert(theirs.state_dict())
    converter = StateDictConverter(record, moe, "to_moe")
    plan = converter.plan(state)
    assert len(plan["model.layers.0.mlp.experts.gate_up_proj"]) == 2 * moe.n_routed_experts
    outputs: dict[str, torch.Tensor] = {}
    for key in reversed(list(state)):  # any order, as shards come
        done = converter.push(key, state[key])
        assert all(k not in outputs for k, _ in done)
        outputs.update(done)
    converter.finish()
    assert outputs.keys() == state_dict_to_moe("olmoe", theirs.state_dict(), moe).keys()
