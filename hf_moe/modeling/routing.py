"""Router: token-to-expert affinities, (group-limited) top-k choice with a balancing bias, gate values.

DeepSeek-V3 §2.1 eqs. 12-16 (sigmoid, bias for choosing only), DeepSeek-V2 §2.2 (softmax, device-limited
groups), Mixtral (top-k of logits then softmax), Switch (jitter), Shazeer 2017 (noisy top-k); variants: a
learned bias on the logits (gpt-oss), p-norm renormalisation with a floor (DBRX, Ernie 4.5), SparseMixer's
masked-softmax choice (Phi-3.5-MoE, Liu et al. 2024, `sparsemixer`).
All router math runs in fp32; the bias and the per-expert counters are fp32 buffers that stay fp32 when
the model is cast (bf16 spacing near 1 is coarser than the bias step gamma = 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MoEConfig
from .routing_inputs import RoutingInputs, apply_replay

_FP32_BUFFERS = ("e_score_correction_bias", "tokens_per_expert", "balance_counts")


@dataclass
class RouterOutput:
    """What one router decided for T tokens."""

    logits: torch.Tensor  # (T, N) fp32, before any noise-free transform
    topk_ids: torch.Tensor  # (T, K) int64 expert ids
    topk_weights: torch.Tensor  # (T, K) fp32 gate values (dropped slots have weight 0)
    router: nn.Module | None = field(default=None, repr=False, compare=False)  # who decided (global-batch f)


# a pytree node, so that a model's outputs holding router decisions can leave torch.export / torch.compile graphs;
# `router` (a module, not data) is left out of the flattened node (None once unflattened)
torch.utils._pytree.register_dataclass(RouterOutput, field_names=["logits", "topk_ids", "topk_weights"],
                                       drop_field_names=["router"],
                                       serialized_type_name=f"{__name__}.RouterOutput")


def valid_tokens(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B, length) bool, True for the real (non-padding) tokens among the last `length` positions of a 2-D
    padding mask (B, past + length); None when there is no 2-D mask (every token is real). Padding is routed
    like any token but never counts: not as expert load, not in a balance loss, not as a target."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -length:].bool()


def inside_backward() -> bool:
    """True while autograd's engine runs a backward pass (e.g. the recompute of gradient checkpointing). False
    while torch.compile traces: the compiled forward runs once per step (recompute happens inside its graph)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class Router(nn.Module):
    """Scores tokens against N expert centroids and picks K experts per token.

    choose:  idx = TopK(s + b) within the best `topk_group` groups (b = e_score_correction_bias)
    gates:   g = s[idx] (unbiased), renormalised if `norm_topk_prob`, times `routed_scaling_factor`.
    In a training forward with grad enabled (not eval, not the checkpoint recompute) it adds the number of
    tokens chosen per expert to `tokens_per_expert`; `hf_moe.training` reads and zeroes it once per step.
    Other router types (hash, expert choice, balanced assignment) subclass it in `router_types.py`.
    """

    uses_bias = True  # the bias steers this router's choice (bias balancing applies)
    bias_frozen = False  # set by freeze_router_biases / the freeze-router recipe: update_router_biases skips it

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if config.router_bias else None  # on the logits
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        self.tokens_per_expert = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        # global-batch balance loss: [expert counts (N), device token counts (n_group), tokens] of the step so far
        self.balance_counts = nn.Buffer(torch.zeros(self.num_experts + self.n_group + 1, dtype=torch.float32),
                                        persistent=False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        """Keep the bias and counters fp32 through `.to(dtype)` / `.half()`; only their device follows."""
        kept = {name: getattr(self, name) for name in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = getattr(self, name)
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Affinities s (T, N): softmax over experts or element-wise sigmoid."""
        if self.config.scoring_func == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)

    def group_mask(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (T, N), True for experts in each token's `topk_group` best groups (DeepSeek-V3 node-limited
        routing: group score = sum of its top-2 biased scores; DeepSeek-V2: the group's max score)."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # (T, G, N/G)
        if self.config.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
        else:
            group_scores = grouped.amax(dim=-1)  # (T, G)
        best_groups = group_scores.topk(self.topk_group, dim=-1).indices  # (T, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        return keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice)

    def select_experts(self, choice: torch.Tensor, routing_inputs: RoutingInputs | None) -> torch.Tensor:
        """(T, N) biased, group-masked scores -> (T, K) expert ids: top-k, or the replayed ids where given."""
        return apply_replay(choice.topk(self.top_k, dim=-1).indices, routing_inputs)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
        routing_inputs: RoutingInputs | None = None,
    ) -> RouterOutput:
        """hidden_states (T, H) -> RouterOutput. `token_mask` (T,) bool marks real tokens: padding is routed
        like any token (its output is never used) but not counted as expert load. `routing_inputs`: token ids,
        replayed choices (`routing_inputs.py`)."""
        x = hidden_states.float()
        if self.training and self.config.router_jitter_noise > 0:
            eps = self.config.router_jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        logits = F.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())  # (T, N)
        noisy_logits = logits
        if self.training and self.config.router_logit_noise > 0:
            noisy_logits = logits + torch.randn_like(logits) * self.config.router_logit_noise
        if self.config.topk_method == "sparsemixer":
            if routing_inputs is not None and routing_inputs.replay_ids is not None:
                raise ValueError("replay_routing is not supported with topk_method='sparsemixer' (its gates depend "
                                 "on the choice it samples); replay needs a top-k router")
            topk_ids, topk_weights = sparsemixer(noisy_logits, self.config.sparsemixer_eps, self.training)
            return self._finish(logits, topk_ids, topk_weights, token_mask)
        scores = self.scores(noisy_logits)  # (T, N)

        with torch.no_grad():
            choice = scores + self.e_score_correction_bias  # used for choosing only
            if self.n_group > 1:
                choice = choice.masked_fill(~self.group_mask(choice), float("-inf"))
            topk_ids = self.select_experts(choice, routing_inputs)  # (T, K)

        if self.config.topk_before_softmax:  # Mixtral: softmax over the chosen logits
            topk_weights = noisy_logits.gather(1, topk_ids).softmax(dim=-1)
        else:
            topk_weights = scores.gather(1, topk_ids)  # (T, K)
            if self.config.norm_topk_prob:
                topk_weights = self.renormalise(topk_weights)
        topk_weights = topk_weights * self.config.routed_scaling_factor
        return self._finish(logits, topk_ids, topk_weights, token_mask)

    def renormalise(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """g / max(||g||_p, min): p = `norm_topk_p` (1: the sum; DBRX's p-norm), min = `norm_topk_min` (Ernie's
        moe_norm_min; the default 1e-20 is DeepSeek's `sum + 1e-20` for every sum above 1e-13)."""
        p = self.config.norm_topk_p
        norm = topk_weights.sum(dim=-1, keepdim=True) if p == 1 else topk_weights.norm(p=p, dim=-1, keepdim=True)
        return topk_weights / norm.clamp(min=self.config.norm_topk_min)

    def _finish(self, logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                token_mask: torch.Tensor | None) -> RouterOutput:  # fmt: skip
        """Capacity dropping and the training load counters, then the RouterOutput."""
        if self.config.capacity_factor is not None:
            topk_weights = drop_over_capacity(topk_ids, topk_weights, self.num_experts, self.config.capacity_factor,
                                              token_mask)
        if self.training and torch.is_grad_enabled() and not inside_backward():
            counted = topk_weights != 0 if self.config.capacity_factor is not None else torch.ones_like(topk_ids, dtype=torch.bool)
            if token_mask is not None:
                counted = counted & token_mask.view(-1, 1)
            # index_add of 0/1 rather than bincount of the selected ids: no data-dependent shape, no host sync
            self.tokens_per_expert.index_add_(0, topk_ids.reshape(-1), counted.reshape(-1).float())
        return RouterOutput(logits=logits, topk_ids=topk_ids, topk_weights=topk_weights, router=self)


class SparseMixerGate(torch.autograd.Function):
    """SparseMixer's gate in training (Liu et al. 2024 §3, Heun's third-order method, as Phi-3.5-MoE trains):
    forward g * scale (scale 1, or 1/3 for a sampled non-argmax choice with probability 3/4); backward to the
    logits only, through the softmax of the chosen expert: dL/ds = (dL/dy * g) (onehot(chosen) - p)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, gate: torch.Tensor, chosen: torch.Tensor, probs: torch.Tensor,  # noqa: ANN001
                scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(gate, chosen, probs)
        return gate * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # noqa: ANN001
        gate, chosen, probs = ctx.saved_tensors
        weighted = grad * gate  # (T, 1)
        return (-probs * weighted).scatter_add(-1, chosen, weighted), None, None, None, None


def sparsemixer(logits: torch.Tensor, eps: float, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's top-2 choice (Liu et al. 2024, as Phi-3.5-MoE runs it): the k-th choice is among the
    remaining experts close to the best one, (max - s) / max(|s|, max) <= 2 eps, its gate its softmax among them.
    logits (T, N) -> ids (T, 2), gates (T, 2).

    Inference takes the best candidate. Training samples it from that softmax (Gumbel-max) and runs the gate
    through `SparseMixerGate`; the random draws are taken in Phi-3.5-MoE's order (its second mask draws twice),
    so a seeded run reproduces its training forward and gradients."""
    ids, gates, remaining = [], [], logits
    for step in range(2):
        with torch.no_grad():
            best, best_id = remaining.max(dim=-1, keepdim=True)
            far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        candidates = remaining.masked_fill(far, float("-inf"))
        chosen = best_id
        if training:
            with torch.no_grad():
                noise = torch.empty_like(candidates).exponential_().log()
                chosen = (candidates - noise).max(dim=-1)[1].unsqueeze(-1)
        probs = candidates.softmax(dim=-1)
        gate = probs.gather(-1, chosen)
        if training:
            with torch.no_grad():
                draw = torch.rand_like(gate)
                if step == 1:
                    draw.uniform_()
                scale = torch.add(0.3333, (chosen == best_id) | (draw > 0.75), alpha=0.6667).type_as(probs)
            gate = SparseMixerGate.apply(logits, gate.detach(), chosen, probs.detach(), scale)
        ids.append(chosen)
        gates.append(gate)
        remaining = remaining.scatter(-1, chosen, float("-inf"))
    return torch.cat(ids, dim=-1), torch.cat(gates, dim=-1)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard/Switch capacity: ceil(capacity_factor * tokens * K / N) slots per expert."""
    return int(-(-capacity_factor * num_tokens * top_k // num_experts))


def drop_over_capacity(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity_factor: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero the gate of every slot beyond its expert's capacity. Priority: all first choices (in token order)
    before all second choices, and so on (GShard Algorithm 1). Returns the new (T, K) weights.

    `token_mask` (T,) bool marks real tokens: padding takes no slot and does not count in the capacity (so a real
    token's output does not depend on how much padding its batch has), and its own gates are zeroed."""
    num_tokens, top_k = topk_ids.shape
    slot_order = topk_ids.t().reshape(-1)  # (K*T,) k-major: every token's first choice first
    one_hot = F.one_hot(slot_order, num_experts)  # (K*T, N)
    if token_mask is None:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    else:  # a tensor: no host sync for the number of real tokens
        real = token_mask.reshape(1, num_tokens).expand(top_k, num_tokens).reshape(-1, 1)  # (K*T, 1)
        one_hot = one_hot * real
        real_tokens = token_mask.sum(dtype=torch.float64)  # expert_capacity's arithmetic, in a tensor
        capacity = (-capacity_factor * real_tokens * top_k).div(num_experts, rounding_mode="floor").neg()
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank of each slot within its expert (-1: padding)
    keep = (position < capacity) & (position >= 0) if token_mask is not None else position < capacity
    return topk_weights * keep.view(top_k, num_tokens).t()
