"""dots.llm1 (`dots1`, rednote-hilab): DeepSeek-V3's router (sigmoid, balancing bias, "noaux_tc" groups, shared
experts, dense first layers) under Qwen3's attention (GQA, per-head q/k RMSNorm before RoPE, one
`attention_bias` flag for q/k/v/o), with sliding-window layers chosen per layer (`layer_types`, from
`max_window_layers`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily
from . import _attention as attn
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=attn.head_dim(hf),
        attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias, qk_norm="head",
        **attn.layer_types_fields(hf), **attn.v3_router_fields(hf),
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = dict(attn.v3_router_config(cfg), **attn.layer_types_config(cfg), num_key_value_heads=cfg.num_key_value_heads,
                  attention_bias=cfg.attention_bias)  # fmt: skip
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.head_dim
    return fields


FAMILY = MoEFamily(
    model_type="dots1",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts(bias=True) + shared.SHARED_EXPERTS,
    knobs=frozenset({"layer_types"}),
    to_moe=_to_moe,
    import_refusals=shared.DEEPSEEK_IMPORT,
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), *attn.V3_ROUTER, shared.qk_norm("head"), shared.NO_CLIP_QKV,
        shared.ONE_ATTENTION_BIAS, attn.NO_CHUNKS,
    ),
)  # fmt: skip
