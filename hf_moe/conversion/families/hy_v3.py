"""Hunyuan 3 (`hy_v3`, "HY-V3"): GQA with one `attention_bias` flag for q/k/v/o and per-head q/k RMSNorm before
RoPE, dense/MoE layers listed per layer (`mlp_layer_types`); a sigmoid router choosing the top-k of scores plus
the balancing bias (no groups), renormalised and scaled (`router_scaling_factor`), shared experts of
moe_intermediate_size. transformers keeps the bias beside the block (`mlp.e_score_correction_bias`); released
checkpoints name it `mlp.expert_bias`, the router `mlp.router.gate` and the shared experts `mlp.shared_mlp`.
(`enable_moe_fp32_combine` only changes low-precision rounding and is not kept.)"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import Rule
from . import _attention as attn
from . import _shared as shared

_BIAS = "mlp.gate.e_score_correction_bias"
_SHARED = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
_LAYER = (
    shared.DENSE_DECODER_LAYER
    + tuple(r for r in shared.routed_experts(bias=True) if r.ours not in (_BIAS, "mlp.gate.weight"))
    + (Rule(_BIAS, ("mlp.e_score_correction_bias",), layout="transformers"),
       Rule(_BIAS, ("mlp.expert_bias",), layout="original"),
       Rule("mlp.gate.weight", ("mlp.gate.weight",), layout="transformers"),
       Rule("mlp.gate.weight", ("mlp.router.gate.weight",), layout="original"))
    + tuple(Rule(f"mlp.shared_experts.{n}", (f"mlp.shared_experts.{n}",), layout="transformers") for n in _SHARED)
    + tuple(Rule(f"mlp.shared_experts.{n}", (f"mlp.shared_mlp.{n}",), layout="original") for n in _SHARED)
)  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
        attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias, qk_norm="head",
        intermediate_size=hf.intermediate_size, n_routed_experts=hf.num_experts,
        num_experts_per_tok=hf.num_experts_per_tok, moe_intermediate_size=hf.moe_intermediate_size,
        n_shared_experts=hf.num_shared_experts, first_k_dense_replace=attn.dense_first(hf), moe_layer_freq=1,
        scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=hf.router_scaling_factor,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, attention_bias=cfg.attention_bias,
        intermediate_size=cfg.intermediate_size, num_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        num_shared_experts=cfg.shared_intermediate_size // cfg.moe_intermediate_size,
        router_scaling_factor=cfg.routed_scaling_factor, mlp_layer_types=attn.mlp_layer_types(cfg),
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="hy_v3",
    layer=_LAYER,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("mlp_bias", lambda hf: not hf.mlp_bias, "hf_moe's dense and shared MLPs have no biases"),
        Refusal("num_shared_experts", lambda hf: hf.num_shared_experts != 0,
                "transformers builds zero-width shared experts for it, which hf_moe does not store"),
    ),
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), *attn.V3_ROUTER, shared.qk_norm("head"), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
        shared.ONE_ATTENTION_BIAS,
        Refusal("n_group", lambda c: c.n_group == 1, "but hy_v3 has no group-limited routing"),
        Refusal("norm_topk_prob", lambda c: c.norm_topk_prob, "but hy_v3 renormalises the top-k gate values"),
    ),
)  # fmt: skip
