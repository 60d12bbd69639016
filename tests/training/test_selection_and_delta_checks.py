"""Bad ESFT selections and bad finetuned deltas are refused by name, and a refused delta changes nothing.

Before: `[1.7]` and `[true]` became expert 1, an empty selection trained nothing without a word, a delta applied to
any base of the same shapes, and a delta failing on its last tensor left the model half-written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_moe import MoEForCausalLM
from hf_moe.training.delta import apply_finetuned_delta, save_finetuned_delta
from hf_moe.training.expert_selection import load_expert_selection, save_expert_selection, validate_selection
from hf_moe.training.recipes import apply_recipe
from tests.conftest import tiny_config

SELECTION = {1: [0, 3], 2: [6]}


def tiny_model(seed: int = 0) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(tiny_config())


BAD_SELECTIONS = [
    ({1: [1.7]}, r"experts\[1\]=\[1\.7\] holds 1\.7 \(float\)"),
    ({1: [True]}, r"experts\[1\]=\[True\] holds True \(bool\)"),
    ({1: [None]}, r"experts\[1\]=\[None\] holds None"),
    ({1: ["3"]}, r"experts\[1\]=\['3'\] holds '3' \(str\)"),
    ({1: "3"}, r"experts\[1\]='3' is invalid: it must be a list"),
    ({1: 3}, r"experts\[1\]=3 is invalid: it must be a list"),
    ({1: [8]}, r"experts\[1\]=\[8\] is out of range: expert ids go from 0 to 7"),
    ({1: [-1]}, r"experts\[1\]=\[-1\] is out of range"),
    ({1.5: [1]}, r"layer 1\.5 is invalid"),
    ({True: [1]}, r"layer True is invalid"),
    ({"x": [1]}, r"layer 'x' is invalid"),
    ({1: [1], "1": [2]}, r"names layer 1 twice"),
    ({0: [1]}, r"layers \[0\] that are not MoE layers"),
    ([1, 2], r"mapping \{layer: \[expert ids\]\}"),
]


@pytest.mark.parametrize(("selection", "message"), BAD_SELECTIONS, ids=[m for _, m in BAD_SELECTIONS])
def test_bad_selections_are_refused_by_the_recipe(selection: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_recipe(tiny_model(), "esft", experts=selection, verbose=False)


def test_selection_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"experts": {"1": [1.7]}}))
    with pytest.raises(ValueError, match=rf"{path}: experts\[1\]=\[1\.7\]"):
        load_expert_selection(path)
    path.write_text(json.dumps({"experts": {"1": [9]}}))  # in range for no file check, out of range for the model
    with pytest.raises(ValueError, match=rf"{path}: experts\[1\]=\[9\] is out of range"):
        apply_recipe(tiny_model(), "esft", experts=path, verbose=False)


def test_save_refuses_what_it_would_coerce(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds 1\.7"):
        save_expert_selection({1: [1.7]}, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_valid_selections_keep_their_meaning() -> None:
    """JSON's string layer keys, numpy and 0-d tensor ints, tuples and repeats are accepted without coercion."""
    assert validate_selection({"1": [3, 0, 3], 2: (np.int64(5), torch.tensor(2))}, 8, [1, 2]) == {1: [3, 0], 2: [5, 2]}
    report = apply_recipe(tiny_model(), "esft", experts={"1": [2]}, verbose=False)
    assert report.experts[1] == [2]


def test_empty_selection_trains_nothing_is_an_error() -> None:
    for empty in ({}, {1: [], 2: []}):
        with pytest.raises(ValueError, match="would train nothing"):
            apply_recipe(tiny_model(), "esft", experts=empty, verbose=False)


def test_empty_selection_with_other_parts_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_moe.training.expert_selection"):
        report = apply_recipe(tiny_model(), "esft", experts={}, train_shared_experts=True, verbose=False)
    assert report.trainable > 0 and report.parts["routed_experts"][0] == 0
    assert any("no routed expert trains" in note for note in report.notes)
    assert "no routed expert trains" in caplog.text


# --------------------------------------------------------------------------------------------------- deltas
@pytest.fixture
def delta(tmp_path: Path) -> Path:
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[0].add_(1.0)
        model.model.layers[2].mlp.gate.e_score_correction_bias.add_(0.5)
    save_finetuned_delta(model, tmp_path)
    return tmp_path


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_delta_refuses_another_base_of_the_same_shapes(delta: Path) -> None:
    other = tiny_model(seed=123)
    before = state(other)
    with pytest.raises(ValueError, match=r"finetuned from another base model: .* differs from the delta's base"):
        apply_finetuned_delta(other, delta)
    assert_unchanged(other, before)
    apply_finetuned_delta(other, delta, check_base=False)  # the explicit way out
    assert torch.equal(other.model.layers[1].mlp.experts.down_proj[0],
                       load_file(delta / "delta.safetensors")["model.layers.1.mlp.experts.down_proj"][0])


