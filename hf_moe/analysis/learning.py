"""Early routing learning (OpenMoE, Xue et al. 2024 §4.2): how soon the router settles on its final choices.

The same token sequences are traced through several checkpoints of one run; for each checkpoint and layer,
`agreement` is the fraction of tokens whose expert set (top-k, order ignored) equals the final checkpoint's,
and `overlap` the mean fraction of the final checkpoint's K experts the checkpoint also chose (a softer
version: 1 when the sets are equal, K'/K when K' of K agree). A router that learns early reaches agreement
near 1 long before training ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .trace import RoutingTrace


@dataclass
class RoutingAgreement:
    layers: list[str]
    checkpoints: list[str]
    steps: list[int | None]
    agreement: torch.Tensor  # (C, L)
    overlap: torch.Tensor  # (C, L)


def set_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Two (M, K) top-k choices of the same tokens: (fraction of tokens with equal sets, mean |a & b| / K)."""
    sa, sb = a.sort(dim=-1).values, b.sort(dim=-1).values
    equal = (sa == sb).all(dim=-1).float().mean().item()
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(dim=-1).float().sum(dim=-1)  # (M,)
    return equal, (shared / a.shape[-1]).mean().item()


def routing_agreement(
    final: RoutingTrace, traces: Sequence[RoutingTrace], names: Sequence[str], steps: Sequence[int | None] | None = None
) -> RoutingAgreement:
    """Agreement of each of `traces` (checkpoints, in training order) with `final`, per layer."""
    if len(traces) != len(names):
        raise ValueError(f"routing_agreement: {len(traces)} traces but {len(names)} names.")
    rows_eq, rows_ov = [], []
    for trace, name in zip(traces, names):
        if trace.layers != final.layers or trace.top_k != final.top_k or trace.num_experts != final.num_experts:
            raise ValueError(f"checkpoint {name}: its MoE layers / experts / top-k differ from the final model's "
                             f"({trace.layers}, {trace.num_experts} experts top-{trace.top_k} vs {final.layers}, "
                             f"{final.num_experts} top-{final.top_k}).")
        if not torch.equal(trace.token_ids, final.token_ids):
            raise ValueError(f"checkpoint {name}: traced on other tokens than the final model (give the same data).")
        pairs = [set_agreement(trace.topk_ids[layer], final.topk_ids[layer]) for layer in range(len(final.layers))]
        rows_eq.append([p[0] for p in pairs])
        rows_ov.append([p[1] for p in pairs])
    empty = torch.zeros(0, len(final.layers))
    return RoutingAgreement(
        final.layers, list(names), list(steps) if steps is not None else [None] * len(names),
        torch.tensor(rows_eq) if rows_eq else empty, torch.tensor(rows_ov) if rows_ov else empty,
    )
