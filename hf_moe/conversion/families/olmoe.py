"""OLMoE: GQA with q/k RMSNorm over the whole projection (`qk_norm="full"`) and optional `clip_qkv`, a softmax
router, every layer MoE, no shared experts."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _shared as shared

_NORM_SPANS_HIDDEN = "OLMoE's q_norm spans hidden_size, so head_dim * num_attention_heads must equal hidden_size"


def _head_dim(hf: PreTrainedConfig) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), intermediate_size=hf.intermediate_size, moe_intermediate_size=hf.intermediate_size,
        first_k_dense_replace=0, moe_layer_freq=1, attention_bias=hf.attention_bias,
        attention_out_bias=hf.attention_bias, qk_norm="full", clip_qkv=hf.clip_qkv, norm_topk_prob=hf.norm_topk_prob,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = shared.gqa_config(cfg)
    fields.pop("head_dim", None)  # OLMoE's config has no head_dim: hidden_size / heads
    return dict(
        fields, intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
        attention_bias=cfg.attention_bias, clip_qkv=cfg.clip_qkv, norm_topk_prob=shared.renormalised(cfg),
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="olmoe",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts(),
    to_moe=_to_moe,
    import_refusals=(
        Refusal("head_dim", lambda hf: _head_dim(hf) * hf.num_attention_heads == hf.hidden_size, _NORM_SPANS_HIDDEN),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm("full"), shared.NO_SLIDING_WINDOW, shared.NO_SHARED_EXPERTS, *shared.EVERY_LAYER_MOE,
        shared.ONE_ATTENTION_BIAS,
        Refusal("head_dim", lambda c: c.head_dim * c.num_attention_heads == c.hidden_size, f"but {_NORM_SPANS_HIDDEN}"),
    ),
    switch_loss=True,
)  # fmt: skip
