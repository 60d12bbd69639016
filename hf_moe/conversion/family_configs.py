"""Config mapping between transformers' MoE families and MoEConfig, in both directions.

`config_to_moe` reads a family config the way transformers' modeling code uses it (the oracle), not by
field names alone; `config_from_moe` refuses, naming the field, what a family cannot express. The key
tables that move the weights live in `families`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from ..modeling.configuration import MoEConfig

logger = logging.getLogger(__name__)

FAMILIES = ("deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def check_family(family: str) -> str:
    """`family` if it is one of `FAMILIES`, else a ValueError listing them."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported: allowed values are {FAMILIES}.")
    return family


_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "output_router_logits",
)  # fmt: skip


def _common_to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    fields = {name: getattr(hf, name) for name in _COMMON_FIELDS if hasattr(hf, name)}
    fields["attention_dropout"] = getattr(hf, "attention_dropout", 0.0) or 0.0
    fields["rope_parameters"] = copy.deepcopy(dict(hf.rope_parameters))
    if getattr(hf, "dtype", None) is not None:
        fields["dtype"] = hf.dtype
    return fields


def _mla_to_moe(hf: PreTrainedConfig, rope_interleave: bool) -> dict[str, Any]:
    if hf.n_shared_experts == 0:
        raise ValueError(
            f"{hf.model_type} config n_shared_experts=0 is not supported: transformers builds zero-width shared "
            "experts for it, which hf_moe does not store."
        )
    return dict(
        attention_type="mla", q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_rope_head_dim=hf.qk_rope_head_dim, qk_nope_head_dim=hf.qk_nope_head_dim, v_head_dim=hf.v_head_dim,
        rope_interleave=rope_interleave, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
        intermediate_size=hf.intermediate_size, n_routed_experts=hf.n_routed_experts,
        num_experts_per_tok=hf.num_experts_per_tok, moe_intermediate_size=hf.moe_intermediate_size,
        n_shared_experts=hf.n_shared_experts, first_k_dense_replace=hf.first_k_dense_replace or 0,
        moe_layer_freq=1, routed_scaling_factor=hf.routed_scaling_factor, **_deepseek_losses(hf),
    )  # fmt: skip


def _deepseek_losses(hf: PreTrainedConfig) -> dict[str, float]:
    """DeepSeek's released config.json files carry `aux_loss_alpha` and `seq_aux` (its remote code's balance
    loss: sequence-wise when seq_aux); transformers' config classes keep them as extra attributes."""
    alpha = getattr(hf, "aux_loss_alpha", None)
    if not alpha:
        return {}
    return {"seq_aux_loss_alpha": alpha} if getattr(hf, "seq_aux", False) else {"aux_loss_alpha": alpha}


def _gqa_to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=head_dim,
        n_routed_experts=hf.num_experts if hasattr(hf, "num_experts") else hf.num_local_experts,
        num_experts_per_tok=hf.num_experts_per_tok, scoring_func="softmax", topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=0,
        # these families train with a Switch-style balance loss, not the bias
        router_bias_update_rate=0.0, aux_loss_alpha=getattr(hf, "router_aux_loss_coef", 0.0),
    )  # fmt: skip


def _moe_layer_pattern(hf: PreTrainedConfig) -> dict[str, int]:
    """Qwen's `decoder_sparse_step` / `mlp_only_layers` as first_k_dense_replace / moe_layer_freq."""
    n = hf.num_hidden_layers
    mlp_only = set(hf.mlp_only_layers or [])
    step = hf.decoder_sparse_step
    moe = [i for i in range(n) if i not in mlp_only and hf.num_experts > 0 and (i + 1) % step == 0]
    if not moe:
        return dict(first_k_dense_replace=n, moe_layer_freq=1)
    first = moe[0]
    freq = moe[1] - moe[0] if len(moe) > 1 else max(1, n - first)
    if moe != list(range(first, n, freq)):
        raise ValueError(
            f"{hf.model_type} config mlp_only_layers={sorted(mlp_only)} with decoder_sparse_step={step} gives MoE "
            f"layers {moe}; hf_moe places MoE layers as first_k_dense_replace + j * moe_layer_freq and cannot "
            "express this set."
        )
    return dict(first_k_dense_replace=first, moe_layer_freq=freq)


