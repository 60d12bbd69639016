"""Do experts specialise by domain, by position or by token id? (OpenMoE, Xue et al. 2024, arXiv 2402.01739 §4)

Every score here is rescaled against a permutation baseline: the same statistic computed after shuffling the
labels (domain, position bucket) or the expert choices over the traced tokens, which keeps every count and
every expert load but makes routing independent of what is measured. So 0 means "no more than independent
routing gives on this many tokens" (finite samples never give exactly 0) and 1 means "fully determined".

- Domain / position: a routed slot is one (token, chosen expert) pair, each token giving K of them. The
  specialisation score of a grouping G (data file, or position bucket) is the normalised mutual information
  NMI = I(G; E) / H(G) between the group of a slot and its expert, rescaled: (NMI - NMI0) / (1 - NMI0), NMI0
  the mean NMI over shuffles of G. 1 = each expert serves one group only; 0 = experts serve all groups alike.
- Token id (OpenMoE's "context-independent specialisation"): for token id v with n_v >= min_count traced
  occurrences, c_v = the largest number of its occurrences that chose one same expert set (the mode of its
  top-k sets, order ignored). Concentration A = sum_v c_v / sum_v n_v (occurrence-weighted mean mode share),
  score = (A - A0) / (1 - A0), A0 = A after shuffling the expert sets over all traced tokens. 1 = every token
  id always takes one same expert set; 0 = its context decides as much as chance.
- Routing explained by token id alone: the best context-free router is a table v -> the K experts v chose
  most often. Its hit rate H = (slots the table reproduces) / (all slots) of the tokens with n_v >= min_count,
  rescaled the same way: (H - H0) / (1 - H0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .trace import RoutingTrace

DEFAULT_PERMUTATIONS = 4


def _rescaled(value: float, chance: float) -> float:
    """(value - chance) / (1 - chance): 0 at chance, 1 at the maximum 1; NaN if chance is already 1."""
    return (value - chance) / (1.0 - chance) if chance < 1.0 - 1e-12 else float("nan")


def _permutations(count: int, size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(size, generator=generator) for _ in range(count)]


def _slot_counts(groups: torch.Tensor, topk_ids: torch.Tensor, num_groups: int, num_experts: int) -> torch.Tensor:
    """(G, N) routed slots of each group to each expert. groups (M,), topk_ids (M, K)."""
    keys = groups.view(-1, 1) * num_experts + topk_ids  # (M, K)
    return torch.bincount(keys.reshape(-1), minlength=num_groups * num_experts).view(num_groups, num_experts).float()


def normalised_mutual_information(joint: torch.Tensor) -> float:
    """I(G; E) / H(G) of a (G, N) table of counts (rows: groups, columns: experts); NaN if H(G) = 0."""
    p = joint.double() / joint.sum().clamp(min=1)
    pg, pe = p.sum(dim=1, keepdim=True), p.sum(dim=0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pg @ pe)[nz]).log()).sum().item()
    pg = pg[pg > 0]
    hg = -(pg * pg.log()).sum().item()
    return mi / hg if hg > 1e-12 else float("nan")


@dataclass
class GroupSpecialisation:
    """How the experts of each layer share out among groups of tokens (domains or position buckets).

    shares[l, g, e]: fraction of group g's tokens that chose expert e (a row sums to K); overall[l, e]: the
    same over all tokens; ratio = shares / overall (1 = the expert serves the group exactly as much as any
    token; > 1 over-served). score[l]: the rescaled NMI (module docstring), nmi / chance: before rescaling."""

    layers: list[str]
    groups: list[str]
    tokens: torch.Tensor  # (G,) traced tokens per group
    shares: torch.Tensor  # (L, G, N)
    overall: torch.Tensor  # (L, N)
    ratio: torch.Tensor  # (L, G, N)
    score: list[float]
    nmi: list[float]
    chance: list[float]


def group_specialisation(
    trace: RoutingTrace, groups: torch.Tensor, names: list[str], permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0
) -> GroupSpecialisation:
    """Specialisation of every layer's experts by the grouping `groups` (M,) int64 in [0, len(names))."""
    num_groups, n = len(names), trace.num_experts
    tokens = torch.bincount(groups, minlength=num_groups).float()
    shuffles = _permutations(permutations, trace.num_tokens, seed)
    shares, overall, scores, nmis, chances = [], [], [], [], []
    for layer in range(len(trace.layers)):
        ids = trace.topk_ids[layer]
        joint = _slot_counts(groups, ids, num_groups, n)
        shares.append(joint / tokens.clamp(min=1).view(-1, 1))
        overall.append(joint.sum(dim=0) / max(trace.num_tokens, 1))
        nmi = normalised_mutual_information(joint)
        chance = sum(normalised_mutual_information(_slot_counts(groups[p], ids, num_groups, n)) for p in shuffles)
        chance = chance / permutations if permutations else 0.0
        nmis.append(nmi), chances.append(chance), scores.append(_rescaled(nmi, chance))
    shares_t, overall_t = torch.stack(shares), torch.stack(overall)
    ratio = torch.where(overall_t.unsqueeze(1) > 0, shares_t / overall_t.unsqueeze(1).clamp(min=1e-30), torch.nan)
    return GroupSpecialisation(trace.layers, list(names), tokens, shares_t, overall_t, ratio, scores, nmis, chances)


