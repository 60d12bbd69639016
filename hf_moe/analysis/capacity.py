"""Drop towards the end (OpenMoE, Xue et al. 2024 §4.3): under a capacity limit, which positions lose slots.

The drops are replayed offline on the traced routing with the model's own rule, `drop_over_capacity`
(GShard: capacity ceil(factor * tokens * K / N) per expert and capacity group; all first choices in token
order, then all second choices, ...). A capacity group is one model forward (`group_by="batch"`, what the
model itself does on the traced batches: tokens in batch-major order, so later positions and later sequences
of the batch queue behind earlier ones) or one sequence (`group_by="sequence"`). Padding and BOS are not in
the groups. Routing of deeper layers is the traced one: it followed the model's own capacity factor (None =
dropless), so a different `capacity_factor` is a what-if on the same routing decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.routing import drop_over_capacity, expert_capacity
from .specialisation import position_buckets
from .trace import RoutingTrace


@dataclass
class DropRates:
    """Per layer and position bucket: slots dropped / slots routed (`rates`, NaN for an empty bucket)."""

    layers: list[str]
    buckets: list[str]
    capacity_factor: float
    group_by: str
    dropped: torch.Tensor  # (L, B) dropped slots
    slots: torch.Tensor  # (B,) routed slots (tokens x K) per bucket, the same in every layer
    rates: torch.Tensor  # (L, B)
    overall: list[float]  # (L,) dropped / routed over all positions
    capacities: list[int]  # capacity per expert of each group size seen (sorted, distinct)


def dropped_slots(topk_ids: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """(T, K) bool: the slots the model's capacity rule drops for one group of T tokens (in model order)."""
    kept = drop_over_capacity(topk_ids, torch.ones(topk_ids.shape, dtype=torch.float32), num_experts, capacity_factor)
    return kept == 0


def drop_rate_by_position(
    trace: RoutingTrace, capacity_factor: float | None = None, num_buckets: int = 8, length: int | None = None,
    group_by: str = "batch",
) -> DropRates:
    """Drop rate by position bucket (`position_buckets`) for every layer, replaying `capacity_factor` (default:
    the model's own; a dropless model needs one) over capacity groups `group_by` "batch" or "sequence"."""
    factor = capacity_factor if capacity_factor is not None else trace.capacity_factor
    if factor is None:
        raise ValueError("the model is dropless (capacity_factor=None): give a capacity factor to replay, e.g. 1.25.")
    if not factor > 0:
        raise ValueError(f"capacity_factor={factor!r} is invalid: it must be > 0.")
    if group_by not in ("batch", "sequence"):
        raise ValueError(f"group_by={group_by!r} is invalid: allowed values are 'batch' and 'sequence'.")
    groups = trace.batches if group_by == "batch" else trace.sequences
    bucket, labels = position_buckets(trace.positions, num_buckets, length)
    dropped_per_token = torch.zeros(len(trace.layers), trace.num_tokens)
    sizes: set[int] = set()
    # tokens of one group are contiguous and in model order in the trace
    starts = torch.cat([torch.tensor([0]), (groups[1:] != groups[:-1]).nonzero().view(-1) + 1, torch.tensor([trace.num_tokens])])
    for start, end in zip(starts[:-1].tolist(), starts[1:].tolist()):
        sizes.add(end - start)
        for layer in range(len(trace.layers)):
            dropped = dropped_slots(trace.topk_ids[layer, start:end], trace.num_experts, factor)
            dropped_per_token[layer, start:end] = dropped.sum(dim=-1).float()
    nb = len(labels)
    dropped = torch.stack([torch.bincount(bucket, weights=d, minlength=nb) for d in dropped_per_token])
    slots = torch.bincount(bucket, minlength=nb).float() * trace.top_k
    rates = torch.where(slots > 0, dropped / slots.clamp(min=1), torch.nan)
    overall = (dropped.sum(dim=1) / max(trace.num_tokens * trace.top_k, 1)).tolist()
    capacities = sorted({expert_capacity(size, trace.top_k, trace.num_experts, factor) for size in sizes})
    return DropRates(trace.layers, labels, float(factor), group_by, dropped, slots, rates, overall, capacities)
