"""Auxiliary training objectives of MoE routers, computed from what each router decided.

Notation: N routed experts, K chosen per token, T (valid) tokens, s the affinities (softmax or sigmoid),
s' = s / sum_j s_j (a no-op for softmax). Each loss is computed per MoE layer and summed over layers, as
DeepSeek-V2/V3 and Megatron-Core apply them. Padding tokens (attention_mask == 0) never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .configuration import MoEConfig
from .routing import RouterOutput


def affinities(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """s' (T, N): router affinities normalised to sum to 1 per token."""
    if scoring_func == "softmax":
        return logits.float().softmax(dim=-1)
    scores = logits.float().sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


def chosen_mask(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, K) ids -> (T, N) float indicator of the chosen experts."""
    return F.one_hot(topk_ids, num_experts).sum(dim=1).float()


def expert_balance_loss(probs: torch.Tensor, chosen: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V2 eq. 12-14 / Switch eq. 4: sum_i f_i P_i with f_i = N/(K T) * count_i, P_i = mean_t s'_i,t.
    Equals 1 for perfectly uniform routing; for K = 1 it is Switch's N * sum_i f_i P_i."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    f = chosen.sum(dim=0) * num_experts / (top_k * num_tokens)  # (N,)
    return (f * probs.mean(dim=0)).sum()


def device_balance_loss(probs: torch.Tensor, chosen: torch.Tensor, top_k: int, num_devices: int) -> torch.Tensor:
    """DeepSeek-V2 eq. 15-17: experts split into D equal groups; f'_d = mean of f_i in group d,
    P'_d = sum of P_i in group d; loss = sum_d f'_d P'_d."""
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    f = chosen.sum(dim=0) * num_experts / (top_k * num_tokens)  # (N,)
    f_device = f.view(num_devices, -1).mean(dim=-1)  # (D,)
    p_device = probs.mean(dim=0).view(num_devices, -1).sum(dim=-1)  # (D,)
    return (f_device * p_device).sum()


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


def moe_auxiliary_loss(
    routings: list[RouterOutput], attention_mask: torch.Tensor | None, batch_shape: tuple[int, int], config: MoEConfig
) -> torch.Tensor | None:
    """Weighted sum over MoE layers of every balance loss whose coefficient is non-zero; None if none is."""
    coefficients = (config.aux_loss_alpha, config.device_aux_loss_alpha, config.seq_aux_loss_alpha,
                    config.router_z_loss_coef)
    if not routings or not any(coefficients):
        return None
    batch, length = batch_shape
    valid = attention_mask[:, -length:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=routings[0].logits.device)
    flat_valid = valid.reshape(-1)
    top_k, num_experts = config.num_experts_per_tok, config.n_routed_experts
    total = routings[0].logits.new_zeros(())
    for routing in routings:
        logits = routing.logits  # (B*T, N)
        probs = affinities(logits, config.scoring_func)
        if config.aux_loss_alpha or config.device_aux_loss_alpha:
            p_valid, chosen_valid = probs[flat_valid], chosen_mask(routing.topk_ids[flat_valid], num_experts)
            if config.aux_loss_alpha:
                total = total + config.aux_loss_alpha * expert_balance_loss(p_valid, chosen_valid, top_k)
            if config.device_aux_loss_alpha:
                total = total + config.device_aux_loss_alpha * device_balance_loss(
                    p_valid, chosen_valid, top_k, config.aux_loss_num_devices)
        if config.seq_aux_loss_alpha:
            unbiased_ids = probs.detach().topk(top_k, dim=-1).indices  # TopK of the unbiased scores
            chosen = chosen_mask(unbiased_ids, num_experts).view(batch, length, num_experts)
            total = total + config.seq_aux_loss_alpha * sequence_balance_loss(
                probs.view(batch, length, num_experts), chosen, valid, top_k)
        if config.router_z_loss_coef:
            total = total + config.router_z_loss_coef * router_z_loss(logits[flat_valid])
    return total