def test_delta_names_a_differing_config_field(delta: Path) -> None:
    torch.manual_seed(0)
    other = MoEForCausalLM(tiny_config(scoring_func="softmax"))  # same shapes, other routing
    with pytest.raises(ValueError, match=r"config\.scoring_func is 'softmax' here, 'sigmoid' in the delta's base"):
        apply_finetuned_delta(other, delta)


def test_delta_applies_to_its_base_in_another_dtype(delta: Path) -> None:
    """The base loaded in bf16 is still the base: sampled values compare in the coarser dtype."""
    base = tiny_model().to(torch.bfloat16)
    apply_finetuned_delta(base, delta)
    expected = load_file(delta / "delta.safetensors")["model.layers.1.mlp.experts.down_proj"]
    torch.testing.assert_close(base.model.layers[1].mlp.experts.down_proj[[0, 3]].float(), expected.float(),
                               atol=0.02, rtol=0.01)


def _edit_weights(delta: Path, edit) -> None:
    tensors = load_file(delta / "delta.safetensors")
    edit(tensors)
    save_file(tensors, delta / "delta.safetensors")


def _edit_manifest(delta: Path, edit) -> None:
    manifest = json.loads((delta / "delta.json").read_text())
    edit(manifest)
    (delta / "delta.json").write_text(json.dumps(manifest))


def _last(tensors: dict) -> str:
    return sorted(tensors)[-1]


BAD_DELTAS = {
    "last tensor wrong shape": (lambda d: _edit_weights(d, lambda t: t.__setitem__(_last(t), torch.zeros(3, 3))),
                                r"has shape \(3, 3\), the model needs \(8,\)"),
    "tensor absent from the weights": (lambda d: _edit_weights(d, lambda t: t.pop(_last(t))),
                                       "manifest lists .* that the weights file lacks"),
    "expert rows out of range": (lambda d: _edit_manifest(d, lambda m: [e.update(experts=[0, 99])
                                                                          for e in m["tensors"].values() if e]),
                                 r"lists expert rows \[0, 99\]"),
    "expert rows as floats": (lambda d: _edit_manifest(d, lambda m: [e.update(experts=[0.0, 3.0])
                                                                       for e in m["tensors"].values() if e]),
                              r"lists expert rows \[0\.0, 3\.0\]"),
    "integer delta": (lambda d: _edit_weights(d, lambda t: t.__setitem__(_last(t), t[_last(t)].long())),
                      "is torch.int64, the model's is torch.float32"),
}


@pytest.mark.parametrize("case", sorted(BAD_DELTAS))
def test_a_refused_delta_leaves_the_model_untouched(delta: Path, case: str) -> None:
    corrupt, message = BAD_DELTAS[case]
    corrupt(delta)
    base = tiny_model()
    before = state(base)
    with pytest.raises(ValueError, match=message):
        apply_finetuned_delta(base, delta)
    assert_unchanged(base, before)


def test_delta_without_fingerprint_still_applies_with_a_warning(delta: Path, caplog: pytest.LogCaptureFixture) -> None:
    _edit_manifest(delta, lambda m: (m.pop("base"), m.update(version=1)))
    with caplog.at_level(logging.WARNING, logger="hf_moe.training.recipes"):
        apply_finetuned_delta(tiny_model(seed=5), delta)
    assert "records no base fingerprint" in caplog.text


def test_fingerprint_samples_stay_in_range_past_float32_integers() -> None:
    """Tensors of more than 2^24 values (any real embedding or head): evenly spaced sample indices computed in
    integers, not float32 steps that round past the last element."""
    from hf_moe.training.delta_checks import _sample

    big = torch.arange(2**24 + 4, dtype=torch.float32)
    samples = _sample(big, None)
    assert samples[0] == 0 and samples[-1] == big.numel() - 1 and bool((samples[1:] > samples[:-1]).all())


def test_broken_selection_and_delta_files_are_named(tmp_path: Path, delta: Path) -> None:
    """Not-JSON selection files and delta manifests fail naming the file (the project's one JSON reader)."""
    bad = tmp_path / "selection.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{bad} is not valid JSON"):
        load_expert_selection(bad)
    (delta / "delta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"delta.json must hold an object"):
        apply_finetuned_delta(tiny_model(), delta)