def _no_sliding_layers(hf: PreTrainedConfig) -> None:
    layer_types = getattr(hf, "layer_types", None) or []
    if getattr(hf, "use_sliding_window", False) and "sliding_attention" in layer_types:
        raise ValueError(
            f"{hf.model_type} config use_sliding_window=True is not supported: it applies the window to some "
            f"layers only (layer_types={layer_types}), hf_moe's sliding_window applies to every layer."
        )


def config_to_moe(hf_config: PreTrainedConfig) -> MoEConfig:
    """The MoEConfig of a transformers config of one of `FAMILIES` (by `model_type`).

    Fields a family does not have take hf_moe's defaults, except: families other than DeepSeek-V3 get
    router_bias_update_rate=0 (no bias balancing) and aux_loss_alpha from router_aux_loss_coef
    (`switch_coef_to_alpha`). The mapping
    follows what transformers' modeling code computes (the oracle), not the config's field names:
    DeepSeek-V2 gets norm_topk_prob=False (transformers' DeepseekV2TopkRouter never renormalises; its
    norm_topk_prob field is unused) and rope_interleave=True (it rotates (x0, x1), (x2, x3)... as complex
    numbers); Mixtral gets norm_topk_prob=True (softmax, top-k, renormalise == softmax of the top-k logits).
    Raises ValueError naming the field for what hf_moe cannot express.
    """
    family = hf_config.model_type
    check_family(family)
    fields = _common_to_moe(hf_config)
    if family == "deepseek_v3":
        fields.update(_mla_to_moe(hf_config, rope_interleave=bool(hf_config.rope_interleave)))
        fields.update(
            scoring_func="sigmoid", topk_method="noaux_tc", n_group=hf_config.n_group or 1,
            topk_group=hf_config.topk_group or 1, norm_topk_prob=bool(hf_config.norm_topk_prob),
            num_nextn_predict_layers=getattr(hf_config, "num_mtp_layers", 0) or 0,
        )  # fmt: skip
    elif family == "deepseek_v2":
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("deepseek_v2 config mlp_bias=True is not supported: hf_moe FFNs have no biases.")
        method = hf_config.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"deepseek_v2 config topk_method={method!r} is not supported: allowed values are "
                "('greedy', 'group_limited_greedy') (what transformers' DeepseekV2 router implements)."
            )
        if hf_config.norm_topk_prob:
            logger.warning(
                "deepseek_v2 config norm_topk_prob=True is ignored by transformers' DeepseekV2 router (it never "
                "renormalises the top-k weights); hf_moe follows transformers and uses norm_topk_prob=False."
            )
        grouped = method == "group_limited_greedy"
        # transformers' DeepseekV2 rotates (x0, x1), (x2, x3)... pairs as complex numbers: interleaved rope
        fields.update(_mla_to_moe(hf_config, rope_interleave=True))
        fields.update(
            scoring_func="softmax", topk_method=method, n_group=(hf_config.n_group or 1) if grouped else 1,
            topk_group=(hf_config.topk_group or 1) if grouped else 1, norm_topk_prob=False,
            router_bias_update_rate=0.0,
        )  # fmt: skip
    elif family == "mixtral":
        fields.update(_gqa_to_moe(hf_config))
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.intermediate_size,
            first_k_dense_replace=0, moe_layer_freq=1, norm_topk_prob=True, sliding_window=hf_config.sliding_window,
            router_jitter_noise=hf_config.router_jitter_noise or 0.0,
        )  # fmt: skip
    elif family == "qwen2_moe":
        _no_sliding_layers(hf_config)
        if hf_config.shared_expert_intermediate_size <= 0:
            raise ValueError(
                "qwen2_moe config shared_expert_intermediate_size must be positive: hf_moe does not store the "
                "zero-width shared expert transformers would build."
            )
        fields.update(_gqa_to_moe(hf_config))
        fields.update(_moe_layer_pattern(hf_config))
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.moe_intermediate_size,
            attention_bias=hf_config.qkv_bias, attention_out_bias=False, n_shared_experts=1,
            shared_expert_intermediate_size=hf_config.shared_expert_intermediate_size, shared_expert_gate=True,
            norm_topk_prob=hf_config.norm_topk_prob,
        )  # fmt: skip
    elif family == "qwen3_moe":
        fields.update(_gqa_to_moe(hf_config))
        fields.update(_moe_layer_pattern(hf_config))
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.moe_intermediate_size,
            attention_bias=hf_config.attention_bias, attention_out_bias=hf_config.attention_bias, qk_norm="head",
            sliding_window=hf_config.sliding_window if hf_config.use_sliding_window else None,
            norm_topk_prob=hf_config.norm_topk_prob,
        )  # fmt: skip
    else:  # olmoe
        fields.update(_gqa_to_moe(hf_config))
        if fields["head_dim"] * hf_config.num_attention_heads != hf_config.hidden_size:
            raise ValueError(
                f"olmoe config head_dim={fields['head_dim']} is not supported: OLMoE's q_norm spans hidden_size, "
                "so head_dim * num_attention_heads must equal hidden_size."
            )
        fields.update(
            intermediate_size=hf_config.intermediate_size, moe_intermediate_size=hf_config.intermediate_size,
            first_k_dense_replace=0, moe_layer_freq=1, attention_bias=hf_config.attention_bias,
            attention_out_bias=hf_config.attention_bias, qk_norm="full", clip_qkv=hf_config.clip_qkv,
            norm_topk_prob=hf_config.norm_topk_prob,
        )  # fmt: skip
    config = MoEConfig(**fields)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        config.aux_loss_alpha = switch_coef_to_alpha(config.aux_loss_alpha, config)
    return config


