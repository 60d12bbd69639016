"""K-EXAONE (`exaone_moe`, LG AI Research): EXAONE-4's attention (GQA without biases, per-head q/k RMSNorm
before RoPE) on sliding-window and full layers (`layer_types`, from `sliding_window_pattern`; a window is always set), RoPE
only on the sliding layers (the full layers are NoPE: `nope_layers`), DeepSeek-V3's router and shared
experts, dense/MoE layers listed per layer (`mlp_layer_types`). Released checkpoints keep the balancing bias as
`mlp.e_score_correction_bias` (transformers: `mlp.gate.e_score_correction_bias`); their MTP weights (`mtp.*`),
which transformers drops, are not converted."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import Rule
from . import _attention as attn
from . import _shared as shared

_BIAS = "mlp.gate.e_score_correction_bias"
_LAYER = (
    shared.DENSE_DECODER_LAYER
    + tuple(r for r in shared.routed_experts(bias=True) if r.ours != _BIAS)
    + (Rule(_BIAS, (_BIAS,), layout="transformers"), Rule(_BIAS, ("mlp.e_score_correction_bias",), layout="original"))
    + shared.SHARED_EXPERTS
)  # fmt: skip


def _nope_layers(layer_types: list[str]) -> list[int] | None:
    """EXAONE's rule with a sliding window (always set in ExaoneMoeConfig): only the sliding layers rotate."""
    return [i for i, kind in enumerate(layer_types) if kind != "sliding_attention"] or None


def _pattern(layer_types: list[str]) -> int | None:
    """The smallest `sliding_window_pattern` p giving these layer types (layer i full iff (i + 1) % p == 0)."""
    for p in range(1, len(layer_types) + 1):
        if layer_types == ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(len(layer_types))]:
            return p
    return None


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    router = attn.v3_router_fields(attn.Fields(dict(
        vars(hf), n_routed_experts=hf.num_experts, n_shared_experts=hf.num_shared_experts,
        first_k_dense_replace=attn.dense_first(hf))))  # fmt: skip
    types = attn.layer_types_fields(hf)
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=attn.head_dim(hf),
        attention_bias=False, attention_out_bias=False, qk_norm="head", **types,
        nope_layers=_nope_layers(types["layer_types"]), **router,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    fields = attn.v3_router_config(cfg)
    fields.pop("first_k_dense_replace")
    fields.update(
        attn.layer_types_config(cfg), num_experts=fields.pop("n_routed_experts"),
        num_shared_experts=fields.pop("n_shared_experts"), mlp_layer_types=attn.mlp_layer_types(cfg),
        num_key_value_heads=cfg.num_key_value_heads,
    )  # fmt: skip
    pattern = _pattern(fields["layer_types"])
    if pattern is not None:  # else layer_types alone says it
        fields["sliding_window_pattern"] = pattern
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.head_dim
    return fields


FAMILY = MoEFamily(
    model_type="exaone_moe",
    layer=_LAYER,
    knobs=frozenset({"layer_types", "nope_layers"}),
    to_moe=_to_moe,
    import_refusals=(
        Refusal("num_shared_experts", lambda hf: hf.num_shared_experts != 0,
                "transformers builds zero-width shared experts for it, which hf_moe does not store"),
    ),
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), *attn.V3_ROUTER, shared.qk_norm("head"), shared.NO_CLIP_QKV, attn.NO_CHUNKS,
        Refusal("attention_bias", lambda c: not c.attention_bias, "but exaone_moe has no attention biases"),
        attn.NO_OUT_BIAS,
        Refusal("sliding_window", lambda c: c.sliding_window is not None,
                "but exaone_moe always has a window (sliding layers rotate, full layers are NoPE)"),
        Refusal("nope_layers",
                lambda c: (c.nope_layers or None) == _nope_layers([c.layer_type(i) for i in range(c.num_hidden_layers)]),
                "but exaone_moe rotates exactly its sliding layers (its full layers are NoPE)"),
    ),
)  # fmt: skip
