"""The training loss of an hf_moe model, in one place: `total_loss` adds the next-token loss, the
multi-token-prediction loss and the routers' balance terms, and returns the total with its named parts.

    loss = L_LM + L_MTP + share * aux,   aux = sum over MoE layers (main and MTP blocks) of
           aux_loss_alpha * L_expert + device_aux_loss_alpha * L_device + seq_aux_loss_alpha * L_seq
           + comm_balance_alpha * L_comm + router_z_loss_coef * L_z

`MoEModel.forward` sums its own layers' balance terms into its `aux_loss` (`moe_auxiliary_loss`);
`MoEForCausalLM.forward` hands that, its LM and MTP losses and the MTP blocks' routings to `total_loss`.
To add a balancing loss: a function below, a coefficient in MoEConfig (named in `balance_coefficients`) and
one line in `balance_terms`.

Notation: N routed experts, K chosen per token, T (valid) tokens, s the affinities (softmax or sigmoid),
s' = s / sum_j s_j (a no-op for softmax). Each loss is computed per MoE layer and summed over layers, as
DeepSeek-V2/V3 and Megatron-Core apply them. Padding tokens (attention_mask == 0) never count.

Scope of the frequencies f (`config.balance_loss_scope`, Qiu et al. 2025, arXiv 2501.11873): "micro_batch"
counts f over this forward's tokens; "global_batch" sums the counts over data-parallel ranks (ONE all_reduce
of every layer's counts per training forward) and over the micro-batches of the optimizer step so far (each
router's `balance_counts` buffer, zeroed by `hf_moe.training.update_router_biases` once per step, or
`reset_balance_counts`). The k-th micro-batch of a step thus sees the counts of micro-batches 1..k (as
Megatron-Core's global aux loss does): the last one's f is the step's global f. P stays local and carries the
gradient. Eval forwards (no grad) use their own counts and leave the buffers alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from .configuration import MoEConfig
from .kernel_hooks import run_kernel
from .routing import RouterOutput, inside_backward, valid_tokens

IGNORE_INDEX = -100  # label of a position that is not a target (transformers' convention)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: object) -> torch.Tensor:
    """The LM loss: transformers' ForCausalLMLoss; the "causal_lm_loss" kernel takes the calls it is eligible for."""
    loss = run_kernel("causal_lm_loss", logits, labels, vocab_size, **kwargs)
    return ForCausalLMLoss(logits, labels, vocab_size, **kwargs) if loss is None else loss


