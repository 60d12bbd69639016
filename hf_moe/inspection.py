"""Parameter counts of an hf_moe model: total, active per token, and a breakdown by part.

The count comes from the model itself, built on the meta device (no memory is allocated), so it always
agrees with what `MoEForCausalLM` creates. "Active" is the total minus, in every routed-expert tensor, the
share of the experts a token does not use ((E - K) / E of it). Multi-token-prediction modules are reported
separately and left out of the headline total, as published counts do (DeepSeek-V3's 671B excludes its MTP
module). Parts are those of `hf_moe.training.parts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .modeling.configuration import MoEConfig
from .modeling.model import MoEForCausalLM
from .training.parts import PARTS, parameter_parts


@dataclass
class ParameterCount:
    """Parameters of a model: headline `total`/`active` (without MTP) and the per-part numbers behind them.

    `parts[name]` / `active_parts[name]` hold every part of `PARTS`; they differ only for "routed_experts"
    and "mtp" (whose block has routed experts too).
    """

    total: int
    active: int
    parts: dict[str, int] = field(default_factory=dict)
    active_parts: dict[str, int] = field(default_factory=dict)

    @property
    def mtp(self) -> int:
        """Parameters of the MTP modules (embedding and output head are shared, so not counted again)."""
        return self.parts.get("mtp", 0)

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    @property
    def active_with_mtp(self) -> int:
        return self.active + self.active_parts.get("mtp", 0)


def _meta_model(config: MoEConfig) -> nn.Module:
    """The full model on the meta device: right shapes, no storage."""
    with torch.device("meta"):
        return MoEForCausalLM(config)


def count_parameters(config_or_model: MoEConfig | nn.Module) -> ParameterCount:
    """Count total and active parameters of a config (built on the meta device) or of a built model."""
    if isinstance(config_or_model, MoEConfig):
        config, model = config_or_model, _meta_model(config_or_model)
    else:
        config, model = config_or_model.config, config_or_model
    n_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    part_of = parameter_parts(model)  # the classification the recipes use

    parts = dict.fromkeys(PARTS, 0)
    active_parts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():  # tied weights are listed once
        part, numel = part_of[name], param.numel()
        # each routed-expert tensor is [E, ...]: a token uses K of the E slices
        active = numel * top_k // n_experts if part == "routed_experts" else numel
        bucket = "mtp" if name.startswith("mtp.") else part  # the MTP modules are reported as one
        parts[bucket] += numel
        active_parts[bucket] += active
    total = sum(n for part, n in parts.items() if part != "mtp")
    active = sum(n for part, n in active_parts.items() if part != "mtp")
    return ParameterCount(total=total, active=active, parts=parts, active_parts=active_parts)


def human_count(n: int | float) -> str:
    """1234567890 -> '1.23B', 12345678 -> '12.35M' (K and plain numbers below a million)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def attention_summary(config: MoEConfig) -> str:
    """One line describing the attention (MLA ranks and head dims, or GQA heads and options)."""
    if config.attention_type == "mla":
        q = "direct q" if config.q_lora_rank is None else f"q_lora_rank {config.q_lora_rank}"
        return (f"MLA, {config.num_attention_heads} heads, kv_lora_rank {config.kv_lora_rank}, {q}, "
                f"qk {config.qk_nope_head_dim}+{config.qk_rope_head_dim} (nope+rope), v {config.v_head_dim}")
    kind = "MHA" if config.num_key_value_heads == config.num_attention_heads else "GQA"
    extras = [f"qk_norm {config.qk_norm}"] if config.qk_norm else []
    if config.attention_bias:
        extras.append("qkv bias")
    if config.sliding_window:
        extras.append(f"sliding window {config.sliding_window}")
    return (f"{kind}, {config.num_attention_heads} heads, {config.num_key_value_heads} kv heads, head_dim "
            f"{config.head_dim}" + "".join(f", {e}" for e in extras))


def routing_summary(config: MoEConfig) -> str:
    """One line describing experts and routing (scores, groups, normalisation, scaling, shared experts)."""
    if config.n_routed_experts == 0:
        return "dense (no routed experts)"
    scoring = config.scoring_func + (" over top-k logits" if config.topk_before_softmax else "")
    text = (f"{config.n_routed_experts} routed experts of {config.moe_intermediate_size}, top-{config.num_experts_per_tok}, "
            f"{scoring}, {config.topk_method}")
    if config.n_group > 1:
        text += f", {config.n_group} groups (keep {config.topk_group})"
    if config.norm_topk_prob:
        text += ", renormalised"
    if config.routed_scaling_factor != 1:
        text += f", scaling {config.routed_scaling_factor:g}"
    if config.capacity_factor is not None:
        text += f", capacity factor {config.capacity_factor:g}"
    if config.shared_intermediate_size:
        gated = " gated" if config.shared_expert_gate else ""
        text += f"; {config.n_shared_experts}{gated} shared ({config.shared_intermediate_size} wide)"
    else:
        text += "; no shared experts"
    return text


def format_parameter_report(count: ParameterCount, config: MoEConfig) -> str:
    """A readable table of the count (parts x total/active) followed by a routing/attention/layer summary."""
    rows = [(part, count.parts[part], count.active_parts[part]) for part in PARTS if part not in ("mtp", "lora", "other")]
    rows += [(part, count.parts[part], count.active_parts[part]) for part in ("lora", "other") if count.parts.get(part)]
    width = 24
    lines = [f"{'part':<{width}}{'total':>10}{'active':>10}", "-" * (width + 20)]
    lines += [f"{part:<{width}}{human_count(total):>10}{human_count(active):>10}" for part, total, active in rows]
    lines.append("-" * (width + 20))
    lines.append(f"{'total (without MTP)':<{width}}{human_count(count.total):>10}{human_count(count.active):>10}")
    if config.num_nextn_predict_layers:
        lines.append(f"{'mtp (not in total)':<{width}}{human_count(count.parts['mtp']):>10}"
                     f"{human_count(count.active_parts['mtp']):>10}")
        lines.append(f"{'total with MTP':<{width}}{human_count(count.total_with_mtp):>10}"
                     f"{human_count(count.active_with_mtp):>10}")
    n_moe = len(config.moe_layer_indices)
    lines += [
        "",
        f"routing:   {routing_summary(config)}",
        f"attention: {attention_summary(config)}",
        f"layers:    {config.num_hidden_layers} ({config.num_hidden_layers - n_moe} dense, {n_moe} MoE), hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}" + (", tied embeddings" if config.tie_word_embeddings else ""),
        f"mtp depth: {config.num_nextn_predict_layers}",
    ]
    return "\n".join(lines)


__all__ = ["PARTS", "ParameterCount", "count_parameters", "format_parameter_report"]
