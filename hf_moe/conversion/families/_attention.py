"""Pieces of the attention-side family records (glm4_moe, dots1, hunyuan_v1_moe, minimax_m2, exaone_moe, ...):
DeepSeek-V3's router under GQA attention, per-layer attention types, and their export refusals. A piece used by
one family stays in that family's file."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import Refusal, refuse_import
from ..tables import Rule
from . import _shared as shared


def head_dim(hf: PreTrainedConfig) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def layer_types_fields(hf: PreTrainedConfig) -> dict[str, Any]:
    """`layer_types` and `sliding_window` as the family config spells them (a window with no sliding layer is
    kept, so the config round-trips)."""
    return dict(layer_types=list(hf.layer_types[: hf.num_hidden_layers]), sliding_window=hf.sliding_window)


def layer_types_config(cfg: MoEConfig) -> dict[str, Any]:
    """The family's `layer_types` (explicit: every layer's type) and `sliding_window` of an MoEConfig."""
    return dict(layer_types=[cfg.layer_type(i) for i in range(cfg.num_hidden_layers)], sliding_window=cfg.sliding_window)


def v3_router_fields(hf: PreTrainedConfig) -> dict[str, Any]:
    """MoEConfig fields of a DeepSeek-V3 router and experts (sigmoid, balancing bias, "noaux_tc" groups, shared
    experts of moe_intermediate_size, dense first layers) as GLM-4.5 / dots.llm1 spell them."""
    return dict(
        intermediate_size=hf.intermediate_size, n_routed_experts=hf.n_routed_experts,
        num_experts_per_tok=hf.num_experts_per_tok, moe_intermediate_size=hf.moe_intermediate_size,
        n_shared_experts=hf.n_shared_experts, first_k_dense_replace=hf.first_k_dense_replace or 0, moe_layer_freq=1,
        routed_scaling_factor=hf.routed_scaling_factor, scoring_func="sigmoid", topk_method="noaux_tc",
        n_group=hf.n_group or 1, topk_group=hf.topk_group or 1, norm_topk_prob=bool(hf.norm_topk_prob),
    )  # fmt: skip


def v3_router_config(cfg: MoEConfig) -> dict[str, Any]:
    """The inverse of `v3_router_fields`."""
    return dict(
        intermediate_size=cfg.intermediate_size, n_routed_experts=cfg.n_routed_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_shared_experts=cfg.shared_intermediate_size // cfg.moe_intermediate_size,
        first_k_dense_replace=cfg.first_k_dense_replace, routed_scaling_factor=cfg.routed_scaling_factor,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
    )  # fmt: skip


#: what a DeepSeek-V3 router with shared experts of moe_intermediate_size cannot express (GQA families)
V3_ROUTER = (
    shared.MIXTURE,
    Refusal("scoring_func", lambda c: c.scoring_func == "sigmoid", "but {family}'s router uses sigmoid"),
    Refusal("topk_method", lambda c: c.topk_method == "noaux_tc" or c.n_group == 1,
            "but {family} scores groups by the sum of their top-2 biased scores ('noaux_tc')"),
    Refusal("moe_layer_freq", lambda c: c.moe_layer_freq == 1, "but {family} makes every layer after the dense ones MoE"),
    Refusal("shared_expert_gate", lambda c: not c.shared_expert_gate, "but {family} has no shared-expert gate"),
    Refusal("shared_expert_intermediate_size",
            lambda c: c.shared_intermediate_size > 0 and c.shared_intermediate_size % c.moe_intermediate_size == 0,
            "but {family}'s shared experts are n_shared_experts > 0 experts of moe_intermediate_size"),
)  # fmt: skip
NO_OUT_BIAS = Refusal("attention_out_bias", lambda c: not c.attention_out_bias, "but {family}'s o_proj has no bias")
NO_CHUNKS = Refusal("layer_types", lambda c: "chunked_attention" not in (c.layer_types or ()),
                    "but {family} has no chunked attention layers")  # fmt: skip


def renamed_router(router_key: str) -> tuple[Rule, ...]:
    """`routed_experts()` (no balancing bias) with the router weight stored as `router_key` in both layouts."""
    rows = []
    for rule in shared.routed_experts():
        theirs = tuple(router_key if t == "mlp.gate.weight" else t for t in rule.theirs)
        rows.append(Rule(rule.ours, theirs, rule.op, rule.layout))
    return tuple(rows)


def dense_first(hf: PreTrainedConfig) -> int:
    """`mlp_layer_types` ("dense"/"sparse" per layer) as first_k_dense_replace: dense layers first, then MoE
    only (else refused, naming the field)."""
    kinds = list(hf.mlp_layer_types[: hf.num_hidden_layers])
    first = kinds.index("sparse") if "sparse" in kinds else len(kinds)
    if any(kind != "sparse" for kind in kinds[first:]):
        raise refuse_import(hf, "mlp_layer_types", "hf_moe places MoE layers after the dense ones "
                                                   "(first_k_dense_replace, moe_layer_freq=1) and cannot express this set")
    return first


def mlp_layer_types(cfg: MoEConfig) -> list[str]:
    """The family's `mlp_layer_types` of an MoEConfig."""
    return ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)]


class Fields:
    """A config's attributes with some replaced or added (what the field helpers here read)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)
