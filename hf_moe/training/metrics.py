"""Expert load over an evaluation set, and the global MaxVio it gives (Wang et al. 2024 §4.1).

Training loads come from the routers' counters (`update_router_biases` returns them per optimizer step);
evaluation runs in eval mode, where the counters stay untouched, so the loads here are recorded by forward
hooks on the routers, which read each router's `topk_ids` and drop padding tokens (attention_mask == 0).

The per-router summaries of a load table or of router scores (`dead_experts`, `routing_entropy`,
`load_percentiles`, next to `max_violation`) are the one implementation that training logs and
`hf_moe.analysis` share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..modeling.model import MoEPreTrainedModel
from ..modeling.routing import Router, RouterOutput, inside_backward, valid_tokens
from .balancing import ExpertLoads, find_routers


class RouterLoadRecorder:
    """Counts the tokens each router sends to each expert while it is attached (non-padding tokens only).

    with RouterLoadRecorder(model) as recorder:
        model(input_ids=..., attention_mask=...)
    recorder.loads()  # ExpertLoads

    `only_eval=True` ignores forwards made in training mode (those are counted by the routers themselves);
    `reset_on_forward=True` keeps only the latest forward of the outermost model (read it after each step).
    The attention mask is taken from the outermost hf_moe model's forward call (keyword `attention_mask`).
    """

    def __init__(self, model: nn.Module, only_eval: bool = False, reset_on_forward: bool = False) -> None:
        self.model = model
        self.only_eval = only_eval
        self.reset_on_forward = reset_on_forward
        self.routers = find_routers(model)
        self._index = {id(router): i for i, (_, router) in enumerate(self.routers)}
        self._top = next((m for m in model.modules() if isinstance(m, MoEPreTrainedModel)), None)
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.counts = torch.zeros(len(self.routers), self._num_experts())

    def _num_experts(self) -> int:
        return self.routers[0][1].num_experts if self.routers else 0

    def attach(self) -> RouterLoadRecorder:
        if self._handles:
            return self
        if self._top is not None:
            self._handles.append(self._top.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        for _, router in self.routers:
            self._handles.append(router.register_forward_hook(self._count))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RouterLoadRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        self.counts.zero_()

    def loads(self) -> ExpertLoads:
        return ExpertLoads([name for name, _ in self.routers], self.counts.clone())

    def _remember_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # forward(input_ids, attention_mask)
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if self.reset_on_forward:
            self.counts.zero_()

    def _count(self, router: Router, args: tuple, output: RouterOutput) -> None:
        if self.only_eval and router.training:
            return
        topk_ids, weights = output.topk_ids.detach(), output.topk_weights.detach()  # (B*T, K)
        if self._mask is not None and topk_ids.shape[0] % self._mask.shape[0] == 0:
            length = topk_ids.shape[0] // self._mask.shape[0]
            if self._mask.shape[1] >= length:
                valid = valid_tokens(self._mask, length).reshape(-1).to(topk_ids.device)  # (B*T,)
                topk_ids, weights = topk_ids[valid], weights[valid]
        # dropped slots (capacity) and the experts that did not take a token (expert choice) have gate 0
        dropping = router.config.capacity_factor is not None or router.config.router_type == "expert_choice"
        kept = topk_ids[weights != 0] if dropping else topk_ids
        counts = torch.bincount(kept.reshape(-1), minlength=router.num_experts).float().cpu()
        self.counts[self._index[id(router)]] += counts


@torch.no_grad()
def expert_load(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], max_batches: int | None = None
) -> ExpertLoads:
    """Tokens per expert of every router over `batches` (dicts with input_ids and optionally attention_mask,
    e.g. a DataLoader), run in eval mode without labels (so MTP blocks do not run). Its `.max_vio` is the
    global MaxVio of each layer over the set; `.mean_max_vio()` the mean over MoE layers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with RouterLoadRecorder(model) as recorder:
            for step, batch in enumerate(batches):
                if max_batches is not None and step >= max_batches:
                    break
                inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                model(**inputs, use_cache=False)
    finally:
        model.train(was_training)
    return recorder.loads()


