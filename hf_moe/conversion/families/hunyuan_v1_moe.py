"""Hunyuan-A13B (`hunyuan_v1_moe`): GQA with one `attention_bias` flag for q/k/v/o and per-head q/k RMSNorm
applied AFTER RoPE (`query_layernorm` / `key_layernorm`), every layer MoE: a softmax router (`mlp.gate.wg`),
top-`moe_topk` renormalised, experts and one shared MLP (`mlp.shared_mlp`) all of `intermediate_size`. Its
"dynamic" RoPE with a fixed NTK `alpha` is plain RoPE with base theta * alpha^(d / (d - 2)): imported as such
(exported as that default RoPE)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal, refuse_import
from ..tables import Rule
from . import _attention as attn
from . import _shared as shared

_LAYER = (
    shared.NORMS
    + tuple(r for r in shared.GQA_ATTENTION if "norm" not in r.ours)
    + (Rule("self_attn.q_norm.weight", ("self_attn.query_layernorm.weight",)),
       Rule("self_attn.k_norm.weight", ("self_attn.key_layernorm.weight",)))
    + attn.renamed_router("mlp.gate.wg.weight")
    + tuple(Rule(f"mlp.shared_experts.{n}", (f"mlp.shared_mlp.{n}",))
            for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
)  # fmt: skip


def _one(hf: PreTrainedConfig, name: str) -> int:
    """A per-layer list field (num_experts, moe_topk) that must hold one value."""
    value = getattr(hf, name)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise refuse_import(hf, name, "it varies per layer; hf_moe has one value for every MoE layer")
        value = value[0]
    return value


def _rope(hf: PreTrainedConfig) -> dict[str, Any]:
    """The RoPE parameters, NTK-alpha ("dynamic" with `alpha`) as default RoPE of the stretched base."""
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type") == "dynamic" and rope.get("alpha"):
        dim = attn.head_dim(hf)
        return {"rope_type": "default", "rope_theta": rope["rope_theta"] * rope["alpha"] ** (dim / (dim - 2))}
    return rope


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=attn.head_dim(hf),
        attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias, qk_norm="head",
        qk_norm_after_rope=True, rope_parameters=_rope(hf), intermediate_size=hf.intermediate_size,
        n_routed_experts=_one(hf, "num_experts"), num_experts_per_tok=_one(hf, "moe_topk"),
        moe_intermediate_size=hf.intermediate_size, n_shared_experts=1, first_k_dense_replace=0, moe_layer_freq=1,
        scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, router_bias_update_rate=0.0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    # head_dim always: transformers' class reads config.head_dim, None unless given
    return dict(num_key_value_heads=cfg.num_key_value_heads, attention_bias=cfg.attention_bias, head_dim=cfg.head_dim,
                intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
                moe_topk=cfg.num_experts_per_tok)  # fmt: skip


FAMILY = MoEFamily(
    model_type="hunyuan_v1_moe",
    layer=_LAYER,
    knobs=frozenset({"qk_norm_after_rope"}),
    to_moe=_to_moe,
    import_refusals=(
        Refusal("num_experts", lambda hf: _one(hf, "num_experts") > 0, "hf_moe needs routed experts"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        *shared.EVERY_LAYER_MOE, shared.qk_norm("head"), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
        shared.ONE_ATTENTION_BIAS,
        Refusal("qk_norm_after_rope", lambda c: c.qk_norm_after_rope, "but hunyuan_v1_moe normalises q/k after RoPE"),
        Refusal("norm_topk_prob", shared.renormalised, "but hunyuan_v1_moe renormalises the top-k gate values"),
        Refusal("moe_intermediate_size", lambda c: c.moe_intermediate_size == c.intermediate_size,
                "but hunyuan_v1_moe's experts are intermediate_size wide"),
        Refusal("shared_expert_intermediate_size", lambda c: c.shared_intermediate_size == c.intermediate_size
                and not c.shared_expert_gate, "but hunyuan_v1_moe has one ungated shared MLP of intermediate_size"),
    ),
)  # fmt: skip