def domain_specialisation(trace: RoutingTrace, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> GroupSpecialisation:
    """Specialisation by data file (each file one domain): `group_specialisation` over `trace.domains`."""
    return group_specialisation(trace, trace.domains, trace.domain_names, permutations, seed)


def position_buckets(positions: torch.Tensor, num_buckets: int, length: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Equal-width position buckets over [0, length) (default: the largest position + 1): each position's
    bucket index (M,) and the labels "start-end" (inclusive). Fewer buckets than asked if length is small."""
    length = int(length if length is not None else positions.max().item() + 1)
    num_buckets = max(1, min(num_buckets, length))
    edges = [i * length // num_buckets for i in range(num_buckets + 1)]
    index = torch.bucketize(positions, torch.tensor(edges[1:-1]), right=True)
    return index, [f"{edges[i]}-{edges[i + 1] - 1}" for i in range(num_buckets)]


def position_specialisation(
    trace: RoutingTrace, num_buckets: int = 8, length: int | None = None,
    permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
) -> GroupSpecialisation:
    """Expert load by position bucket (`position_buckets`), as a `GroupSpecialisation` over the buckets."""
    index, labels = position_buckets(trace.positions, num_buckets, length)
    return group_specialisation(trace, index, labels, permutations, seed)


@dataclass
class TokenSpecialisation:
    """Context-independent (token-id) specialisation per layer (definitions in the module docstring).

    concentration / chance / score: A, A0 and (A - A0) / (1 - A0); explained / explained_chance /
    explained_score: H, H0 and (H - H0) / (1 - H0). top_tokens[l][e]: up to `top` (token id, share of its
    occurrences that chose e, occurrences) of the tokens with n_v >= min_count most often sent to expert e.
    token_ids / counts / mode_share[l]: per distinct token id (n_v >= min_count) its n_v and c_v / n_v."""

    layers: list[str]
    min_count: int
    tokens_counted: int
    distinct_tokens: int
    concentration: list[float]
    chance: list[float]
    score: list[float]
    explained: list[float]
    explained_chance: list[float]
    explained_score: list[float]
    top_tokens: list[list[list[tuple[int, float, int]]]]
    token_ids: torch.Tensor  # (V',)
    counts: torch.Tensor  # (V',)
    mode_share: torch.Tensor  # (L, V')

    def mode_share_histogram(self, bins: int = 10) -> torch.Tensor:
        """(L, bins) share of token occurrences whose token id has its mode share in each of `bins` equal
        bins of [0, 1] (the last bin includes 1)."""
        edges = torch.linspace(0, 1, bins + 1)
        hists = [torch.histogram(share, bins=edges, weight=self.counts.float()).hist for share in self.mode_share]
        return torch.stack([h / h.sum().clamp(min=1) for h in hists]) if hists else torch.zeros(0, bins)


def _mode_counts(tokens: torch.Tensor, set_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(V,) for each (compact) token id: how many of its occurrences chose its most frequent expert set."""
    width = int(set_index.max().item()) + 1
    pairs, counts = torch.unique(tokens * width + set_index, return_counts=True)
    return torch.zeros(num_tokens, dtype=torch.long).scatter_reduce(0, pairs // width, counts, "amax")


def _table_hits(tokens: torch.Tensor, topk_ids: torch.Tensor, num_tokens: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, N) slot counts token x expert, and (V,) slots a best context-free table reproduces per token."""
    counts = _slot_counts(tokens, topk_ids, num_tokens, num_experts)
    return counts, counts.topk(topk_ids.shape[1], dim=1).values.sum(dim=1)


def token_id_specialisation(
    trace: RoutingTrace, min_count: int = 5, top: int = 5, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0
) -> TokenSpecialisation:
    """Token-id specialisation of every layer of `trace` (module docstring): how concentrated each token
    id's routing is over its occurrences, the routing a token-id table explains, the top tokens per expert."""
    distinct, compact = torch.unique(trace.token_ids, return_inverse=True)
    n_v = torch.bincount(compact, minlength=distinct.numel())
    keep = n_v >= min_count
    counted = int(n_v[keep].sum())
    shuffles = _permutations(permutations, trace.num_tokens, seed)
    k = trace.top_k
    result = {name: [] for name in ("concentration", "chance", "score", "explained", "explained_chance",
                                    "explained_score", "top_tokens", "mode_share")}
    for layer in range(len(trace.layers)):
        _, set_index = torch.unique(trace.expert_sets(layer), dim=0, return_inverse=True)  # (M,)
        mode = _mode_counts(compact, set_index, distinct.numel())
        conc = mode[keep].sum().item() / counted if counted else float("nan")
        chance = sum(_mode_counts(compact, set_index[p], distinct.numel())[keep].sum().item() for p in shuffles)
        chance = chance / (permutations * counted) if counted and permutations else 0.0
        ids = trace.topk_ids[layer]
        slot_counts, hits = _table_hits(compact, ids, distinct.numel(), trace.num_experts)
        explained = hits[keep].sum().item() / (k * counted) if counted else float("nan")
        explained_chance = sum(_table_hits(compact, ids[p], distinct.numel(), trace.num_experts)[1][keep].sum().item()
                               for p in shuffles)
        explained_chance = explained_chance / (permutations * k * counted) if counted and permutations else 0.0
        result["concentration"].append(conc)
        result["chance"].append(chance)
        result["score"].append(_rescaled(conc, chance))
        result["explained"].append(explained)
        result["explained_chance"].append(explained_chance)
        result["explained_score"].append(_rescaled(explained, explained_chance))
        result["mode_share"].append(mode[keep].float() / n_v[keep].clamp(min=1).float())
        result["top_tokens"].append(_top_tokens(slot_counts[keep], n_v[keep], distinct[keep], top))
    return TokenSpecialisation(
        layers=trace.layers, min_count=min_count, tokens_counted=counted, distinct_tokens=int(keep.sum()),
        token_ids=distinct[keep], counts=n_v[keep], mode_share=torch.stack(result.pop("mode_share")), **result,
    )


def _top_tokens(slot_counts: torch.Tensor, n_v: torch.Tensor, token_ids: torch.Tensor, top: int) -> list[list[tuple[int, float, int]]]:
    """Per expert: the tokens with the largest share of their occurrences sent to it (ties: more occurrences)."""
    share = slot_counts / n_v.clamp(min=1).view(-1, 1).float()  # (V', N)
    by_count = torch.sort(n_v, descending=True, stable=True).indices  # secondary key first, then a stable sort
    order = by_count[torch.sort(share[by_count], dim=0, descending=True, stable=True).indices[:top]]  # (top, N)
    return [[(int(token_ids[v]), float(share[v, e]), int(n_v[v])) for v in order[:, e].tolist() if slot_counts[v, e] > 0]
            for e in range(slot_counts.shape[1])]
