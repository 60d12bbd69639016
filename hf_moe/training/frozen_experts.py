"""Freeze some experts of a fused expert tensor, bit-exactly, under any optimizer.

Routed experts are slices of fused 3-D parameters (`gate_up_proj (E, 2I, H)`, `down_proj (E, H, I)`), so
"train experts 3 and 7 only" (ESFT, Wang et al. 2024, arXiv 2407.01906) freezes slices of a tensor that also
trains. `requires_grad` works per tensor, and zeroing the frozen slices' gradient is not enough: AdamW's
decoupled weight decay (Loshchilov & Hutter 2019) scales the whole tensor, and momentum from earlier steps
(or any optimizer's own rules) can move a slice whose gradient is zero. So a frozen slice is protected twice:

1. Gradients: a tensor hook zeroes the frozen slices' gradient before autograd accumulates it, so gradient
   clipping, the DDP all-reduce and the optimizer's moments see only the trained experts. The hook is
   (re)attached in a forward pre-hook to whatever tensor the module holds at that moment (FSDP2 swaps in its
   unsharded parameter for the forward).
2. Values: step hooks on each optimizer that holds a partially frozen weight (`Optimizer.register_step_pre_hook`
   / `register_step_post_hook`). Before a step they zero the frozen slices' gradient again (a safety net for
   wrappers that write `.grad` directly) and, the first time they see a parameter, copy its frozen slices;
   after the step they copy them back. Other optimizers get no hook and are never touched.

Optimizers are often created after the freeze and out of sight (HF `Trainer`, accelerate), so they are found
at their first step: while a partially frozen module exists, one process-wide step pre-hook looks at each
optimizer once (again after a freeze, an unfreeze or a new parameter group) and gives the step hooks to those
that hold frozen weights. When the last partially frozen module is unfrozen or garbage-collected, that hook
and every optimizer's hooks are removed: the protection goes away with the model.

This works for plain loops, HF `Trainer` and accelerate (which create or wrap the optimizer later), DDP (same
parameter objects) and FSDP2 (DTensor shards: each rank keeps and restores its local rows). The copy is taken
at the first step (so on the final device, after DDP's broadcast) and costs the memory of the frozen slices.
Optimizers whose `step` is not a `torch.optim.Optimizer.step` (e.g. DeepSpeed ZeRO) are not covered: call
`restore_frozen_experts(model)` after each step there.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..modeling.experts import RoutedExperts

FUSED_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_ATTRIBUTE = "_hf_moe_frozen_experts"


@dataclass
class FrozenExperts:
    """Which experts of one RoutedExperts module must not change, and their values (taken lazily)."""

    expert_ids: torch.Tensor  # (F,) int64 global expert ids, sorted
    # name -> (weak reference to the parameter the values were taken from, values of its frozen local rows)
    snapshots: dict[str, tuple[weakref.ref, torch.Tensor]] = field(default_factory=dict)
    # id -> tensor, for the tensors that carry our gradient hook (weak: swapped-out tensors may die)
    hooked: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)


_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the partially frozen modules alive in the process
# the code object of torch's `Optimizer.step` wrapper, which iterates the step-hook dicts
_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def _inside_optimizer_step() -> bool:
    """Whether an optimizer step is running further up the stack (its hook dicts may be being iterated, so
    removing a hook now would break that loop: a garbage collection can finalize a model anywhere)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER_CODE:
            return True
        frame = frame.f_back
    return False


