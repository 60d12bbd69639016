"""Load balance over the traced data, per layer: loads, MaxVio, dead experts, routing entropy, percentiles.

One implementation with the training metrics: `max_violation` (Wang et al. 2024 §4.1: max load / mean load
- 1), `dead_experts`, `routing_entropy` and `load_percentiles` of `hf_moe.training`. Loads count every top-k
slot as chosen (a capacity limit's drops are in `capacity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..training.balancing import max_violation
from ..training.metrics import dead_experts, load_percentiles
from .trace import RoutingTrace

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


@dataclass
class LoadBalance:
    layers: list[str]
    loads: torch.Tensor  # (L, N) slots per expert
    max_vio: list[float]
    dead: list[float]  # fraction of experts that got no token
    entropy: list[float]  # mean routing entropy (nats)
    entropy_fraction: list[float]  # entropy / log N (1 = uniform router distribution)
    quantiles: tuple[float, ...]
    percentiles: torch.Tensor  # (L, len(quantiles)) of load / mean load


def load_balance(trace: RoutingTrace, quantiles: tuple[float, ...] = QUANTILES) -> LoadBalance:
    """The load-balance summary of every layer of `trace`."""
    loads = trace.loads()
    entropy = trace.entropy.mean(dim=1).tolist()
    log_n = math.log(trace.num_experts) if trace.num_experts > 1 else float("nan")
    return LoadBalance(
        layers=trace.layers, loads=loads, max_vio=max_violation(loads).tolist(), dead=dead_experts(loads).tolist(),
        entropy=entropy, entropy_fraction=[e / log_n for e in entropy], quantiles=tuple(quantiles),
        percentiles=load_percentiles(loads, tuple(quantiles)),
    )
