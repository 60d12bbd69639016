"""DBRX (databricks/dbrx-base, -instruct): GQA through one fused `Wqkv` projection clipped to +-clip_qkv (rows
`qkv_q/k/v` split it into our q/k/v and fuse them back), LayerNorms without bias (eps 1e-5, torch's default),
a softmax router whose top-k gates are renormalised by their p-norm (`moe_normalize_expert_weights` as
`norm_topk_p`; None: not renormalised), experts stored flat, `w1`/`v1` (gate/up) and `w2` (down, transposed)
of shape (E * I, H), every layer MoE, no biases anywhere. transformers and the released checkpoints name the
layers `transformer.blocks.{i}` alike (one layout). Its Switch-style `moe_loss_weight` maps to `aux_loss_alpha`
as other families' `router_aux_loss_coef` do (`records.switch_coef_to_alpha`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal, alpha_to_switch_coef
from ..tables import Rule

_EPS = 1e-5  # nn.LayerNorm's default, which DBRX's norms use
_ATTN = "norm_attn_norm.attn."
_GLOBALS = (
    Rule("model.embed_tokens.weight", ("transformer.wte.weight",)),
    Rule("model.norm.weight", ("transformer.norm_f.weight",)),
    Rule("lm_head.weight", ("lm_head.weight",)),
)
_LAYER = (
    Rule("input_layernorm.weight", ("norm_attn_norm.norm_1.weight",)),
    Rule("post_attention_layernorm.weight", ("norm_attn_norm.norm_2.weight",)),
    Rule("self_attn.q_proj.weight", (f"{_ATTN}Wqkv.weight",), "qkv_q"),
    Rule("self_attn.k_proj.weight", (f"{_ATTN}Wqkv.weight",), "qkv_k"),
    Rule("self_attn.v_proj.weight", (f"{_ATTN}Wqkv.weight",), "qkv_v"),
    Rule("self_attn.o_proj.weight", (f"{_ATTN}out_proj.weight",)),
    Rule("mlp.gate.weight", ("ffn.router.layer.weight",)),
    Rule("mlp.gate.e_score_correction_bias", ("ffn.router.layer.weight",), "zeros"),
    Rule("mlp.experts.gate_up_proj", ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1"), "flat_stack_cat"),
    Rule("mlp.experts.down_proj", ("ffn.experts.mlp.w2",), "flat_transpose"),
)


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    attn, ffn = hf.attn_config, hf.ffn_config
    p = ffn.moe_normalize_expert_weights
    return dict(
        attention_type="gqa", num_key_value_heads=attn.kv_n_heads, head_dim=hf.d_model // hf.n_heads,
        clip_qkv=attn.clip_qkv, attention_dropout=attn.attn_pdrop or 0.0, rms_norm_eps=_EPS,
        norm_type="layer_norm", norm_bias=False, hidden_act=(ffn.ffn_act_fn or {}).get("name", "silu"),
        intermediate_size=ffn.ffn_hidden_size, moe_intermediate_size=ffn.ffn_hidden_size,
        n_routed_experts=ffn.moe_num_experts, num_experts_per_tok=ffn.moe_top_k, n_shared_experts=0,
        first_k_dense_replace=0, moe_layer_freq=1, scoring_func="softmax", topk_method="greedy", n_group=1,
        topk_group=1, norm_topk_prob=p is not None, norm_topk_p=float(p or 1.0), routed_scaling_factor=1.0,
        router_jitter_noise=ffn.moe_jitter_eps or 0.0, router_bias_update_rate=0.0,
        aux_loss_alpha=ffn.moe_loss_weight * ffn.moe_top_k / max(1, hf.n_layers),  # records.switch_coef_to_alpha
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    attn = dict(kv_n_heads=cfg.num_key_value_heads, clip_qkv=cfg.clip_qkv, attn_pdrop=cfg.attention_dropout,
                rope_theta=(cfg.rope_parameters or {}).get("rope_theta", 10000.0))  # fmt: skip
    ffn = dict(
        ffn_act_fn={"name": cfg.hidden_act}, ffn_hidden_size=cfg.moe_intermediate_size,
        moe_num_experts=cfg.n_routed_experts, moe_top_k=cfg.num_experts_per_tok,
        moe_normalize_expert_weights=cfg.norm_topk_p if cfg.norm_topk_prob else None,
        moe_jitter_eps=cfg.router_jitter_noise or None, moe_loss_weight=alpha_to_switch_coef(cfg.aux_loss_alpha, cfg),
    )  # fmt: skip
    return dict(d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads, n_layers=cfg.num_hidden_layers,
                max_seq_len=cfg.max_position_embeddings, attn_config=attn, ffn_config=ffn)  # fmt: skip


def _is(field: str, ok: Any, why: str) -> Refusal:
    test = ok if callable(ok) else (lambda c: getattr(c, field) == ok)
    return Refusal(field, test, f"but dbrx {why}")


FAMILY = MoEFamily(
    model_type="dbrx",
    globals=_GLOBALS,
    layer_prefix="transformer.blocks.{i}.",
    layer=_LAYER,
    to_moe=_to_moe,
    from_moe=_from_moe,
    export_refusals=(
        _is("attention_type", "gqa", "uses GQA"), _is("n_routed_experts", lambda c: c.n_routed_experts > 0, "is MoE"),
        _is("scoring_func", "softmax", "'s router uses softmax"), _is("n_group", 1, "has no groups"),
        _is("topk_before_softmax", False, "takes softmax over all experts first"),
        _is("routed_scaling_factor", 1.0, "does not scale gate values"),
        _is("shared_intermediate_size", 0, "has no shared experts"),
        _is("first_k_dense_replace", 0, "makes every layer MoE"), _is("moe_layer_freq", 1, "makes every layer MoE"),
        _is("attention_bias", False, "has no attention biases"), _is("attention_out_bias", False, "has no biases"),
        _is("qk_norm", None, "has no q/k norm"), _is("sliding_window", None, "has no sliding window"),
        _is("head_dim", lambda c: c.head_dim * c.num_attention_heads == c.hidden_size,
            "'s head_dim is hidden_size / num_attention_heads"),
        _is("norm_type", lambda c: c.norm_type == "layer_norm" and not c.norm_bias,
            "'s norms are LayerNorms without bias (norm_type='layer_norm', norm_bias=False)"),
        _is("rms_norm_eps", _EPS, f"'s LayerNorms use eps {_EPS}"),
        _is("tie_word_embeddings", False, "does not tie its embeddings"),
        _is("clip_qkv", lambda c: c.clip_qkv is not None, "(transformers' DbrxAttention) clamps q/k/v by clip_qkv: set it"),
        _is("rope_parameters", lambda c: (c.rope_parameters or {}).get("rope_type", "default") == "default",
            "has plain RoPE (rope_type 'default')"),
    ),
    variants=frozenset({"norm_type", "norm_topk_p"}),
)  # fmt: skip
