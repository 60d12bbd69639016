"""Solar Open (`solar_open`, Upstage): GLM-4.5's MoE block (DeepSeek-V3's router: sigmoid, balancing bias,
"noaux_tc" groups, shared experts) on every layer under Llama's attention with q/k/v biases (`attention_bias`,
o_proj without), optional partial rotary (`partial_rotary_factor` in `rope_parameters`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _attention as attn
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    # no dense layers: the unused dense width is the expert width
    router = attn.v3_router_fields(attn.Fields(dict(vars(hf), intermediate_size=hf.moe_intermediate_size,
                                                    first_k_dense_replace=0)))  # fmt: skip
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=attn.head_dim(hf),
        attention_bias=hf.attention_bias, attention_out_bias=False, **router,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = attn.v3_router_config(cfg)
    del fields["first_k_dense_replace"], fields["intermediate_size"]
    return dict(fields, num_key_value_heads=cfg.num_key_value_heads, attention_bias=cfg.attention_bias,
                head_dim=cfg.head_dim)  # fmt: skip


FAMILY = MoEFamily(
    model_type="solar_open",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts(bias=True) + shared.SHARED_EXPERTS,
    to_moe=_to_moe,
    import_refusals=shared.DEEPSEEK_IMPORT + (
        Refusal("rope_parameters", lambda hf: (hf.rope_parameters or {}).get("partial_rotary_factor", 1.0) == 1.0,
                "partial_rotary_factor < 1 does not run in transformers' solar_open (Llama's rotation)"),
    ),
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), *attn.V3_ROUTER, *shared.EVERY_LAYER_MOE, shared.qk_norm(None), shared.NO_CLIP_QKV,
        shared.NO_SLIDING_WINDOW, attn.NO_OUT_BIAS,
    ),
)  # fmt: skip
