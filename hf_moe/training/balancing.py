"""Auxiliary-loss-free load balancing: the router bias update, once per optimizer step.

Wang et al. 2024 (arXiv 2408.15664) Algorithm 1; DeepSeek-V3 §2.1.2. Every router keeps an fp32 bias
`e_score_correction_bias` b (it only chooses experts: gates come from the unbiased scores) and an fp32
counter `tokens_per_expert` c that training forwards fill (grad enabled, not inside backward, so eval and
the recompute of gradient checkpointing never count). Once per optimizer step, after all gradient
accumulation micro-batches:

    c_i   <- sum over data-parallel ranks of c_i           (ONE all_reduce for all layers)
    b_i   <- b_i + gamma * sign(mean_j c_j - c_i)           (gamma = config.router_bias_update_rate)
    [zero-mean variant: subtract the mean of the update over the experts of the layer (torchtitan)]
    c_i   <- 0

Routers that do not move: those marked frozen (`freeze_router_biases`, the "freeze-router" recipe), those
named in `exclude=`, and router types whose choice ignores the bias (hash, expert choice, balanced
assignment); their counters are still summed, returned and reset. The global-batch balance-loss counts
(`Router.balance_counts`, `balance_loss_scope="global_batch"`) are zeroed here too: a step starts afresh.

Since sign() is scale invariant, summing over every rank of the world (even ranks that see replicated
batches, e.g. tensor parallel) gives the same update as summing over data-parallel ranks only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.routing import Router
from .parts import layer_label


def find_routers(model: nn.Module) -> list[tuple[str, Router]]:
    """Every Router of `model` (decoder layers, then MTP blocks), with its module name, in module order.
    Works through wrappers (DDP, peft, accelerate) since it walks `named_modules()`; of a router that peft saves
    with an adapter (`modules_to_save`) only the adapter's copy counts, the base's original does not run."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Router) and ".original_module" not in name]


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean_i load_i - 1 over the last dim (Wang et al. 2024 §4.1); NaN where no token
    was routed. loads (..., N) -> (...)."""
    loads = loads.float()
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, loads.amax(dim=-1) / mean.clamp(min=1e-30) - 1.0, torch.full_like(mean, float("nan")))


@dataclass
class ExpertLoads:
    """Tokens routed to each expert, per router: `loads[l, i]` for router `names[l]` (fp32, summed over
    ranks when it comes from `update_router_biases` under torch.distributed)."""

    names: list[str]
    loads: torch.Tensor  # (L, N)

    @property
    def labels(self) -> list[str]:
        """"layer_{i}" for decoder layer i, "mtp_{k}" for the MTP block of depth k + 1."""
        return [layer_label(name) for name in self.names]

    @property
    def max_vio(self) -> torch.Tensor:
        """(L,) MaxVio of every router; NaN for routers that saw no token."""
        return max_violation(self.loads)

    def is_main_layer(self) -> list[bool]:
        """Which routers belong to the main model's decoder layers (not to MTP blocks)."""
        return [not label.startswith("mtp_") for label in self.labels]

    def mean_max_vio(self, include_mtp: bool = False) -> float:
        """Mean MaxVio over the MoE layers that saw tokens (main decoder layers only unless `include_mtp`),
        the number the papers report; NaN if none did."""
        values = self.max_vio
        keep = torch.tensor([include_mtp or main for main in self.is_main_layer()], dtype=torch.bool)
        keep &= ~values.isnan().cpu()
        return values.cpu()[keep].mean().item() if keep.any() else float("nan")

    def as_dict(self) -> dict[str, list[float]]:
        """{label: tokens per expert} for logs and JSON."""
        return {label: row.tolist() for label, row in zip(self.labels, self.loads.cpu())}


def read_expert_counts(model: nn.Module) -> ExpertLoads:
    """The local (this rank's) counters of every router, without touching them."""
    routers = find_routers(model)
    if not routers:
        return ExpertLoads([], torch.zeros(0, 0))
    device = routers[0][1].tokens_per_expert.device
    return ExpertLoads([n for n, _ in routers], torch.stack([r.tokens_per_expert.to(device) for _, r in routers]))