def switch_coef_to_alpha(coef: float, cfg: MoEConfig) -> float:
    """transformers' Switch-style loss (Mixtral/Qwen/OLMoE) is N * sum_i (count_i / T) P_i over all layers'
    tokens pooled, i.e. about K times our per-layer expert-level loss averaged over layers; ours is summed
    over MoE layers. alpha = coef * K / L keeps the same strength (exact when layers route alike)."""
    return coef * cfg.num_experts_per_tok / max(1, len(cfg.moe_layer_indices))


def alpha_to_switch_coef(alpha: float, cfg: MoEConfig) -> float:
    """Inverse of `switch_coef_to_alpha`."""
    return alpha * max(1, len(cfg.moe_layer_indices)) / cfg.num_experts_per_tok


def _refuse(family: str, cfg: MoEConfig, name: str, why: str) -> ValueError:
    return ValueError(f"Cannot export to {family}: MoEConfig.{name}={getattr(cfg, name)!r} {why}.")


def _export_checks(cfg: MoEConfig, family: str) -> None:
    """Refuse what `family` cannot express (inference semantics only; training knobs are dropped)."""

    def need(name: str, ok: bool, why: str) -> None:
        if not ok:
            raise _refuse(family, cfg, name, why)

    mla = family in ("deepseek_v2", "deepseek_v3")
    need("attention_type", cfg.attention_type == ("mla" if mla else "gqa"), f"but {family} uses {'mla' if mla else 'gqa'}")
    need("n_routed_experts", cfg.n_routed_experts > 0, f"but {family} is a mixture of experts")
    need("topk_before_softmax", not cfg.topk_before_softmax or family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
         f"but {family}'s router takes softmax over all experts first")  # fmt: skip
    if family != "deepseek_v3":
        need("num_nextn_predict_layers", cfg.num_nextn_predict_layers == 0, f"but {family} has no MTP modules")
    if family == "deepseek_v3":
        need("scoring_func", cfg.scoring_func == "sigmoid", "but deepseek_v3's router uses sigmoid")
        need("topk_method", cfg.topk_method == "noaux_tc" or cfg.n_group == 1,
             "but deepseek_v3 scores groups by the sum of their top-2 biased scores ('noaux_tc')")  # fmt: skip
    elif family == "deepseek_v2":
        need("scoring_func", cfg.scoring_func == "softmax", "but deepseek_v2's router uses softmax")
        need("topk_method", cfg.topk_method == "group_limited_greedy" or cfg.n_group == 1,
             "but deepseek_v2 scores groups by their max score ('group_limited_greedy')")  # fmt: skip
        need("norm_topk_prob", not cfg.norm_topk_prob, "but transformers' deepseek_v2 never renormalises gate values")
        need("rope_interleave", cfg.rope_interleave, "but deepseek_v2 rotates interleaved pairs")
    else:
        need("scoring_func", cfg.scoring_func == "softmax", f"but {family}'s router uses softmax")
        need("n_group", cfg.n_group == 1, f"but {family} has no group-limited routing")
        need("routed_scaling_factor", cfg.routed_scaling_factor == 1, f"but {family} does not scale gate values")
    if family in ("deepseek_v2", "deepseek_v3"):
        need("attention_out_bias", cfg.attention_out_bias == cfg.attention_bias,
             f"but {family} has one attention_bias flag for q_a/kv_a and o_proj")  # fmt: skip
        need("moe_layer_freq", cfg.moe_layer_freq == 1, f"but {family} makes every layer after the dense ones MoE")
        need("shared_expert_gate", not cfg.shared_expert_gate, f"but {family} has no shared-expert gate")
        need("shared_expert_intermediate_size",
             cfg.shared_intermediate_size > 0 and cfg.shared_intermediate_size % cfg.moe_intermediate_size == 0,
             f"but {family}'s shared experts are n_shared_experts > 0 experts of moe_intermediate_size")  # fmt: skip
        return
    need("qk_norm", cfg.qk_norm == {"qwen3_moe": "head", "olmoe": "full"}.get(family),
         f"but {family} has qk_norm {({'qwen3_moe': 'head', 'olmoe': 'full'}.get(family))!r}")  # fmt: skip
    need("clip_qkv", cfg.clip_qkv is None or family == "olmoe", f"but {family} does not clip q/k/v")
    need("sliding_window", cfg.sliding_window is None or family in ("mixtral", "qwen3_moe"),
         f"but {family} has no sliding window on every layer")  # fmt: skip
    if family in ("mixtral", "qwen3_moe", "olmoe"):
        need("shared_intermediate_size", cfg.shared_intermediate_size == 0, f"but {family} has no shared experts")
    if family in ("mixtral", "olmoe"):
        need("first_k_dense_replace", cfg.first_k_dense_replace == 0, f"but every {family} layer is MoE")
        need("moe_layer_freq", cfg.moe_layer_freq == 1, f"but every {family} layer is MoE")
    if family == "mixtral":
        need("norm_topk_prob", cfg.norm_topk_prob or cfg.topk_before_softmax,
             "but mixtral renormalises the top-k gate values")  # fmt: skip
        need("attention_bias", not cfg.attention_bias, "but mixtral has no attention biases")
        need("attention_out_bias", not cfg.attention_out_bias, "but mixtral has no attention biases")
    if family == "qwen2_moe":
        need("shared_expert_gate", cfg.shared_expert_gate and cfg.shared_intermediate_size > 0,
             "but qwen2_moe always has one shared expert scaled by a sigmoid gate")  # fmt: skip
        need("attention_out_bias", not cfg.attention_out_bias, "but qwen2_moe's o_proj has no bias")
    if family in ("qwen3_moe", "olmoe"):
        need("attention_out_bias", cfg.attention_out_bias == cfg.attention_bias,
             f"but {family} has one attention_bias flag for q/k/v and o_proj")  # fmt: skip
    if family == "olmoe":
        need("head_dim", cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size,
             "but OLMoE's q_norm spans hidden_size (head_dim * num_attention_heads must equal hidden_size)")  # fmt: skip


