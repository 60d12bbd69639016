"""Partial expert freezing: frozen rows get no gradient and keep their values, and the protection touches only
the optimizers that hold frozen weights and goes away with the model. (Every recipe and optimizer: test_recipes.)"""

from __future__ import annotations

import copy
import gc

import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from hf_moe.training.frozen_experts import freeze_experts, restore_frozen_experts, unfreeze_experts
from hf_moe.training.recipes import apply_recipe
from tests.training.test_recipes import SELECTION, snapshot, tiny_model, train


def our_hooks(optimizer: torch.optim.Optimizer) -> int:
    """How many step hooks `optimizer` carries (pre and post)."""
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


def test_gradient_masking_alone_is_not_enough() -> None:
    """The premise of the design: with frozen rows' gradients zeroed but no restore, AdamW moves them."""
    model = tiny_model()
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj.register_hook(lambda g: g.index_fill(0, torch.tensor([1, 2]), 0))
    before = experts.gate_up_proj.detach().clone()
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=1)
    assert not torch.equal(before[1:3], experts.gate_up_proj.detach()[1:3])


def test_restore_frozen_experts_by_hand() -> None:
    """For optimizers outside torch.optim (e.g. DeepSpeed) the restore can be called directly."""
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=1)
    weight = model.model.layers[1].mlp.experts.down_proj
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    restore_frozen_experts(model)
    assert torch.equal(weight[[1, 2, 4, 6, 7]], kept[[1, 2, 4, 6, 7]])
    assert torch.equal(weight[SELECTION[1]], kept[SELECTION[1]] + 1.0)


def test_frozen_rows_get_no_gradient() -> None:
    """Gradient clipping and the DDP all-reduce see zeros for frozen experts, real gradients for trained ones."""
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    for layer, trained in SELECTION.items():
        grad = model.model.layers[layer].mlp.experts.gate_up_proj.grad
        frozen = [e for e in range(grad.shape[0]) if e not in trained]
        assert torch.count_nonzero(grad[frozen]) == 0
        assert torch.count_nonzero(grad[trained]) > 0



def test_only_the_optimizer_holding_frozen_experts_is_hooked_and_others_are_untouched() -> None:
    """A second model with its own optimizer in the same process trains exactly as it would alone."""
    frozen = tiny_model()
    apply_recipe(frozen, "esft", experts=SELECTION, verbose=False)
    other = tiny_model(n_routed_experts=4, n_group=2)
    alone = copy.deepcopy(other)
    before = snapshot(frozen)

    frozen_optimizer = torch.optim.AdamW(frozen.parameters(), lr=1e-2, weight_decay=0.1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(2):  # the two optimizers step in turn
        train(frozen, frozen_optimizer, steps=1, seed=seed)
        train(other, other_optimizer, steps=1, seed=seed)
    assert our_hooks(frozen_optimizer) == 2 and our_hooks(other_optimizer) == 0
    experts = frozen.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(experts[1], before["model.layers.1.mlp.experts.gate_up_proj"][1])  # frozen row kept

    del frozen, frozen_optimizer
    gc.collect()
    alone_optimizer = torch.optim.AdamW(alone.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(2):
        train(alone, alone_optimizer, steps=1, seed=seed)
    for (name, a), b in zip(other.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), name


def test_deleting_the_model_removes_every_hook() -> None:
    hooks_before = set(_global_optimizer_pre_hooks)
    model = tiny_model()
    apply_recipe(model, "esft", experts=SELECTION, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, optimizer, steps=1)
    assert set(_global_optimizer_pre_hooks) != hooks_before and our_hooks(optimizer) == 2
    del model
    gc.collect()
    assert set(_global_optimizer_pre_hooks) == hooks_before  # the optimizer outlives the model, unhooked
    assert our_hooks(optimizer) == 0


def test_unfreezing_removes_every_hook_and_freezing_again_protects_the_same_optimizer() -> None:
    hooks_before = set(_global_optimizer_pre_hooks)
    model = tiny_model()
    experts = model.model.layers[1].mlp.experts
    freeze_experts(experts, [1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, optimizer, steps=1)
    unfreeze_experts(experts)
    assert set(_global_optimizer_pre_hooks) == hooks_before and our_hooks(optimizer) == 0
    freeze_experts(experts, [0])
    kept = experts.down_proj.detach()[0].clone()
    train(model, optimizer, steps=1, seed=1)
    assert torch.equal(experts.down_proj.detach()[0], kept) and our_hooks(optimizer) == 2