def affinities(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """s' (T, N): router affinities normalised to sum to 1 per token."""
    if scoring_func == "softmax":
        return logits.float().softmax(dim=-1)
    scores = logits.float().sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


def chosen_mask(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, K) ids -> (T, N) float indicator of the chosen experts."""
    return F.one_hot(topk_ids, num_experts).sum(dim=1).float()


def expert_frequency(counts: torch.Tensor, num_tokens: torch.Tensor | int, top_k: int) -> torch.Tensor:
    """f_i = N/(K T) * count_i (DeepSeek-V2 eq. 13), counts (N,) over T tokens (of this batch or the global one)."""
    return counts * counts.shape[-1] / (top_k * torch.as_tensor(num_tokens, dtype=torch.float32).clamp(min=1))


def expert_balance_loss(
    probs: torch.Tensor, chosen: torch.Tensor, top_k: int, frequency: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V2 eq. 12-14 / Switch eq. 4: sum_i f_i P_i with f_i = N/(K T) * count_i, P_i = mean_t s'_i,t.
    Equals 1 for perfectly uniform routing; for K = 1 it is Switch's N * sum_i f_i P_i. `frequency`: f given
    (the global batch's), else counted from `chosen`."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    f = expert_frequency(chosen.sum(dim=0), num_tokens, top_k) if frequency is None else frequency  # (N,)
    return (f * probs.mean(dim=0)).sum()


def device_balance_loss(
    probs: torch.Tensor, chosen: torch.Tensor, top_k: int, num_devices: int, frequency: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V2 eq. 15-17: experts split into D equal groups; f'_d = mean of f_i in group d,
    P'_d = sum of P_i in group d; loss = sum_d f'_d P'_d."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    f = expert_frequency(chosen.sum(dim=0), num_tokens, top_k) if frequency is None else frequency  # (N,)
    f_device = f.view(num_devices, -1).mean(dim=-1)  # (D,)
    p_device = probs.mean(dim=0).view(num_devices, -1).sum(dim=-1)  # (D,)
    return (f_device * p_device).sum()


def device_token_counts(topk_ids: torch.Tensor, num_experts: int, num_devices: int) -> torch.Tensor:
    """(T, K) expert ids -> (D,) number of tokens sent to each device (a token counts once per device it
    reaches, however many of the device's experts it uses); experts split into D equal consecutive groups."""
    devices = topk_ids // (num_experts // num_devices)  # (T, K)
    reached = F.one_hot(devices, num_devices).amax(dim=1)  # (T, D)
    return reached.sum(dim=0).float()


def communication_balance_loss(
    probs: torch.Tensor, device_counts: torch.Tensor, num_tokens: torch.Tensor | int, devices_per_token: int,
) -> torch.Tensor:
    """DeepSeek-V2 eqs. 29-31: sum_d f''_d P''_d with f''_d = D/(M T) * #{tokens sent to device d} and
    P''_d = sum of P_i over device d's experts (P_i = mean_t s'_i,t of these probs (T, N)); M = devices per token
    (`topk_group` of device-limited routing). Equals 1 when every device receives the same number of tokens
    and holds the same probability mass."""
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    num_devices = device_counts.shape[0]
    f = device_counts * num_devices / (devices_per_token * torch.as_tensor(num_tokens, dtype=torch.float32).clamp(min=1))
    p_device = probs.mean(dim=0).view(num_devices, -1).sum(dim=-1)  # (D,)
    return (f * p_device).sum()


def sequence_balance_loss(probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V3 eqs. 17-20, per sequence then averaged: probs, chosen (B, T, N); valid (B, T) bool.
    f_i = N/(K T_b) * #{t: i in TopK(s_t)} with the unbiased scores; P_i = mean_t s'_i,t."""
    num_experts = probs.shape[-1]
    valid_f = valid.float().unsqueeze(-1)  # (B, T, 1)
    lengths = valid_f.sum(dim=1)  # (B, 1)
    has_tokens = lengths.squeeze(-1) > 0
    if not has_tokens.any():
        return probs.sum() * 0.0
    lengths = lengths.clamp(min=1)
    f = (chosen * valid_f).sum(dim=1) * num_experts / (top_k * lengths)  # (B, N)
    p = (probs * valid_f).sum(dim=1) / lengths  # (B, N)
    return (f * p).sum(dim=-1)[has_tokens].mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5: mean_t (log sum_i exp(x_i,t))^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def balance_coefficients(config: MoEConfig) -> tuple[float, ...]:
    """(aux_loss_alpha, device_aux_loss_alpha, seq_aux_loss_alpha, router_z_loss_coef, comm_balance_alpha): no
    balance loss is computed when all are zero."""
    return (config.aux_loss_alpha, config.device_aux_loss_alpha, config.seq_aux_loss_alpha, config.router_z_loss_coef,
            config.comm_balance_alpha)


def local_counts(routing: RouterOutput, flat_valid: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """[expert counts (N), device token counts (n_group), tokens] of one layer's real tokens: what the
    global-batch scope sums over ranks and micro-batches (the layout of `Router.balance_counts`)."""
    ids = routing.topk_ids[flat_valid]  # (T_valid, K)
    experts = torch.bincount(ids.reshape(-1), minlength=config.n_routed_experts).float()
    devices = device_token_counts(ids, config.n_routed_experts, config.n_group)
    return torch.cat([experts, devices, flat_valid.sum().float().view(1)])


def global_counts(
    routings: Sequence[RouterOutput], flat_valid: torch.Tensor, config: MoEConfig,
) -> list[torch.Tensor] | None:
    """balance_loss_scope="global_batch": every layer's counts of this forward summed over ranks (one all_reduce
    for all layers), added to each router's `balance_counts`; returns the buffers (the counts of the step so far).
    None in the micro-batch scope, and for forwards that do not train (eval, no grad, checkpoint recompute)."""
    if config.balance_loss_scope != "global_batch" or not torch.is_grad_enabled() or inside_backward():
        return None
    routers = [routing.router for routing in routings]
    if any(router is None or not router.training for router in routers):
        return None
    with torch.no_grad():
        counts = torch.stack([local_counts(routing, flat_valid, config) for routing in routings])  # (L, N+D+1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # the one collective of this forward
        for router, layer_counts in zip(routers, counts):
            router.balance_counts.add_(layer_counts.to(router.balance_counts.device))  # in place (Dynamo)
    return [router.balance_counts.clone() for router in routers]


def balance_terms(
    routing: RouterOutput, valid: torch.Tensor, config: MoEConfig, counts: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The weighted balance losses of one MoE layer whose coefficient is non-zero, in a fixed order (expert,
    device, sequence, communication, z). `routing` covers B*T tokens; `valid` (B, T) bool marks the real ones.
    `counts`: the global batch's [expert counts, device counts, tokens] (`global_counts`), else this batch's."""
    batch, length = valid.shape
    flat_valid = valid.reshape(-1)
    top_k, num_experts = config.num_experts_per_tok, config.n_routed_experts
    logits = routing.logits  # (B*T, N)
    probs = affinities(logits, config.scoring_func)
    frequency = None if counts is None else expert_frequency(counts[:num_experts], counts[-1], top_k)
    terms = []
    if config.aux_loss_alpha or config.device_aux_loss_alpha:
        p_valid, chosen_valid = probs[flat_valid], chosen_mask(routing.topk_ids[flat_valid], num_experts)
        if config.aux_loss_alpha:
            terms.append(config.aux_loss_alpha * expert_balance_loss(p_valid, chosen_valid, top_k, frequency))
        if config.device_aux_loss_alpha:
            terms.append(config.device_aux_loss_alpha * device_balance_loss(
                p_valid, chosen_valid, top_k, config.aux_loss_num_devices, frequency))
    if config.seq_aux_loss_alpha:
        unbiased_ids = probs.detach().topk(top_k, dim=-1).indices  # TopK of the unbiased scores
        chosen = chosen_mask(unbiased_ids, num_experts).view(batch, length, num_experts)
        terms.append(config.seq_aux_loss_alpha * sequence_balance_loss(
            probs.view(batch, length, num_experts), chosen, valid, top_k))
    if config.comm_balance_alpha:
        if counts is None:
            device_counts, tokens = device_token_counts(routing.topk_ids[flat_valid], num_experts, config.n_group), \
                flat_valid.sum()
        else:
            device_counts, tokens = counts[num_experts:-1], counts[-1]
        terms.append(config.comm_balance_alpha * communication_balance_loss(
            probs[flat_valid], device_counts, tokens, config.topk_group))
    if config.router_z_loss_coef:
        terms.append(config.router_z_loss_coef * router_z_loss(logits[flat_valid]))
    return terms


def moe_auxiliary_loss(
    routings: Sequence[RouterOutput], attention_mask: torch.Tensor | None, batch_shape: tuple[int, int],
    config: MoEConfig,
) -> torch.Tensor | None:
    """Sum over MoE layers of every balance loss whose coefficient is non-zero; None if none is. The routings
    cover `batch_shape` (B, T) tokens; `attention_mask` (2-D, or None: every token is real) marks the real ones."""
    if not routings or not any(balance_coefficients(config)):
        return None
    valid = valid_tokens(attention_mask, batch_shape[1])
    if valid is None:
        valid = torch.ones(batch_shape, dtype=torch.bool, device=routings[0].logits.device)
    total = routings[0].logits.new_zeros(())
    counts = global_counts(routings, valid.reshape(-1), config)
    for index, routing in enumerate(routings):
        for term in balance_terms(routing, valid, config, None if counts is None else counts[index]):
            total = total + term
    return total


def reset_balance_counts(routers: Sequence[torch.nn.Module]) -> None:
    """Zero the global-batch counts of these routers (start of an optimizer step)."""
    for router in routers:
        router.balance_counts.zero_()


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """Number of next-token targets in `labels` (B, T): positions 1.. that are not IGNORE_INDEX."""
    return labels[..., 1:].ne(IGNORE_INDEX).sum()


@dataclass
class LossParts:
    """The training loss and its named parts (each None when it does not apply)."""

    total: torch.Tensor | None  # what backward() gets: lm + mtp + share * aux (None without labels)
    lm: torch.Tensor | None  # next-token cross-entropy
    mtp: torch.Tensor | None  # multi-token prediction, already weighted by mtp_loss_weight
    aux: torch.Tensor | None  # balance terms summed over MoE layers, per batch (not scaled by the share)


def total_loss(
    config: MoEConfig,
    lm_loss: torch.Tensor | None,
    mtp_loss: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
    mtp_routings: Sequence[tuple[RouterOutput, torch.Tensor]] = (),
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> LossParts:
    """Assemble the loss. `aux_loss`: the main layers' balance loss (`MoEModel`'s); `mtp_routings`: (routing,
    valid (B, T) bool) of each MTP block, whose balance terms are added to it.

    Under the Trainer the LM and MTP losses are sums over this micro-batch / `num_items_in_batch` (the targets
    of all micro-batches and ranks), so the per-batch aux loss is weighted by this batch's share of them (counted
    in `shift_labels` when given: they are the targets, already shifted)."""
    if aux_loss is not None:  # the MTP blocks' routers balance too, over the positions that have inputs
        for routing, valid in mtp_routings:
            aux_loss = aux_loss + moe_auxiliary_loss([routing], valid, tuple(valid.shape), config)
    total = lm_loss
    if total is not None and mtp_loss is not None:
        total = total + mtp_loss
    if total is not None and aux_loss is not None:
        targets = None if num_items_in_batch is None else (
            target_count(labels) if shift_labels is None else shift_labels.ne(IGNORE_INDEX).sum())
        share = 1.0 if targets is None else targets / num_items_in_batch
        total = total + aux_loss * share
    return LossParts(total=total, lm=lm_loss, mtp=mtp_loss, aux=aux_loss)
