"""Recipes freeze exactly what they say: after AdamW (weight decay on) every frozen tensor or expert slice is
bit-identical and every trainable one changed, in plain loops, under HF Trainer and under accelerate."""

from __future__ import annotations

import re

import pytest
import torch

from hf_moe import MoEForCausalLM
from hf_moe.training.balancing import update_router_biases
from hf_moe.training.frozen_experts import frozen_experts
from hf_moe.training.recipes import RECIPES, apply_recipe
from tests.conftest import tiny_config

SELECTION = {1: [0, 3, 5], 2: [6]}
EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def tiny_model(**overrides: object) -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(tiny_config(num_nextn_predict_layers=1, **overrides))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 0,
          set_to_none: bool = True) -> None:
    """A few optimizer steps on random tokens (MTP loss on), with the router bias update after each step."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 97, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        update_router_biases(model)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def expected_trainable(name: str, recipe: str, options: dict) -> bool | list[int]:
    """An independent statement of each recipe, from parameter names: True / False, or the trainable expert
    rows of a fused expert weight."""
    is_router = name.endswith(".mlp.gate.weight")
    is_routed = ".mlp.experts." in name
    is_shared = ".mlp.shared_expert" in name
    if recipe == "full":
        return True
    if recipe == "freeze-router":
        return not is_router
    if recipe == "freeze-routed-experts":
        return not (is_routed or is_router)
    if recipe == "moe-only":
        return is_routed or is_router
    if recipe == "esft":
        match = EXPERT_WEIGHT.match(name)
        if match:
            return SELECTION.get(int(match.group(1)), [])
        if is_routed or is_router:
            return False
        if is_shared:
            return options.get("train_shared_experts", False)
        return options.get("train_non_expert", False)
    raise AssertionError(recipe)


def assert_recipe_held(model: torch.nn.Module, before: dict, recipe: str, options: dict) -> None:
    """Frozen tensors / slices bit-identical, trainable ones changed (every trainable expert slice too)."""
    checked = 0
    for name, param in model.named_parameters():
        old, new = before[name], param.detach()
        rule = expected_trainable(name, recipe, options)
        if isinstance(rule, list):
            for expert in range(new.shape[0]):
                same = torch.equal(old[expert], new[expert])
                assert same != (expert in rule), f"{recipe}: {name}[{expert}] trainable={expert in rule}"
                checked += 1
        else:
            assert torch.equal(old, new) != rule, f"{recipe}: {name} expected trainable={rule}"
            checked += 1
    assert checked > 20


RECIPE_CASES = [
    ("full", {}),
    ("freeze-router", {}),
    ("freeze-routed-experts", {}),
    ("moe-only", {}),
    ("esft", {"experts": SELECTION}),
    ("esft", {"experts": SELECTION, "train_shared_experts": True}),
    ("esft", {"experts": SELECTION, "train_non_expert": True}),
]


@pytest.mark.parametrize(("recipe", "options"), RECIPE_CASES, ids=lambda v: v if isinstance(v, str) else str(sorted(v)))
def test_recipe_freezes_exactly_under_adamw(recipe: str, options: dict) -> None:
    model = tiny_model()
    report = apply_recipe(model, recipe, verbose=False, **options)
    before = snapshot(model)
    # every parameter handed to the optimizer, frozen ones included, as a careless user would
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    assert_recipe_held(model, before, recipe, options)
    biases_moved = any(not torch.equal(before[n], b) for n, b in model.named_buffers() if "correction_bias" in n)
    # ESFT and freeze-router turn bias balancing off by default (a frozen router must not move)
    assert biases_moved == (recipe not in ("esft", "freeze-router"))
    assert 0 < report.trainable <= report.total


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),  # L2 term enters inside step()
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    ],
    ids=["adamw-fused", "adam-l2", "sgd-nesterov", "rmsprop", "adafactor", "nadamw"],
)
def test_esft_slices_survive_other_optimizers(make_optimizer) -> None:
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    before = snapshot(model)
    train(model, make_optimizer([p for p in model.parameters() if p.requires_grad]))
    assert_recipe_held(model, before, "esft", {})


@pytest.mark.parametrize(("recipe", "options"), [("esft", {"experts": SELECTION}), ("freeze-routed-experts", {})])
def test_frozen_weights_survive_momentum_from_earlier_steps(recipe: str, options: dict) -> None:
    """Full finetuning builds AdamW moments everywhere (and leaves zero, not None, gradients); switching to a
    recipe on the same optimizer must still leave what is now frozen untouched."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, optimizer, steps=2, set_to_none=False)
    apply_recipe(model, recipe, verbose=False, **options)
    before = snapshot(model)
    train(model, optimizer, steps=2, seed=1, set_to_none=False)
    assert_recipe_held(model, before, recipe, options)


def test_esft_under_hf_trainer(tmp_path) -> None:
    """The Trainer builds (fused AdamW) and wraps the optimizer after the recipe ran."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_moe.training.callbacks import MoECallback

    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, train_shared_experts=True, verbose=False)
    before = snapshot(model)
    ids = torch.randint(3, 97, (12, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, weight_decay=0.1,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            callbacks=[MoECallback()]).train()
    assert_recipe_held(model, before, "esft", {"train_shared_experts": True})


def test_esft_under_accelerate_with_accumulation() -> None:
    from accelerate import Accelerator

    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    before = snapshot(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        with accelerator.accumulate(model):
            ids = torch.randint(3, 97, (2, 12), generator=generator)
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert_recipe_held(accelerator.unwrap_model(model), before, "esft", {})


def test_report_counts_and_table(capsys: pytest.CaptureFixture) -> None:
    model = tiny_model()
    report = apply_recipe(model, "esft", experts=SELECTION)
    printed = capsys.readouterr().out
    config = model.config
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    assert report.trainable == per_expert * sum(len(v) for v in SELECTION.values())
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.experts == SELECTION
    assert "esft" in printed and "routed_experts" in printed and f"{report.trainable:,}" in printed
    assert model.config.router_bias_update_rate == 0  # ESFT: routing stays as pretrained
    assert frozen_experts(model) == {
        "model.layers.1.mlp.experts": [1, 2, 4, 6, 7],
        "model.layers.2.mlp.experts": [0, 1, 2, 3, 4, 5, 7],
    }  # the MTP block's experts are frozen whole (requires_grad=False), not sliced


def test_report_counts_match_requires_grad() -> None:
    model = tiny_model()
    for recipe in ("full", "freeze-router", "freeze-routed-experts", "moe-only"):
        report = apply_recipe(model, recipe, verbose=False)
        assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_recipes_do_not_stack() -> None:
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    report = apply_recipe(model, "full", verbose=False)
    assert report.trainable == report.total and not frozen_experts(model)
    before = snapshot(model)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=1)
    assert_recipe_held(model, before, "full", {})


def test_bad_arguments_are_named() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="allowed values"):
        apply_recipe(model, "freeze-everything")
    with pytest.raises(TypeError, match=r"unknown options \['experts'\]"):
        apply_recipe(model, "freeze-router", experts=SELECTION)
    with pytest.raises(ValueError, match="select_experts"):
        apply_recipe(model, "esft")
    with pytest.raises(ValueError, match=r"layers \[0\]"):
        apply_recipe(model, "esft", experts={0: [1]})
    with pytest.raises(ValueError, match="out of range"):
        apply_recipe(model, "esft", experts={1: [8]})
    assert set(RECIPES) == {"full", "freeze-router", "freeze-routed-experts", "moe-only", "esft", "lora"}
