"""GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's MLA attention and router (sigmoid, balancing bias, "noaux_tc"
groups, shared experts) with dense/MoE layers listed per layer (`mlp_layer_types`). Its MTP modules are stored as
DeepSeek-V3's, `model.layers.{N+k}.*` (`num_nextn_predict_layers` in the released config.json)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _attention as attn
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    fields = dict(
        attention_type="mla", q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_rope_head_dim=hf.qk_rope_head_dim, qk_nope_head_dim=hf.qk_nope_head_dim, v_head_dim=hf.v_head_dim,
        rope_interleave=bool(hf.rope_interleave), attention_bias=hf.attention_bias,
        attention_out_bias=hf.attention_bias, num_nextn_predict_layers=getattr(hf, "num_nextn_predict_layers", 0) or 0,
    )  # fmt: skip
    hf_router = dict(vars(hf), first_k_dense_replace=attn.dense_first(hf))
    eps = None if hf.rms_norm_eps == shared.MLA_LATENT_EPS else shared.MLA_LATENT_EPS
    return dict(fields, latent_norm_eps=eps, **attn.v3_router_fields(attn.Fields(hf_router)))


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = dict(shared.mla_config(cfg), norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
                  mlp_layer_types=attn.mlp_layer_types(cfg))  # fmt: skip
    fields.pop("first_k_dense_replace")  # Glm4MoeLiteConfig places MoE layers by mlp_layer_types only
    if cfg.num_nextn_predict_layers:
        fields["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers
    return fields


FAMILY = MoEFamily(
    model_type="glm4_moe_lite",
    layer=shared.MLA_DECODER_LAYER + shared.routed_experts(bias=True) + shared.SHARED_EXPERTS,
    mtp=shared.DEEPSEEK_MTP,
    to_moe=_to_moe,
    import_refusals=shared.DEEPSEEK_IMPORT,
    from_moe=_from_moe,
    knobs=frozenset({"latent_norm_eps"}),
    export_refusals=shared.DEEPSEEK + (
        Refusal("scoring_func", lambda c: c.scoring_func == "sigmoid", "but glm4_moe_lite's router uses sigmoid"),
        Refusal("topk_method", lambda c: c.topk_method == "noaux_tc" or c.n_group == 1,
                "but glm4_moe_lite scores groups by the sum of their top-2 biased scores ('noaux_tc')"),
    ),
)  # fmt: skip
