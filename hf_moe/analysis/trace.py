"""Trace what every router of a model decides for every token of a data stream.

`trace_routing` runs the model in eval mode under `torch.no_grad()` on batches of token sequences, with a
forward hook on each `Router` (the hf_moe module every MoE layer routes with) reading its `RouterOutput`:
the top-k expert ids (chosen before any capacity drop), the gate values (0 for slots the model's own capacity
limit dropped), and the router scores, from which each token's routing entropy is taken (and, if asked,
the full normalised router distribution is kept). Padding and BOS prefixes are not traced. Tokens are kept
in the order the model's router saw them (batch-major: sequence by sequence, position by position), so a
capacity limit can be replayed offline on the same groups (`hf_moe.analysis.capacity`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling.routing import Router, RouterOutput
from ..training.balancing import find_routers, layer_label
from ..training.metrics import routing_entropy
from .data import TokenSequence


@dataclass
class RoutingTrace:
    """The routing of M traced tokens through L MoE layers (routers that ran; MTP blocks do not run without
    labels). Per token: its id, position in its sequence (0 = first model input), domain (data file index),
    sequence index and batch index (one model forward = one capacity group)."""

    layers: list[str]  # router labels, "layer_1", ...
    num_experts: int
    top_k: int
    domain_names: list[str]
    token_ids: torch.Tensor  # (M,) int64
    positions: torch.Tensor  # (M,) int64
    domains: torch.Tensor  # (M,) int64
    sequences: torch.Tensor  # (M,) int64
    batches: torch.Tensor  # (M,) int64
    topk_ids: torch.Tensor  # (L, M, K) int64, as chosen (before capacity drops)
    topk_weights: torch.Tensor  # (L, M, K) fp32 gate values (0 = dropped by the model's capacity limit)
    entropy: torch.Tensor  # (L, M) fp32 routing entropy in nats (`training.metrics.routing_entropy`)
    probabilities: torch.Tensor | None = None  # (L, M, N) fp16 normalised router distribution, if kept
    capacity_factor: float | None = None  # the model's own (None = dropless)
    router_names: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def loads(self) -> torch.Tensor:
        """(L, N) tokens routed to each expert (every top-k slot counts, drops included)."""
        return torch.stack([torch.bincount(ids.reshape(-1), minlength=self.num_experts) for ids in self.topk_ids]).float()

    def expert_sets(self, layer: int) -> torch.Tensor:
        """(M, K) each token's chosen experts as a sorted set (order of the top-k removed)."""
        return self.topk_ids[layer].sort(dim=-1).values