def dead_experts(loads: torch.Tensor) -> torch.Tensor:
    """Fraction of experts that received no token, over the last dim: loads (..., N) -> (...). NaN where no
    token was routed at all (a router that never ran has no dead experts, it has no data)."""
    loads = loads.float()
    dead = (loads == 0).float().mean(dim=-1)
    return torch.where(loads.sum(dim=-1) > 0, dead, torch.full_like(dead, float("nan")))


def routing_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each token's router distribution: scores (..., N) -> (...).

    The distribution is p_i = s_i / sum_j s_j of the router's affinities s (softmax scores sum to 1 already;
    sigmoid scores are normalised here), before the balancing bias and the top-k. 0 = all mass on one expert,
    log N = uniform. The `moe/routing_entropy` metric is its mean over tokens."""
    scores = scores.float().clamp(min=0)
    p = scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return -(p * p.clamp(min=1e-30).log()).sum(dim=-1)


def load_percentiles(loads: torch.Tensor, quantiles: tuple[float, ...] = (0.0, 0.1, 0.5, 0.9, 1.0)) -> torch.Tensor:
    """Quantiles of the relative load load_i / mean load over the experts of each router: loads (..., N) ->
    (..., len(quantiles)); 1 = an expert with exactly its fair share. NaN rows where no token was routed."""
    loads = loads.float()
    relative = loads / loads.mean(dim=-1, keepdim=True).clamp(min=1e-30)
    q = torch.tensor(quantiles, dtype=torch.float32, device=loads.device)
    out = torch.quantile(relative, q, dim=-1).movedim(0, -1)
    return torch.where(loads.sum(dim=-1, keepdim=True) > 0, out, torch.full_like(out, float("nan")))


class RoutingEntropyMeter:
    """Mean routing entropy (`routing_entropy`, nats) of the training forwards (grad enabled, not the checkpoint
    recompute), per router, over the real tokens; sums stay tensors (no host sync per forward) until `read()`.

    meter = RoutingEntropyMeter(model).attach(); ...train...; meter.read()  # (L,) means, then reset
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers = find_routers(model)
        self._index = {id(router): i for i, (_, router) in enumerate(self.routers)}
        self._handles: list[Any] = []
        self._sums: list[torch.Tensor | None] = [None] * len(self.routers)
        self._counts: list[torch.Tensor | None] = [None] * len(self.routers)

    def attach(self) -> RoutingEntropyMeter:
        if not self._handles:
            self._handles = [router.register_forward_hook(self._record) for _, router in self.routers]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, router: Router, args: tuple, output: RouterOutput) -> None:
        if not (router.training and torch.is_grad_enabled()) or inside_backward():
            return
        logits = output.logits.detach().float()
        scores = logits.softmax(dim=-1) if router.config.scoring_func == "softmax" else logits.sigmoid()
        entropy = routing_entropy(scores)  # (T,)
        mask = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        total = entropy.sum() if mask is None else entropy[mask.to(entropy.device)].sum()
        count = entropy.new_tensor(float(entropy.numel())) if mask is None else mask.sum().float()
        i = self._index[id(router)]
        self._sums[i] = total if self._sums[i] is None else self._sums[i] + total
        self._counts[i] = count if self._counts[i] is None else self._counts[i] + count

    def read(self, reset: bool = True) -> torch.Tensor:
        """(L,) mean entropy per router since the last read (NaN for a router that saw no token)."""
        values = torch.tensor([
            float("nan") if s is None or c.item() == 0 else (s / c).item() for s, c in zip(self._sums, self._counts)
        ])
        if reset:
            self._sums = [None] * len(self.routers)
            self._counts = [None] * len(self.routers)
        return values