def reset_expert_counters(model: nn.Module) -> None:
    """Zero every router's `tokens_per_expert` and global-batch `balance_counts` (e.g. to drop counts of
    forwards made before training)."""
    for _, router in find_routers(model):
        router.tokens_per_expert.zero_()
        router.balance_counts.zero_()


def freeze_router_biases(model: nn.Module, frozen: bool = True, names: Iterable[str] | None = None) -> list[str]:
    """Mark routers (all, or those whose module names are in `names`) so that `update_router_biases` leaves their
    bias alone (`frozen=False` unmarks). A Python attribute of the module, not saved. Returns the names marked."""
    wanted = None if names is None else set(names)
    routers = [(n, r) for n, r in find_routers(model) if wanted is None or n in wanted]
    if wanted is not None and len(routers) != len(wanted):
        known = [n for n, _ in find_routers(model)]
        raise ValueError(f"freeze_router_biases: no router named {sorted(wanted - set(known))}; routers: {known}.")
    for _, router in routers:
        router.bias_frozen = frozen
    return [n for n, _ in routers]


@torch.no_grad()
def update_router_biases(
    model: nn.Module,
    rate: float | None = None,
    zero_mean: bool | None = None,
    process_group: dist.ProcessGroup | None = None,
    exclude: Iterable[str] = (),
    skip_frozen: bool = True,
) -> ExpertLoads:
    """One aux-loss-free balancing step for every router of `model` (call once per optimizer step, after
    `optimizer.step()`, on every rank): sum the counters over ranks in one all_reduce, move each bias by
    `gamma * sign(mean load - load)` (Wang et al. 2024 eq. 3; DeepSeek-V3 §2.1.2), zero the counters.

    rate: gamma; default `config.router_bias_update_rate` of the routers (0 only reads and resets counters).
    zero_mean: subtract the update's mean per layer; default `config.router_bias_update_zero_mean`.
    process_group: the group to sum over (default: the whole world when torch.distributed is initialised).
    exclude: module names of routers whose bias this call leaves alone (this call only).
    skip_frozen: leave routers marked by `freeze_router_biases` alone (default True).
    Returns the loads (summed over ranks) that drove the update, for metrics such as MaxVio.

        for batch in loader:                                  # accelerate
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step(); optimizer.zero_grad()
            if accelerator.sync_gradients:
                loads = update_router_biases(model)           # loads.mean_max_vio() for logging
    """
    routers = find_routers(model)
    if not routers:
        return ExpertLoads([], torch.zeros(0, 0))
    config = routers[0][1].config
    gamma = float(config.router_bias_update_rate if rate is None else rate)
    zero_mean = bool(config.router_bias_update_zero_mean if zero_mean is None else zero_mean)
    if gamma < 0:
        raise ValueError(f"update_router_biases(rate={gamma!r}) is invalid: gamma must be >= 0.")

    device = routers[0][1].tokens_per_expert.device
    counts = torch.stack([r.tokens_per_expert.to(device, torch.float32) for _, r in routers])  # (L, N)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)  # the one collective of the step

    if gamma > 0:
        step = torch.sign(counts.mean(dim=-1, keepdim=True) - counts) * gamma  # (L, N) fp32, +-gamma or 0
        if zero_mean:
            step = step - step.mean(dim=-1, keepdim=True)
        excluded = set(exclude)
        for (name, router), layer_step in zip(routers, step):
            if name in excluded or not router.uses_bias or (skip_frozen and router.bias_frozen):
                continue
            bias = router.e_score_correction_bias
            bias.add_(layer_step.to(bias.device, bias.dtype))
    for _, router in routers:
        router.tokens_per_expert.zero_()
        router.balance_counts.zero_()
    return ExpertLoads([n for n, _ in routers], counts)