class _RouterTap:
    """Forward hooks on every router; each forward's outputs are collected per router, in call order."""

    def __init__(self, routers: list[tuple[str, Router]], keep_probabilities: bool) -> None:
        self.routers = routers
        self.keep_probabilities = keep_probabilities
        self.outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {i: [] for i in range(len(routers))}
        self._handles = [router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(routers)]

    def _hook(self, index: int) -> Any:
        def record(router: Router, args: tuple, output: RouterOutput) -> None:
            scores = router.scores(output.logits.float())  # (B*T, N)
            probabilities = scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-30) if self.keep_probabilities else None
            self.outputs[index].append((output.topk_ids, output.topk_weights.float(), routing_entropy(scores), probabilities))

        return record

    def take(self) -> dict[int, list[tuple[torch.Tensor, ...]]]:
        outputs, self.outputs = self.outputs, {i: [] for i in range(len(self.routers))}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _pad(batch: Sequence[TokenSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (B, T) and attention_mask (B, T); causal attention keeps real tokens exact."""
    length = max(seq.input_ids.numel() for seq in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : seq.input_ids.numel()] = seq.input_ids
        mask[row, : seq.input_ids.numel()] = 1
    return ids, mask


def _batches(sequences: Iterable[TokenSequence], batch_size: int) -> Iterable[list[TokenSequence]]:
    batch: list[TokenSequence] = []
    for seq in sequences:
        batch.append(seq)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def trace_routing(
    model: nn.Module,
    sequences: Iterable[TokenSequence],
    domain_names: Sequence[str] = ("data",),
    batch_size: int = 8,
    keep_probabilities: bool = True,
    pad_token_id: int | None = None,
    progress: bool = True,
    total_tokens: int | None = None,
) -> RoutingTrace:
    """Run `model` (any hf_moe model: MoEForCausalLM, MoEModel, ...) on `sequences` in batches of `batch_size`
    and record every router's decision for every traced token (see `RoutingTrace`). `keep_probabilities`:
    also keep each token's full router distribution (L x M x N fp16: leave it off for big models).
    `total_tokens` sizes the progress bar (tokens) when known."""
    routers = find_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE router (hf_moe Router modules): nothing to trace.")
    first = routers[0][1]
    pad_id = pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tap = _RouterTap(routers, keep_probabilities)
    per_router: dict[int, list[tuple[torch.Tensor, ...]]] = {i: [] for i in range(len(routers))}
    columns: dict[str, list[torch.Tensor]] = {"token_ids": [], "positions": [], "domains": [], "sequences": [], "batches": []}
    n_seq = 0
    try:
        with tqdm(total=total_tokens, unit="tok", desc="tracing routers", disable=not progress) as bar:
            for b, batch in enumerate(_batches(sequences, batch_size)):
                ids, mask = _pad(batch, pad_id)
                traced = mask.bool().clone()  # (B, T): real tokens that are not the BOS prefix
                for row, seq in enumerate(batch):
                    traced[row, : seq.prefix] = False
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                flat = traced.reshape(-1)
                for i, outputs in tap.take().items():
                    if len(outputs) > 1:
                        raise ValueError(f"router {routers[i][0]} ran {len(outputs)} times in one forward: the "
                                         "trace needs one decision per token and layer.")
                    per_router[i].extend(tuple(None if t is None else t.detach().cpu()[flat] for t in o) for o in outputs)
                positions = torch.arange(ids.shape[1]).expand_as(ids)
                columns["token_ids"].append(ids[traced])
                columns["positions"].append(positions[traced])
                columns["domains"].append(torch.tensor([s.domain for s in batch]).view(-1, 1).expand_as(ids)[traced])
                columns["sequences"].append((n_seq + torch.arange(len(batch))).view(-1, 1).expand_as(ids)[traced])
                columns["batches"].append(torch.full((int(traced.sum()),), b, dtype=torch.long))
                n_seq += len(batch)
                bar.update(int(traced.sum()))
    finally:
        tap.remove()
        model.train(was_training)
    if not n_seq:
        raise ValueError("trace_routing: no sequences given.")
    ran = [i for i in range(len(routers)) if per_router[i]]
    if partial := [routers[i][0] for i in ran if len(per_router[i]) != b + 1]:
        raise ValueError(f"routers {partial} ran on some batches only: the trace needs every token of every layer.")
    if not ran:
        raise ValueError(f"no router of {type(model).__name__} ran on the data: nothing to trace.")
    stacked = {i: [torch.cat([o[j] for o in per_router[i]]) if per_router[i][0][j] is not None else None
                   for j in range(4)] for i in ran}
    return RoutingTrace(
        layers=[layer_label(routers[i][0]) for i in ran],
        router_names=[routers[i][0] for i in ran],
        num_experts=first.num_experts,
        top_k=first.top_k,
        domain_names=list(domain_names),
        **{name: torch.cat(parts) for name, parts in columns.items()},
        topk_ids=torch.stack([stacked[i][0] for i in ran]),
        topk_weights=torch.stack([stacked[i][1] for i in ran]),
        entropy=torch.stack([stacked[i][2] for i in ran]),
        probabilities=torch.stack([stacked[i][3].half() for i in ran]) if keep_probabilities else None,
        capacity_factor=first.config.capacity_factor,
    )
