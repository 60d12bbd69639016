"""ESFT expert selection equals a hand computation on a tiny model and data; the JSON round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.modeling.routing import Router
from hf_moe.training.expert_selection import (
    expert_scores,
    load_expert_selection,
    save_expert_selection,
    select_experts,
    select_from_scores,
)
from hf_moe.training.recipes import apply_recipe
from tests.conftest import tiny_config, tiny_gqa_config

# three sequences of different lengths: padding must not count
SEQUENCES = [[5, 17, 33, 8, 91, 40, 12], [60, 3, 77, 21], [9, 9, 45, 88, 14, 70, 31, 52, 26]]


def tiny_model(make_config=tiny_config) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = MoEForCausalLM(make_config())
    with torch.no_grad():  # spread the routers so that scores differ clearly between experts
        for module in model.modules():
            if isinstance(module, Router):
                module.weight.normal_(0.0, 0.5)
    return model


def hand_shares(model: MoEForCausalLM, criterion: str) -> dict[int, list[float]]:
    """Run each sequence alone (no padding) with hooks on the routers; sum gate weights or selections in
    plain Python; divide by the layer's total."""
    sums: dict[int, list[float]] = {}
    captured: list[tuple[int, object]] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: captured.append((i, out)))
        for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")
    ]
    model.eval()
    with torch.no_grad():
        for sequence in SEQUENCES:
            model(torch.tensor([sequence]))
    for handle in hooks:
        handle.remove()
    for layer, routing in captured:
        row = sums.setdefault(layer, [0.0] * model.config.n_routed_experts)
        for ids, weights in zip(routing.topk_ids.tolist(), routing.topk_weights.tolist()):
            for expert, weight in zip(ids, weights):
                row[expert] += weight if criterion == "gate" else 1.0
    return {layer: [v / sum(row) for v in row] for layer, row in sums.items()}


def hand_select(shares: list[float], p: float) -> list[int]:
    chosen, total = [], 0.0
    for expert in sorted(range(len(shares)), key=lambda e: -shares[e]):
        if total >= p:
            break
        chosen.append(expert)
        total += shares[expert]
    return sorted(chosen)


@pytest.mark.parametrize("criterion", ["gate", "token"])
@pytest.mark.parametrize("make_config", [tiny_config, tiny_gqa_config], ids=["sigmoid-groups", "softmax"])
def test_selection_equals_hand_computation(criterion: str, make_config) -> None:
    model = tiny_model(make_config)
    expected = hand_shares(model, criterion)
    examples = [{"input_ids": s} for s in SEQUENCES]
    scores = expert_scores(model, examples, criterion=criterion, batch_size=2)  # padded batches
    assert sorted(scores) == sorted(expected) == model.config.moe_layer_indices
    for layer, shares in scores.items():
        assert shares.tolist() == pytest.approx(expected[layer], abs=1e-6)
    for p in (0.1, 0.2, 0.5, 0.9):
        got = select_experts(model, examples, criterion=criterion, threshold=p)
        assert got == {layer: hand_select(expected[layer], p) for layer in expected}
        assert all(1 <= len(ids) <= model.config.n_routed_experts for ids in got.values())


def test_threshold_rule_on_written_scores() -> None:
    scores = {1: torch.tensor([0.05, 0.5, 0.3, 0.15]), 2: torch.tensor([0.25, 0.25, 0.25, 0.25])}
    assert select_from_scores(scores, 0.5) == {1: [1], 2: [0, 1]}
    assert select_from_scores(scores, 0.6) == {1: [1, 2], 2: [0, 1, 2]}  # ties: lower id first
    assert select_from_scores(scores, 1.0) == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="threshold"):
        select_from_scores(scores, 0.0)


def test_defaults_follow_esft() -> None:
    model = tiny_model()
    data = torch.tensor([SEQUENCES[2]])
    assert select_experts(model, data, "gate") == select_experts(model, data, "gate", threshold=0.1)
    assert select_experts(model, data, "token") == select_experts(model, data, "token", threshold=0.2)
    with pytest.raises(ValueError, match="criterion"):
        select_experts(model, data, "loss")


def test_all_input_forms_agree() -> None:
    from datasets import Dataset
    from torch.utils.data import DataLoader

    model = tiny_model()
    rows = [s[:4] for s in SEQUENCES]  # equal lengths, so a plain tensor and a DataLoader work too
    reference = expert_scores(model, torch.tensor(rows), "gate")
    forms = {
        "examples": [{"input_ids": r} for r in rows],
        "lists": rows,
        "columns": {"input_ids": rows},
        "datasets": Dataset.from_dict({"input_ids": rows}),
        "dataloader": DataLoader(Dataset.from_dict({"input_ids": rows}).with_format("torch"), batch_size=2),
        "texts": [" ".join(map(str, r)) for r in rows],
    }

    def tokenizer(text: str) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    for name, data in forms.items():
        scores = expert_scores(model, data, "gate", tokenizer=tokenizer)
        for layer in reference:
            assert torch.allclose(scores[layer], reference[layer], atol=1e-12), name


def test_runs_in_eval_mode_without_counting() -> None:
    model = tiny_model()
    model.train()
    select_experts(model, [SEQUENCES[0]], "token")
    assert model.training
    assert all(float(m.tokens_per_expert.sum()) == 0 for m in model.modules() if isinstance(m, Router))


def test_max_tokens_stops_early() -> None:
    model = tiny_model()
    first = expert_scores(model, [SEQUENCES[0]], "token")
    limited = expert_scores(model, SEQUENCES, "token", batch_size=1, max_tokens=len(SEQUENCES[0]))
    assert all(torch.equal(first[layer], limited[layer]) for layer in first)


def test_json_round_trip_and_esft_recipe(tmp_path) -> None:
    model = tiny_model()
    selection = select_experts(model, SEQUENCES, "token")
    path = tmp_path / "experts.json"
    save_expert_selection(selection, path, criterion="token", threshold=0.2)
    assert load_expert_selection(path) == selection
    data = json.loads(path.read_text())
    assert data["criterion"] == "token" and set(data["experts"]) == {str(k) for k in selection}
    report = apply_recipe(model, "esft", experts=str(path), verbose=False)
    assert report.experts == {layer: ids for layer, ids in selection.items() if len(ids) < 8}


def test_loads_esft_release_format(tmp_path) -> None:
    path = tmp_path / "intent.json"
    path.write_text(json.dumps({"experts": {"1": [3, 0], "2": [5]}, "shared_experts": False,
                                "non_expert_modules": False}))
    assert load_expert_selection(path) == {1: [3, 0], 2: [5]}