class _Protection:
    """The step hooks that protect frozen slices, and how they are found and removed.

    `guards[optimizer]`: the pre/post step hooks of an optimizer that holds partially frozen weights.
    `handle`: the process-wide step pre-hook that finds those optimizers (`discover`), registered only while
    a partially frozen module is alive. Everything is removed when the last one is unfrozen or collected.
    """

    def __init__(self) -> None:
        self.handle = None
        self.generation = 0  # bumped on every freeze / unfreeze / collection: optimizers are looked at again
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (generation, params)
        self.guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> hook handles

    def refresh(self) -> None:
        """A freeze changed: look at every optimizer again; with nothing frozen, remove every hook."""
        self.generation += 1
        if _frozen_modules():
            if self.handle is None:
                self.handle = register_optimizer_step_pre_hook(self.discover)
        elif not _inside_optimizer_step():  # else the next freeze, unfreeze or frozen forward finishes it
            self.remove_guards()
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    def remove_guards(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the step hooks of `optimizer` (None: of every optimizer)."""
        for key in list(self.guards) if optimizer is None else [optimizer]:
            for handle in self.guards.pop(key, ()):
                handle.remove()
        if optimizer is None:
            self.seen.clear()

    def discover(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        """Global step pre-hook: look at `optimizer` once per freeze change (and per new parameter group); give
        it the step hooks if it holds partially frozen weights, take them away if it no longer does. (It runs
        before the optimizer's own pre-hooks, whose dict it may therefore change.)"""
        key = (self.generation, sum(len(group["params"]) for group in optimizer.param_groups))
        if self.seen.get(optimizer) == key:
            return
        self.seen[optimizer] = key
        holds = next(iter(_frozen_params(optimizer)), None) is not None
        if holds and optimizer not in self.guards:
            self.guards[optimizer] = [optimizer.register_step_pre_hook(_before_step),
                                      optimizer.register_step_post_hook(_after_step)]
            _before_step(optimizer, args, kwargs)  # for this step already (a second run changes nothing)
        elif not holds:
            self.remove_guards(optimizer)


_PROTECTION = _Protection()


def _frozen_modules() -> list[nn.Module]:
    return [module for module in _MODULES if getattr(module, _ATTRIBUTE, None) is not None]


def _track(module: nn.Module) -> None:
    """Count `module` among the partially frozen ones; unfreezing or collecting it updates the hooks."""
    if module not in _MODULES:
        _MODULES.add(module)
        weakref.finalize(module, _PROTECTION.refresh)
    _PROTECTION.refresh()


def freeze_experts(module: RoutedExperts, expert_ids: Iterable[int]) -> None:
    """Freeze experts `expert_ids` of one fused-experts module; the other experts stay as they are.

    All experts frozen: the fused weights get `requires_grad=False` (no copy needed). None frozen: undoes any
    earlier freeze. Otherwise the weights train and the frozen slices are protected as the module doc says.
    """
    ids = sorted({int(i) for i in expert_ids})
    if any(not 0 <= i < module.num_experts for i in ids):
        raise ValueError(f"expert_ids={ids} out of range for a module with num_experts={module.num_experts}.")
    unfreeze_experts(module)
    if len(ids) == module.num_experts:
        for name in FUSED_EXPERT_WEIGHTS:
            getattr(module, name).requires_grad_(False).grad = None  # optimizers skip only grad-less tensors
        return
    if not ids:
        return
    for name in FUSED_EXPERT_WEIGHTS:
        getattr(module, name).requires_grad_(True)
    setattr(module, _ATTRIBUTE, FrozenExperts(torch.tensor(ids, dtype=torch.long)))
    module._hf_moe_frozen_hook = module.register_forward_pre_hook(_attach_grad_hooks)
    _track(module)


def unfreeze_experts(module: RoutedExperts) -> None:
    """Forget a partial freeze of `module` (grad hooks already attached become no-ops)."""
    state = module.__dict__.pop(_ATTRIBUTE, None)
    if state is not None:
        state.expert_ids = state.expert_ids[:0]
    handle = module.__dict__.pop("_hf_moe_frozen_hook", None)
    if handle is not None:
        handle.remove()
    _MODULES.discard(module)
    _PROTECTION.refresh()


def frozen_experts(model: nn.Module) -> dict[str, list[int]]:
    """{module name: frozen expert ids} for every fused-experts module with a partial freeze."""
    return {
        name: getattr(module, _ATTRIBUTE).expert_ids.tolist()
        for name, module in model.named_modules()
        if getattr(module, _ATTRIBUTE, None) is not None
    }


def experts_modules(model: nn.Module) -> dict[str, RoutedExperts]:
    """{module name: fused-experts module} of `model` (MTP blocks included)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, RoutedExperts)}


def trainable_experts(module: nn.Module) -> list[int]:
    """Expert ids of one fused-experts module that an optimizer may change."""
    if not module.gate_up_proj.requires_grad:
        return []
    state = getattr(module, _ATTRIBUTE, None)
    frozen = set(state.expert_ids.tolist()) if state is not None else set()
    return [i for i in range(module.num_experts) if i not in frozen]


def restore_frozen_experts(model: nn.Module) -> None:
    """Copy the saved values back into every frozen slice of `model` (the step hooks do this by themselves;
    call it after each step of an optimizer that is not a `torch.optim.Optimizer`)."""
    for module in model.modules():
        state = getattr(module, _ATTRIBUTE, None)
        if state is not None:
            for name in FUSED_EXPERT_WEIGHTS:
                _restore(state, name, module._parameters[name])


# ------------------------------------------------------------------------------------------ the hooks
def _attach_grad_hooks(module: nn.Module, args: object) -> None:
    """Forward pre-hook: make sure the tensors this forward reads carry the gradient mask (once each)."""
    state = getattr(module, _ATTRIBUTE, None)
    if state is None:
        return
    if module not in _MODULES:  # a deep copy of the module registers itself here
        _track(module)
    for name in FUSED_EXPERT_WEIGHTS:
        tensor = module._parameters[name]
        if tensor.requires_grad and state.hooked.get(id(tensor)) is not tensor and not _is_dtensor(tensor):
            tensor.register_hook(lambda grad, state=state: _masked(grad, state.expert_ids))
            state.hooked[id(tensor)] = tensor


def _masked(grad: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """The gradient of a full (E, ...) tensor with the frozen experts' rows set to zero."""
    if expert_ids.numel() == 0:
        return grad
    return grad.index_fill(0, expert_ids.to(grad.device), 0)


def _frozen_params(optimizer: torch.optim.Optimizer) -> Iterable[tuple[FrozenExperts, str, nn.Parameter]]:
    """(state, name, parameter) for every partially frozen fused weight that `optimizer` updates."""
    if not _MODULES:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in list(_MODULES):
        state = getattr(module, _ATTRIBUTE, None)
        if state is None:
            continue
        for name in FUSED_EXPERT_WEIGHTS:
            param = module._parameters.get(name)
            if param is not None and id(param) in in_optimizer:
                yield state, name, param


@torch.no_grad()
def _before_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    for state, name, param in _frozen_params(optimizer):
        if param.grad is not None:
            grad, rows = _local_rows(param.grad, state.expert_ids)
            grad.index_fill_(0, rows, 0)
        saved = state.snapshots.get(name)
        if saved is None or saved[0]() is not param:
            local, rows = _local_rows(param, state.expert_ids)
            state.snapshots[name] = (weakref.ref(param), local.index_select(0, rows))


@torch.no_grad()
def _after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    for state, name, param in _frozen_params(optimizer):
        _restore(state, name, param)


@torch.no_grad()
def _restore(state: FrozenExperts, name: str, param: nn.Parameter) -> None:
    saved = state.snapshots.get(name)
    if saved is None or saved[0]() is not param:
        return
    local, rows = _local_rows(param, state.expert_ids)
    values = saved[1]
    if values.device != local.device:
        values = values.to(local.device)
        state.snapshots[name] = (saved[0], values)
    local.index_copy_(0, rows, values)


# ------------------------------------------------------------------------------------- DTensor shards
def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def _local_rows(tensor: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The locally stored tensor and the local row indices of the frozen experts it holds. For a DTensor
    (FSDP2, tensor/expert parallel) only the rows of dimension 0 that live on this rank."""
    if not _is_dtensor(tensor):
        return tensor, expert_ids.to(tensor.device)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    inside = (expert_ids >= offset[0]) & (expert_ids < offset[0] + shape[0])
    return local, (expert_ids[inside] - offset[0]).to(local.device)
