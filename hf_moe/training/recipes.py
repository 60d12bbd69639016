"""Finetuning recipes that train less of an MoE model, one call each: `apply_recipe(model, name, **options)`.

MoE models overfit small finetuning sets and forget; the field's answers train a subset:
- "full": everything (the baseline).
- "freeze-router": all but the router weights; the router biases do not move either (a frozen router must not
  move: `router_bias_update_rate` -> 0 and the routers marked by `freeze_router_biases`); bias_update=True
  keeps them moving.
- "freeze-routed-experts": attention, shared experts, dense FFNs, norms, embeddings, head; routed experts and
  router frozen. ST-MoE (Zoph et al. 2022, arXiv 2202.08906 §4): training the non-MoE part matches training all.
- "moe-only": the reverse (routed experts and router), for comparison; ST-MoE found it worse.
- "esft": Expert-Specialised Fine-Tuning (Wang et al. 2024, arXiv 2407.01906): only the experts the task uses
  train (`experts={layer: [ids]}` from `select_experts`, or a JSON path); router, attention and shared experts
  frozen unless asked; router biases not updated.
- "lora": peft LoRA (Hu et al. 2021) on attention and shared-expert projections, and on request on the fused
  routed-expert weights (peft's `target_parameters`); `merge_and_unload()` gives a plain MoE model again.

A recipe sets `requires_grad` for every parameter (so recipes do not stack) and freezes expert slices through
`hf_moe.training.frozen_experts` (bit-exact under any torch optimizer, Trainer, accelerate, DDP, FSDP2). Apply it
before wrapping the model (DDP, FSDP) and before creating the optimizer. What a recipe trained is saved apart
with `hf_moe.training.delta.save_finetuned_delta`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modeling.routing import Router
from .balancing import freeze_router_biases
from .expert_selection import empty_selection_notes, load_expert_selection, validate_selection
from .frozen_experts import FUSED_EXPERT_WEIGHTS, experts_modules, freeze_experts, trainable_experts, unfreeze_experts
from .parts import PARTS, layer_index, module_parts, parameter_parts

#: What ESFT's `train_non_expert=True` trains besides the experts.
NON_EXPERT_PARTS = frozenset({"embeddings", "attention", "norms", "dense_ffn", "lm_head", "mtp", "other"})


@dataclass
class RecipeReport:
    """What a recipe left trainable. `model` is the model to train (a peft model for "lora")."""

    recipe: str
    model: nn.Module
    parts: dict[str, tuple[int, int]]  # part -> (trainable parameters, all parameters)
    experts: dict[int, list[int]] = field(default_factory=dict)  # trained routed experts per layer (partial only)
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.parts.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts.values())

    def table(self) -> str:
        """The report as a plain-text table, one row per part of the model."""
        rows = [("part", "trainable", "total", "%")]
        for part, (trainable, total) in self.parts.items():
            rows.append((part, f"{trainable:,}", f"{total:,}", f"{100 * trainable / max(total, 1):.1f}"))
        rows.append(("all", f"{self.trainable:,}", f"{self.total:,}", f"{100 * self.trainable / max(self.total, 1):.2f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"hf_moe recipe {self.recipe!r}: {self.trainable:,} of {self.total:,} parameters trainable"]
        for i, row in enumerate(rows):
            lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
            if i == 0 or i == len(rows) - 2:
                lines.append("-" * (sum(widths) + 6))
        if self.experts:
            shown = "; ".join(f"{layer}: {ids}" for layer, ids in sorted(self.experts.items()))
            lines.append(f"trained routed experts per layer: {shown}")
        lines.extend(self.notes)
        return "\n".join(lines)

    __str__ = table


# ----------------------------------------------------------------------------------------- freezing
def _train_parts(model: nn.Module, trainable: set[str]) -> None:
    """requires_grad = (part in `trainable`) for every parameter; no expert slice stays frozen. Frozen tensors
    also lose any stale `.grad` (an optimizer skips a parameter only while its grad is None)."""
    for module in experts_modules(model).values():
        unfreeze_experts(module)
    freeze_router_biases(model, frozen=False)  # recipes do not stack: only freeze-router marks them again
    parts = parameter_parts(model)
    for name, param in model.named_parameters():
        param.requires_grad_(parts[name] in trainable)
        if not param.requires_grad:
            param.grad = None


def recipe_report(model: nn.Module, recipe: str, notes: list[str] | None = None) -> RecipeReport:
    """Count trainable and total parameters per part (a partially frozen expert tensor counts its trained
    experts only)."""
    parts = parameter_parts(model)
    counts = {part: [0, 0] for part in PARTS}
    for name, param in model.named_parameters():
        counts[parts[name]][1] += param.numel()
        counts[parts[name]][0] += param.numel() if param.requires_grad else 0
    experts: dict[int, list[int]] = {}
    for name, module in experts_modules(model).items():
        trained = trainable_experts(module)
        if module.gate_up_proj.requires_grad and len(trained) < module.num_experts:
            per_expert = sum(getattr(module, w).numel() for w in FUSED_EXPERT_WEIGHTS) // module.num_experts
            counts["routed_experts"][0] -= per_expert * (module.num_experts - len(trained))
            experts[layer_index(name)] = trained
    kept = {part: (t, n) for part, (t, n) in counts.items() if n}
    return RecipeReport(recipe=recipe, model=model, parts=kept, experts=experts, notes=list(notes or []))


def _bias_update(model: nn.Module, enabled: bool | None) -> list[str]:
    """enabled=False turns aux-loss-free bias balancing off (config.router_bias_update_rate = 0); None keeps it."""
    config = getattr(model, "config", None)
    rate = getattr(config, "router_bias_update_rate", 0)
    if enabled is None or config is None:
        return [f"router bias updates: as configured (router_bias_update_rate={rate})"] if rate else []
    if enabled and not rate:
        raise ValueError("bias_update=True needs config.router_bias_update_rate > 0 (it is 0 for this model).")
    if not enabled and rate:
        config.router_bias_update_rate = 0.0
        return [f"router bias updates: off (router_bias_update_rate {rate} -> 0; restore it before pretraining more)"]
    return [f"router bias updates: {'on' if enabled else 'off'} (router_bias_update_rate={rate})"]


# ----------------------------------------------------------------------------------------- recipes
def _full(model: nn.Module, bias_update: bool | None = None) -> list[str]:
    _train_parts(model, set(PARTS))
    return _bias_update(model, bias_update)


def _freeze_router(model: nn.Module, bias_update: bool | None = False) -> list[str]:
    _train_parts(model, set(PARTS) - {"router"})
    freeze_router_biases(model, frozen=not bias_update)
    return _bias_update(model, bias_update)


def _freeze_routed_experts(model: nn.Module, train_router: bool = False, bias_update: bool | None = None) -> list[str]:
    _train_parts(model, set(PARTS) - {"routed_experts"} - (set() if train_router else {"router"}))
    return _bias_update(model, bias_update)


def _moe_only(model: nn.Module, train_router: bool = True, bias_update: bool | None = None) -> list[str]:
    _train_parts(model, {"routed_experts"} | ({"router"} if train_router else set()))
    return _bias_update(model, bias_update)


def _esft(
    model: nn.Module,
    experts: Mapping[int, list[int]] | str | os.PathLike | None = None,
    train_shared_experts: bool = False,
    train_non_expert: bool = False,
    bias_update: bool | None = False,
) -> list[str]:
    """ESFT: train the selected routed experts of each MoE layer (others, and MTP experts, frozen)."""
    if experts is None:
        raise ValueError("The 'esft' recipe needs experts={layer: [expert ids]} or the path of a JSON file "
                         "written by save_expert_selection (see select_experts).")
    source = str(experts) if isinstance(experts, (str, os.PathLike)) else None
    selection = load_expert_selection(experts) if source else experts
    selection = validate_selection(selection, getattr(model.config, "n_routed_experts", None),
                                   model.config.moe_layer_indices, source)
    notes = empty_selection_notes(selection, train_shared_experts or train_non_expert)
    parts = {"routed_experts"}
    parts |= {"shared_experts"} if train_shared_experts else set()
    parts |= NON_EXPERT_PARTS if train_non_expert else set()
    _train_parts(model, parts)
    for name, module in experts_modules(model).items():
        chosen = set(selection.get(layer_index(name), []))  # MTP blocks (-1) train none
        freeze_experts(module, [e for e in range(module.num_experts) if e not in chosen])
    return notes + _bias_update(model, bias_update)


def _lora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    routed_experts: bool = False,
    dense_ffn: bool = False,
    target_modules: list[str] | str | None = None,
    bias_update: bool | None = False,
    **lora_options: Any,
) -> tuple[nn.Module, list[str]]:
    """LoRA on attention and shared experts (+ dense FFNs, + fused routed experts on request).

    Router biases are buffers of the frozen base, which a peft adapter does not save: by default (`bias_update=False`)
    they stay as pretrained, so base + adapter is exactly the trained model. `bias_update=True` (or None with a
    non-zero `router_bias_update_rate`) keeps aux-loss-free balancing on and saves every router with the adapter
    (peft's `modules_to_save`; the router weights stay frozen), so `PeftModel.from_pretrained(base, adapter)` restores
    the moved biases; the adapter then also holds the router weights (n_routed_experts x hidden_size per MoE layer)."""
    from peft import LoraConfig, get_peft_model

    if routed_experts and lora_dropout:
        raise ValueError(f"lora_dropout={lora_dropout} is invalid with routed_experts=True: peft's LoRA on fused "
                         "expert weights (target_parameters) has no dropout; use 0.")
    if target_modules is None:
        target_modules = lora_targets(model, dense_ffn=dense_ffn)
    notes = _bias_update(model, bias_update)
    if bias_update is False and notes:
        notes[-1] += "; a peft adapter does not save the biases (bias_update=True saves the routers with it)"
    routers = [name for name, module in model.named_modules() if isinstance(module, Router)]
    save_routers = bool(routers) and getattr(model.config, "router_bias_update_rate", 0) > 0
    if save_routers:
        lora_options["modules_to_save"] = [*(lora_options.get("modules_to_save") or []), *routers]
        notes.append("router bias updates: on; the routers are saved with the adapter (modules_to_save)")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        target_parameters=[f"mlp.experts.{w}" for w in FUSED_EXPERT_WEIGHTS] if routed_experts else None,
        **lora_options,
    )
    _train_parts(model, set(PARTS))
    peft_model = get_peft_model(model, config)
    if save_routers:  # the copies carry the moving biases; their weights are not trained
        for module in peft_model.modules():
            if isinstance(module, Router):
                module.weight.requires_grad_(False)
    return peft_model, notes


def lora_targets(model: nn.Module, dense_ffn: bool = False) -> list[str]:
    """peft `target_modules` suffixes: every Linear of attention and shared experts (and dense FFNs)."""
    wanted = {"attention", "shared_experts"} | ({"dense_ffn"} if dense_ffn else set())
    parts = module_parts(model)
    targets = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and parts[name] in wanted and not name.endswith("shared_expert_gate"):
            targets.add(".".join(name.split(".")[-2:]))
    return sorted(targets)


RECIPES: dict[str, Callable[..., Any]] = {
    "full": _full,
    "freeze-router": _freeze_router,
    "freeze-routed-experts": _freeze_routed_experts,
    "moe-only": _moe_only,
    "esft": _esft,
    "lora": _lora,
}


def apply_recipe(model: nn.Module, name: str, verbose: bool = True, **options: Any) -> RecipeReport:
    """Make only what recipe `name` trains trainable; return (and print, on rank 0) a report.

    Options per recipe: all take `bias_update` (None: as configured; False: turn router bias balancing off; the
    default of "esft" and "lora" is False);
    "freeze-routed-experts" / "moe-only": `train_router`; "esft": `experts` (dict or JSON path),
    `train_shared_experts`, `train_non_expert`; "lora": `r`, `lora_alpha`, `lora_dropout`, `routed_experts`,
    `dense_ffn`, `target_modules`, other `peft.LoraConfig` fields. For "lora" train `report.model`.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe name={name!r}; allowed values are {sorted(RECIPES)}.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("Apply the recipe to the model before wrapping it in DistributedDataParallel.")
    recipe = RECIPES[name]
    signature = inspect.signature(recipe).parameters
    allowed = [p for p, spec in signature.items() if p != "model" and spec.kind is not spec.VAR_KEYWORD]
    unknown = sorted(set(options) - set(allowed))
    if unknown and not any(spec.kind is spec.VAR_KEYWORD for spec in signature.values()):
        raise TypeError(f"apply_recipe(name={name!r}) got unknown options {unknown}; its options are {allowed}.")
    result = recipe(model, **options)
    model, notes = result if isinstance(result, tuple) else (model, result)
    model.hf_moe_recipe = name
    report = recipe_report(model, name, notes)
    if verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(report.table())
    return report
