"""Router types other than the learned top-k router (`config.router_type`); `build_router` picks one.

- "hash" (Roller et al. 2021, "Hash Layers", arXiv 2106.04426): expert ids = a fixed table of token id -> K
  experts, balanced (every expert gets the same number of ids, or of token occurrences when built from token
  counts: their best variant). The table is the persistent buffer `hash_table` (V, K), saved in the checkpoint.
  Gates: the router's learned scores of the hashed experts (renormalised if `norm_topk_prob`), so K = 1 with
  renormalisation is their unweighted hash layer (gate 1) and no parameter decides the routing.
- "expert_choice" (Zhou et al. 2022, arXiv 2202.09368): S = softmax(x W^T) (T, N); each expert takes its top-C
  tokens of the batch, C = ceil(c * T / N) (eq. 1); a token gets 0..N experts, gate S[t, i]. It reads the whole
  batch, so in a causal LM a token's output depends on LATER tokens (and on the other sequences of the batch):
  a training-time leak of the future. Decoding from a cache (generation) is refused; evaluation works but has
  the same leak (its perplexity is not comparable with a causal model's).
- "balanced_assignment" (BASE layers, Lewis et al. 2021, arXiv 2103.16716): in training every expert gets
  ceil(T / N) tokens (a balanced assignment maximising the scores; here a vectorised proposal/acceptance rounds
  approximation of their auction, not the exact optimum), greedy top-1 at inference; gate sigmoid(h w_e) (eq. 2).

All subclass `Router`, so bias counters, fp32 buffers, parameter parts and the balancing tools see them.
"""

from __future__ import annotations

import heapq
import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MoEConfig
from .routing import Router, RouterOutput, inside_backward
from .routing_inputs import RoutingInputs, apply_replay


def balanced_hash_table(
    vocab_size: int, num_experts: int, top_k: int, seed: int = 0, token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(V, K) int64 table of distinct experts per token id, every column balanced: without counts each expert
    gets floor or ceil(V / N) ids (a seeded random permutation); with `token_counts` (V,) the ids go, most
    frequent first, to the expert with the least total count so far (Roller et al.'s balanced assignment).
    Column k is column 0 shifted by a distinct random offset mod N, so a token's K experts differ."""
    generator = torch.Generator().manual_seed(seed)
    if token_counts is None:
        order = torch.randperm(vocab_size, generator=generator)
        first = torch.empty(vocab_size, dtype=torch.long)
        first[order] = torch.arange(vocab_size) % num_experts
    else:
        counts = token_counts.double().cpu()
        if counts.shape != (vocab_size,):
            raise ValueError(f"balanced_hash_table: token_counts must have shape ({vocab_size},), got "
                             f"{tuple(counts.shape)}.")
        tie_break = torch.randperm(vocab_size, generator=generator)
        order = sorted(range(vocab_size), key=lambda i: (-counts[i].item(), tie_break[i].item()))
        heap = [(0.0, expert) for expert in range(num_experts)]
        first = torch.empty(vocab_size, dtype=torch.long)
        for token in order:
            load, expert = heapq.heappop(heap)
            first[token] = expert
            heapq.heappush(heap, (load + counts[token].item(), expert))
    shifts = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(num_experts - 1, generator=generator) + 1])
    return (first.unsqueeze(1) + shifts[:top_k].unsqueeze(0)) % num_experts  # (V, K)


class HashRouter(Router):
    """Experts chosen by token id alone (`hash_table`), gates from the learned scores; context-independent."""

    uses_bias = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.hash_table = nn.Buffer(self.default_table())

    def default_table(self) -> torch.Tensor:
        return balanced_hash_table(self.config.vocab_size, self.num_experts, self.top_k, self.config.hash_seed)

    @torch.no_grad()
    def rebalance(self, token_counts: torch.Tensor) -> None:
        """Rebuild the table from token frequencies (V,), e.g. counted over the training data, before training."""
        self.hash_table.copy_(balanced_hash_table(self.config.vocab_size, self.num_experts, self.top_k,
                                                  self.config.hash_seed, token_counts).to(self.hash_table.device))

    def select_experts(self, choice: torch.Tensor, routing_inputs: RoutingInputs | None) -> torch.Tensor:
        if routing_inputs is None or routing_inputs.token_ids is None:
            raise ValueError("router_type='hash' routes by token id: call the model with input_ids (or pass "
                             "router_token_ids= together with inputs_embeds).")
        ids = self.hash_table[routing_inputs.token_ids.reshape(-1).to(self.hash_table.device)]  # (T, K)
        return apply_replay(ids, routing_inputs)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Zhou et al. eq. 1: C = ceil(c * T / N) tokens per expert, at most T."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens / num_experts)))


