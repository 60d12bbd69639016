"""Ernie 4.5 MoE (ERNIE-4.5-21B-A3B, -300B-A47B): GQA with RoPE on interleaved pairs (`rope_pairs` rows), one
`use_bias` flag for q/k/v/o, the dense and shared FFNs and the head, a softmax router whose balancing bias
(`moe_statics.e_score_correction_bias`, shape (1, N)) steers the choice only, top-k renormalised with the floor
`moe_norm_min`, shared experts, and MoE layers every `moe_layer_interval` layers between `moe_layer_start_index`
and `moe_layer_end_index`. The released checkpoints name the experts `mlp.experts.{e}.gate_proj/up_proj/down_proj`
and the bias `mlp.moe_statics.e_score_correction_bias`. Its MTP layer is not converted (refused)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import CAUSAL_LM_GLOBALS, Rule, same
from . import _shared as shared

_BIAS = "mlp.gate.e_score_correction_bias"
_ROPE = tuple(Rule(f"self_attn.{p}.{n}", (f"self_attn.{p}.{n}",), "rope_pairs")
              for p in ("q_proj", "k_proj") for n in ("weight", "bias"))  # fmt: skip
_LAYER = (
    shared.NORMS + _ROPE + same("self_attn.", "v_proj.weight", "v_proj.bias", "o_proj.weight", "o_proj.bias")
    + same("mlp.", *(f"{p}.{n}" for p in ("gate_proj", "up_proj", "down_proj") for n in ("weight", "bias")))
    + same("mlp.shared_experts.", *(f"{p}.{n}" for p in ("gate_proj", "up_proj", "down_proj") for n in ("weight", "bias")))
    + shared.routed_experts(bias=False)[:-1]  # the router and experts; the bias row is Ernie's own
    + (Rule(_BIAS, ("mlp.gate.moe_statics.e_score_correction_bias",), "squeeze0", layout="transformers"),
       Rule(_BIAS, ("mlp.moe_statics.e_score_correction_bias",), "squeeze0", layout="original"))
)  # fmt: skip


def _head_dim(hf: PreTrainedConfig) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def _moe_layers(hf: PreTrainedConfig) -> list[int]:
    end = hf.moe_layer_end_index if hf.moe_layer_end_index >= 0 else hf.num_hidden_layers - 1
    return [i for i in range(hf.num_hidden_layers)
            if (i + 1) % hf.moe_layer_interval == 0 and hf.moe_layer_start_index <= i <= end]  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    moe, n = _moe_layers(hf), hf.num_hidden_layers
    bias = bool(hf.use_bias)
    pattern = (dict(first_k_dense_replace=moe[0], moe_layer_freq=hf.moe_layer_interval, last_k_dense_replace=n - 1 - moe[-1])
               if moe else dict(first_k_dense_replace=n, moe_layer_freq=1))  # fmt: skip
    return dict(
        shared.gqa_fields(hf), **pattern, intermediate_size=hf.intermediate_size,
        moe_intermediate_size=hf.moe_intermediate_size, n_shared_experts=hf.moe_num_shared_experts or 0,
        norm_topk_prob=True, norm_topk_min=hf.moe_norm_min, router_bias_update_rate=MoEConfig().router_bias_update_rate,
        attention_bias=bias, attention_out_bias=bias, mlp_bias=bias, lm_head_bias=bias,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    n, freq = cfg.num_hidden_layers, cfg.moe_layer_freq
    return dict(
        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, moe_num_experts=cfg.n_routed_experts,
        moe_k=cfg.num_experts_per_tok, moe_num_shared_experts=cfg.shared_intermediate_size // cfg.moe_intermediate_size,
        moe_layer_start_index=cfg.first_k_dense_replace, moe_layer_end_index=n - 1 - cfg.last_k_dense_replace,
        moe_layer_interval=freq, moe_norm_min=cfg.norm_topk_min, use_bias=cfg.attention_bias,
    )  # fmt: skip


def _one_bias(c: MoEConfig) -> bool:
    return c.attention_bias == c.attention_out_bias == c.mlp_bias == c.lm_head_bias


FAMILY = MoEFamily(
    model_type="ernie4_5_moe",
    globals=CAUSAL_LM_GLOBALS + same("", "lm_head.bias"),
    layer=_LAYER,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("num_mtp_layers", lambda hf: not getattr(hf, "num_mtp_layers", None),
                "hf_moe does not convert Ernie's MTP layer; set num_mtp_layers=0 (transformers ignores it too)"),
        Refusal("head_dim", lambda hf: _head_dim(hf) * hf.num_attention_heads == hf.hidden_size,
                "Ernie's head_dim is hidden_size / num_attention_heads"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.SOFTMAX_FIRST, shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
        Refusal("norm_topk_prob", lambda c: c.norm_topk_prob, "but ernie4_5_moe renormalises the top-k gate values"),
        Refusal("shared_expert_gate", lambda c: not c.shared_expert_gate, "but ernie4_5_moe has no shared-expert gate"),
        Refusal("shared_expert_intermediate_size", lambda c: c.shared_intermediate_size % c.moe_intermediate_size == 0,
                "but ernie4_5_moe's shared experts are moe_num_shared_experts experts of moe_intermediate_size"),
        Refusal("head_dim", lambda c: c.head_dim * c.num_attention_heads == c.hidden_size,
                "but ernie4_5_moe's head_dim is hidden_size / num_attention_heads"),
        Refusal("first_k_dense_replace", lambda c: (c.first_k_dense_replace + 1) % c.moe_layer_freq == 0,
                "but ernie4_5_moe's MoE layers are the layers i with (i + 1) % moe_layer_interval == 0 "
                "(first_k_dense_replace + 1 must be a multiple of moe_layer_freq)"),
        Refusal("mlp_bias", _one_bias, "but ernie4_5_moe has one use_bias flag for attention_bias, attention_out_bias, "
                "mlp_bias and lm_head_bias"),
    ),
    variants=frozenset({"mlp_bias", "lm_head_bias", "norm_topk_min", "last_k_dense_replace"}),
    switch_loss=True,
)  # fmt: skip
