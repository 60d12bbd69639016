"""MiniMax-M2 (`minimax_m2`): GQA without biases, q/k RMSNorm over the whole projection (before RoPE), partial
rotary (`rotary_dim` in the released config.json, `partial_rotary_factor` in transformers'), every layer MoE: a
sigmoid router choosing the top-k of scores plus the balancing bias (no groups), renormalised, no shared
experts. Released checkpoints use Mixtral's naming (`block_sparse_moe.experts.{e}.w1/w3/w2`) and keep the bias
as `block_sparse_moe.e_score_correction_bias` (transformers: `mlp.e_score_correction_bias`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import Rule
from . import _shared as shared

_BIAS = "mlp.gate.e_score_correction_bias"
_LAYER = (
    shared.DENSE_DECODER_LAYER
    + tuple(r for r in shared.routed_experts("block_sparse_moe.", "w1", "w3", "w2") if r.ours != _BIAS)
    + (Rule(_BIAS, ("mlp.e_score_correction_bias",), layout="transformers"),
       Rule(_BIAS, ("block_sparse_moe.e_score_correction_bias",), layout="original"))
)  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=hf.head_dim, attention_bias=False,
        attention_out_bias=False, qk_norm="full", intermediate_size=hf.intermediate_size,
        moe_intermediate_size=hf.intermediate_size, n_routed_experts=hf.num_local_experts,
        num_experts_per_tok=hf.num_experts_per_tok, n_shared_experts=0, first_k_dense_replace=0, moe_layer_freq=1,
        scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, router_jitter_noise=hf.router_jitter_noise or 0.0,
        aux_loss_alpha=hf.router_aux_loss_coef or 0.0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size,
        num_local_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        router_jitter_noise=cfg.router_jitter_noise,
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="minimax_m2",
    layer=_LAYER,
    knobs=frozenset({"partial_rotary_factor"}),
    to_moe=_to_moe,
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), shared.MIXTURE, shared.qk_norm("full"), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
        shared.NO_SHARED_EXPERTS, *shared.EVERY_LAYER_MOE,
        Refusal("scoring_func", lambda c: c.scoring_func == "sigmoid", "but minimax_m2's router uses sigmoid"),
        Refusal("n_group", lambda c: c.n_group == 1, "but minimax_m2 has no group-limited routing"),
        Refusal("norm_topk_prob", lambda c: c.norm_topk_prob, "but minimax_m2 renormalises the top-k gate values"),
        Refusal("routed_scaling_factor", lambda c: c.routed_scaling_factor == 1,
                "but minimax_m2 does not scale gate values"),
        Refusal("attention_bias", lambda c: not c.attention_bias, "but minimax_m2 has no attention biases"),
        Refusal("attention_out_bias", lambda c: not c.attention_out_bias, "but minimax_m2 has no attention biases"),
    ),
    switch_loss=True,
)  # fmt: skip
