"""FlexOlmo (`flex_olmo`, Ai2): OLMo 2's decoder layer (RMSNorm on each sub-layer's OUTPUT before the residual
add, `sublayer_norm="post"`; q/k RMSNorm over the whole projection before RoPE; one `attention_bias` flag for
q/k/v/o) with OLMoE's MoE block on every layer (softmax router, top-k optionally renormalised, no shared
experts)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import same
from . import _shared as shared

_LAYER = (
    same("", "post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
    + shared.GQA_ATTENTION + shared.routed_experts()
)  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), sublayer_norm="post", intermediate_size=hf.intermediate_size,
        moe_intermediate_size=hf.intermediate_size, first_k_dense_replace=0, moe_layer_freq=1,
        attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias, qk_norm="full",
        norm_topk_prob=hf.norm_topk_prob,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = shared.gqa_config(cfg)
    fields.pop("head_dim", None)  # FlexOlmo's config has no head_dim: hidden_size / heads
    return dict(fields, intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
                attention_bias=cfg.attention_bias, norm_topk_prob=shared.renormalised(cfg))  # fmt: skip


_NORM_SPANS_HIDDEN = "FlexOlmo's head size is hidden_size / num_attention_heads"

FAMILY = MoEFamily(
    model_type="flex_olmo",
    layer=_LAYER,
    knobs=frozenset({"sublayer_norm"}),
    to_moe=_to_moe,
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm("full"), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW, shared.NO_SHARED_EXPERTS,
        *shared.EVERY_LAYER_MOE, shared.ONE_ATTENTION_BIAS,
        Refusal("sublayer_norm", lambda c: c.sublayer_norm == "post", "but flex_olmo normalises sub-layer outputs"),
        Refusal("head_dim", lambda c: c.head_dim * c.num_attention_heads == c.hidden_size, f"but {_NORM_SPANS_HIDDEN}"),
    ),
    switch_loss=True,
)  # fmt: skip
