"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (`glm4_moe`): DeepSeek-V3's router (sigmoid, balancing bias, group-limited
"noaux_tc" top-k, shared experts, dense first layers) under GQA attention with q/k/v biases (o_proj has none),
optional per-head q/k RMSNorm (`use_qk_norm`) and partial rotary (`partial_rotary_factor`, 0.5 in the released
models: the first half of each head rotates, half-split). Its MTP modules are stored as DeepSeek-V3's,
`model.layers.{N+k}.*`."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _attention as attn
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=attn.head_dim(hf),
        attention_bias=hf.attention_bias, attention_out_bias=False, qk_norm="head" if hf.use_qk_norm else None,
        num_nextn_predict_layers=getattr(hf, "num_mtp_layers", 0) or 0, **attn.v3_router_fields(hf),
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = dict(
        attn.v3_router_config(cfg), num_key_value_heads=cfg.num_key_value_heads, attention_bias=cfg.attention_bias,
        use_qk_norm=cfg.qk_norm == "head", num_mtp_layers=cfg.num_nextn_predict_layers,
        # explicit: Glm4MoeConfig would otherwise default a missing partial_rotary_factor to 0.5
        rope_parameters={"partial_rotary_factor": 1.0, **cfg.rope_parameters},
    )  # fmt: skip
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.head_dim
    return fields


FAMILY = MoEFamily(
    model_type="glm4_moe",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts(bias=True) + shared.SHARED_EXPERTS,
    mtp=shared.DEEPSEEK_MTP,
    knobs=frozenset({"partial_rotary_factor"}),
    to_moe=_to_moe,
    import_refusals=shared.DEEPSEEK_IMPORT,
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), *attn.V3_ROUTER, shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW, attn.NO_OUT_BIAS,
        Refusal("qk_norm", lambda c: c.qk_norm in (None, "head"), "but glm4_moe's q/k norm is per head"),
    ),
)  # fmt: skip