def _common_from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = {name: getattr(cfg, name) for name in _COMMON_FIELDS}
    fields.update(attention_dropout=cfg.attention_dropout, rope_parameters=copy.deepcopy(dict(cfg.rope_parameters)))
    if getattr(cfg, "dtype", None) is not None:
        fields["dtype"] = cfg.dtype
    return fields


def config_from_moe(moe_config: MoEConfig, family: str) -> PreTrainedConfig:
    """The transformers config of `family` for `moe_config`; raises ValueError naming the field the family
    cannot express. Training-only knobs (bias update rate, balance/z-losses, capacity, noise, MTP loss
    weight) are dropped, except router_aux_loss_coef (from aux_loss_alpha) and Mixtral's router_jitter_noise."""
    check_family(family)
    cfg = moe_config
    _export_checks(cfg, family)
    fields = _common_from_moe(cfg)
    experts = dict(num_experts_per_tok=cfg.num_experts_per_tok)
    if family in ("deepseek_v2", "deepseek_v3"):
        fields.update(
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
            qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
            num_key_value_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
            n_routed_experts=cfg.n_routed_experts, moe_intermediate_size=cfg.moe_intermediate_size,
            n_shared_experts=cfg.shared_intermediate_size // cfg.moe_intermediate_size,
            first_k_dense_replace=cfg.first_k_dense_replace, routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group, topk_group=cfg.topk_group, **experts,
        )  # fmt: skip
        if family == "deepseek_v3":
            fields.update(
                norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
                num_mtp_layers=cfg.num_nextn_predict_layers,
            )  # fmt: skip
        else:
            fields.update(topk_method="greedy" if cfg.n_group == 1 else "group_limited_greedy", norm_topk_prob=False)
        return AutoConfig.for_model(family, **fields)
    fields.update(num_key_value_heads=cfg.num_key_value_heads, router_aux_loss_coef=alpha_to_switch_coef(cfg.aux_loss_alpha, cfg), **experts)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.head_dim
    norm = cfg.norm_topk_prob or cfg.topk_before_softmax  # the two are the same function of the logits
    if family == "mixtral":
        fields.update(
            intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_routed_experts,
            sliding_window=cfg.sliding_window, router_jitter_noise=cfg.router_jitter_noise,
        )  # fmt: skip
    elif family in ("qwen2_moe", "qwen3_moe"):
        freq, first = cfg.moe_layer_freq, cfg.first_k_dense_replace
        step = freq if (first + 1) % freq == 0 else 1
        mlp_only = [i for i in range(cfg.num_hidden_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i)]
        fields.update(
            intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
            num_experts=cfg.n_routed_experts, decoder_sparse_step=step, mlp_only_layers=mlp_only,
            norm_topk_prob=norm,
        )  # fmt: skip
        if family == "qwen2_moe":
            fields.update(qkv_bias=cfg.attention_bias, shared_expert_intermediate_size=cfg.shared_intermediate_size)
        else:
            fields.update(
                attention_bias=cfg.attention_bias, use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window,
            )  # fmt: skip
    else:  # olmoe
        fields.pop("head_dim", None)
        fields.update(
            intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
            attention_bias=cfg.attention_bias, clip_qkv=cfg.clip_qkv, norm_topk_prob=norm,
        )  # fmt: skip
    return AutoConfig.for_model(family, **fields)


__all__ = [
    "FAMILIES",
    "alpha_to_switch_coef",
    "check_family",
    "config_from_moe",
    "config_to_moe",
    "switch_coef_to_alpha",
]
