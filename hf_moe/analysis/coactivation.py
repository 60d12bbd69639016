"""Which experts are chosen together: per layer, how often two experts serve the same token.

counts[i, j] = tokens whose top-k holds both i and j (the diagonal: tokens that chose i);
lift[i, j] = P(i and j) / (c P(i) P(j)) over the traced tokens (diagonal NaN), c = (K - 1) N / (K (N - 1)) the
value of P(i and j) / (P(i) P(j)) when every token takes K distinct experts uniformly at random (a token
cannot take an expert twice, so pairs are a little rarer than P(i) P(j)). 1 = chosen together as often as
choices independent of each other give, > 1 = a pair, 0 = never together. Top-1 routing has no pairs (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .trace import RoutingTrace

_CHUNK = 1 << 16


@dataclass
class Coactivation:
    layers: list[str]
    counts: torch.Tensor  # (L, N, N)
    lift: torch.Tensor  # (L, N, N)
    tokens: int

    def top_pairs(self, layer: int, count: int = 5) -> list[tuple[int, int, float, int]]:
        """The `count` expert pairs (i < j) of `layer` with the largest lift: (i, j, lift, tokens together)."""
        lift = self.lift[layer].nan_to_num(nan=-1.0).triu(diagonal=1)
        lift = torch.where(torch.ones_like(lift, dtype=torch.bool).triu(diagonal=1), lift, -1.0)
        values, flat = lift.reshape(-1).topk(min(count, lift.numel()))
        n = lift.shape[0]
        return [(i // n, i % n, float(v), int(self.counts[layer, i // n, i % n])) for v, i in zip(values.tolist(), flat.tolist()) if v >= 0]


def coactivation(trace: RoutingTrace) -> Coactivation:
    """Co-activation counts and lift of every layer of `trace` (module docstring)."""
    n, m = trace.num_experts, trace.num_tokens
    all_counts = []
    for layer in range(len(trace.layers)):
        counts = torch.zeros(n, n)
        for start in range(0, m, _CHUNK):
            chosen = torch.zeros(min(_CHUNK, m - start), n).scatter_(1, trace.topk_ids[layer, start:start + _CHUNK], 1.0)
            counts += chosen.t() @ chosen
        all_counts.append(counts)
    counts = torch.stack(all_counts)  # (L, N, N)
    p = counts.diagonal(dim1=1, dim2=2) / max(m, 1)  # (L, N)
    k = trace.top_k
    c = (k - 1) * n / (k * (n - 1)) if n > 1 else 0.0
    expected = c * p.unsqueeze(2) * p.unsqueeze(1)
    lift = torch.where(expected > 0, counts / max(m, 1) / expected.clamp(min=1e-30), torch.nan)
    lift.diagonal(dim1=1, dim2=2).fill_(float("nan"))
    return Coactivation(trace.layers, counts, lift, m)
