"""Qwen3-MoE: GQA with per-head q/k RMSNorm, a softmax router, MoE layers placed by `decoder_sparse_step` /
`mlp_only_layers`, no shared experts, an optional sliding window on every layer."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), **shared.qwen_layer_pattern(hf), intermediate_size=hf.intermediate_size,
        moe_intermediate_size=hf.moe_intermediate_size, attention_bias=hf.attention_bias,
        attention_out_bias=hf.attention_bias, qk_norm="head", norm_topk_prob=hf.norm_topk_prob,
        sliding_window=hf.sliding_window if hf.use_sliding_window else None,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_config(cfg), **shared.qwen_layer_config(cfg), attention_bias=cfg.attention_bias,
        use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="qwen3_moe",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts(),
    to_moe=_to_moe,
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm("head"), shared.NO_CLIP_QKV, shared.NO_SHARED_EXPERTS, shared.ONE_ATTENTION_BIAS,
    ),
    switch_loss=True,
)  # fmt: skip