class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens of the batch (not causal). Output slots: all N experts per token,
    gate S[t, i] where expert i took token t and 0 elsewhere (the experts interface takes (T, K) slots)."""

    uses_bias = False

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
        routing_inputs: RoutingInputs | None = None,
    ) -> RouterOutput:
        if routing_inputs is not None and routing_inputs.decoding:
            raise ValueError("router_type='expert_choice' is not causal (each expert picks among all tokens of the "
                             "batch), so it cannot decode token by token from a cache; generation is refused.")
        if routing_inputs is not None and routing_inputs.replay_ids is not None:
            raise ValueError("replay_routing does not apply to router_type='expert_choice' (experts choose tokens).")
        logits = F.linear(hidden_states.float(), self.weight.float())  # (T, N)
        scores = logits.softmax(dim=-1)  # Zhou et al.: S = Softmax(X W_g)
        num_tokens = scores.shape[0]
        capacity = expert_choice_capacity(num_tokens, self.num_experts, self.config.expert_choice_capacity_factor)
        with torch.no_grad():
            candidates = scores if token_mask is None else scores.masked_fill(~token_mask.view(-1, 1), -1.0)
            picked = candidates.t().topk(capacity, dim=-1).indices  # (N, C) token ids per expert
            chosen = torch.zeros_like(candidates.t(), dtype=torch.bool).scatter_(1, picked, True).t()  # (T, N)
            if token_mask is not None:
                chosen &= token_mask.view(-1, 1)
        topk_ids = torch.arange(self.num_experts, device=scores.device).expand(num_tokens, -1)  # (T, N)
        topk_weights = scores * chosen * self.config.routed_scaling_factor
        if self.training and torch.is_grad_enabled() and not inside_backward():
            self.tokens_per_expert.add_(chosen.sum(dim=0).float())  # in place: no buffer reassignment (Dynamo)
        return RouterOutput(logits=logits, topk_ids=topk_ids, topk_weights=topk_weights, router=self)


def balanced_assignment(scores: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(T, N) scores -> (T,) expert ids, every expert taking at most ceil(T_real / N) real tokens. Rounds: every
    unassigned token proposes to its best expert with room left; each expert accepts its best proposals up to
    its room. Padding tokens take their argmax and no room. At most N rounds (each fills an expert or ends)."""
    num_tokens, num_experts = scores.shape
    real = torch.ones(num_tokens, dtype=torch.bool, device=scores.device) if token_mask is None else token_mask
    capacity = -(-int(real.sum()) // num_experts)  # host sync: a reference implementation
    assigned = torch.where(real, -1, scores.argmax(dim=-1))
    room = torch.full((num_experts,), capacity, dtype=torch.long, device=scores.device)
    for _ in range(num_experts + 1):
        waiting = assigned < 0
        if not waiting.any():
            break
        open_scores = scores.masked_fill((room == 0).view(1, -1), float("-inf"))
        best_score, proposal = open_scores.max(dim=-1)  # (T,)
        proposal = torch.where(waiting, proposal, num_experts)  # num_experts: "not proposing"
        order = torch.argsort(best_score.masked_fill(~waiting, float("-inf")), descending=True, stable=True)
        order = order[torch.argsort(proposal[order], stable=True)]  # grouped by expert, best first
        grouped = proposal[order]
        starts = torch.searchsorted(grouped, grouped, right=False)
        rank = torch.arange(num_tokens, device=scores.device) - starts  # rank within its expert's proposals
        room_ext = torch.cat([room, room.new_zeros(1)])
        accept = rank < room_ext[grouped]
        assigned[order[accept]] = grouped[accept]
        room -= torch.bincount(grouped[accept], minlength=num_experts + 1)[:num_experts]
    return assigned


class BalancedAssignmentRouter(Router):
    """BASE layers: balanced top-1 assignment of the batch in training, greedy top-1 at inference."""

    uses_bias = False

    def select_experts(self, choice: torch.Tensor, routing_inputs: RoutingInputs | None) -> torch.Tensor:
        if self.training:
            mask = getattr(self, "_token_mask", None)
            return apply_replay(balanced_assignment(choice, mask).unsqueeze(-1), routing_inputs)
        return super().select_experts(choice, routing_inputs)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
        routing_inputs: RoutingInputs | None = None,
    ) -> RouterOutput:
        self._token_mask = token_mask  # padding takes no room in the assignment
        try:
            return super().forward(hidden_states, token_mask, routing_inputs)
        finally:
            self._token_mask = None


ROUTER_CLASSES: dict[str, type[Router]] = {
    "learned": Router, "hash": HashRouter, "expert_choice": ExpertChoiceRouter,
    "balanced_assignment": BalancedAssignmentRouter,
}


def build_router(config: MoEConfig) -> Router:
    """The router `config.router_type` names."""
    return ROUTER_CLASSES[config.router_type](config)
