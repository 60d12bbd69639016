"""Phi-3.5-MoE (`phimoe`): GQA with one `attention_bias` flag for q/k/v/o and an optional window on every layer,
LayerNorms with bias (decoder and final), SparseMixer top-2 routing (`topk_method="sparsemixer"`, its threshold
`router_jitter_noise` as our `sparsemixer_eps`; its `input_jitter_noise` is our Switch-style
`router_jitter_noise`), every layer MoE, a head with optional bias. The released checkpoints name the router
`block_sparse_moe.gate` and the experts `block_sparse_moe.experts.{e}.w1/w3/w2`. LongRoPE with short/long
mscale (the released checkpoints' RoPE) is refused: hf_moe's rotary embedding does not switch mscale by length."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import CAUSAL_LM_GLOBALS, Rule, same
from . import _shared as shared

_ROUTER, _BIAS = "mlp.gate.weight", "mlp.gate.e_score_correction_bias"
_LAYER = (
    same("", *(f"{n}.{p}" for n in ("input_layernorm", "post_attention_layernorm") for p in ("weight", "bias")))
    + shared.GQA_ATTENTION + shared.routed_experts("block_sparse_moe.", "w1", "w3", "w2")[1:5]  # experts only
    + (Rule(_ROUTER, ("mlp.router.weight",), layout="transformers"),
       Rule(_ROUTER, ("block_sparse_moe.gate.weight",), layout="original"),
       Rule(_BIAS, ("mlp.router.weight",), "zeros", layout="transformers"),
       Rule(_BIAS, ("block_sparse_moe.gate.weight",), "zeros", layout="original"))
)  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), intermediate_size=hf.intermediate_size, moe_intermediate_size=hf.intermediate_size,
        first_k_dense_replace=0, moe_layer_freq=1, topk_method="sparsemixer", norm_topk_prob=False,
        sparsemixer_eps=hf.router_jitter_noise, router_jitter_noise=hf.input_jitter_noise,
        sliding_window=hf.sliding_window, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
        norm_type="layer_norm", norm_bias=True, lm_head_bias=hf.lm_head_bias,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_config(cfg), intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_routed_experts,
        sliding_window=cfg.sliding_window, attention_bias=cfg.attention_bias, router_jitter_noise=cfg.sparsemixer_eps,
        input_jitter_noise=cfg.router_jitter_noise, lm_head_bias=cfg.lm_head_bias,
    )  # fmt: skip


def _rope_type(config: Any) -> str:
    return dict(config.rope_parameters or {}).get("rope_type", "default")


FAMILY = MoEFamily(
    model_type="phimoe",
    globals=CAUSAL_LM_GLOBALS + same("", "model.norm.bias", "lm_head.bias"),
    layer=_LAYER,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("rope_parameters", lambda hf: _rope_type(hf) == "default",
                "hf_moe's rotary embedding does not switch Phi-3.5-MoE's short/long mscale by sequence length "
                "(only rope_type 'default' converts)"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SHARED_EXPERTS, *shared.EVERY_LAYER_MOE,
        shared.ONE_ATTENTION_BIAS,
        Refusal("topk_method", lambda c: c.topk_method == "sparsemixer", "but phimoe routes with SparseMixer"),
        Refusal("norm_type", lambda c: c.norm_type == "layer_norm" and c.norm_bias,
                "but phimoe's norms are LayerNorms with bias (norm_type='layer_norm', norm_bias=True)"),
        Refusal("rope_parameters", lambda c: _rope_type(c) == "default",
                "but hf_moe exports only rope_type 'default' to phimoe"),
    ),
    variants=frozenset({"sparsemixer", "norm_type", "lm_head_bias"}),
    switch_loss=True,
)  # fmt: skip
