"""Granite MoE (`granitemoeshared`, IBM Granite 3.x MoE): GQA with one `attention_bias` flag for q/k/v/o and muP's
multipliers (`attention_multiplier` as the softmax scale, `embedding_multiplier`, `residual_multiplier` on both
residual branches, logits divided by `logits_scaling`), every layer MoE: a router taking the top-k logits then
their softmax (`block_sparse_moe.router`), fused experts of intermediate_size (released checkpoints:
`block_sparse_moe.input_linear` / `output_linear`, `router.layer`), and the shared MLP added ungated
(`shared_intermediate_size > 0`: one shared expert of that width). The shared MLP's gate and up projections are
one fused `shared_mlp.input_linear` = [gate; up] (both layouts): rows `halves_0` / `halves_1` split it on import
and re-fuse it on export."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import Rule
from . import _shared as shared

_MOE = "block_sparse_moe."
_LAYER = shared.NORMS + shared.GQA_ATTENTION + (
    Rule("mlp.gate.weight", (f"{_MOE}router.weight",), layout="transformers"),
    Rule("mlp.gate.weight", (f"{_MOE}router.layer.weight",), layout="original"),
    Rule("mlp.gate.e_score_correction_bias", (f"{_MOE}router.weight",), "zeros", layout="transformers"),
    Rule("mlp.gate.e_score_correction_bias", (f"{_MOE}router.layer.weight",), "zeros", layout="original"),
    Rule("mlp.experts.gate_up_proj", (f"{_MOE}experts.gate_up_proj",), layout="transformers"),
    Rule("mlp.experts.gate_up_proj", (f"{_MOE}input_linear.weight",), layout="original"),
    Rule("mlp.experts.down_proj", (f"{_MOE}experts.down_proj",), layout="transformers"),
    Rule("mlp.experts.down_proj", (f"{_MOE}output_linear.weight",), layout="original"),
    Rule("mlp.shared_experts.gate_proj.weight", ("shared_mlp.input_linear.weight",), "halves_0"),
    Rule("mlp.shared_experts.up_proj.weight", ("shared_mlp.input_linear.weight",), "halves_1"),
    Rule("mlp.shared_experts.down_proj.weight", ("shared_mlp.output_linear.weight",)),
)  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), intermediate_size=hf.intermediate_size, moe_intermediate_size=hf.intermediate_size,
        first_k_dense_replace=0, moe_layer_freq=1, attention_bias=hf.attention_bias,
        attention_out_bias=hf.attention_bias, topk_before_softmax=True, norm_topk_prob=True,
        attention_multiplier=float(hf.attention_multiplier), embedding_multiplier=float(hf.embedding_multiplier),
        residual_multiplier=float(hf.residual_multiplier), logits_scaling=float(hf.logits_scaling),
        n_shared_experts=int(hf.shared_intermediate_size > 0),
        shared_expert_intermediate_size=hf.shared_intermediate_size or None,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    scale = cfg.head_dim ** -0.5 if cfg.attention_multiplier is None else cfg.attention_multiplier
    return dict(
        num_key_value_heads=cfg.num_key_value_heads, num_experts_per_tok=cfg.num_experts_per_tok,
        intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_routed_experts,
        attention_bias=cfg.attention_bias, attention_multiplier=scale, embedding_multiplier=cfg.embedding_multiplier,
        residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling,
        shared_intermediate_size=cfg.shared_intermediate_size,
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="granitemoeshared",
    layer=_LAYER,
    knobs=frozenset({"attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling"}),
    to_moe=_to_moe,
    import_refusals=(
        Refusal("head_dim", lambda hf: getattr(hf, "head_dim", None) in (None, hf.hidden_size // hf.num_attention_heads),
                "transformers' granitemoeshared uses hidden_size / num_attention_heads"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW, *shared.EVERY_LAYER_MOE,
        shared.ONE_ATTENTION_BIAS,
        Refusal("shared_expert_gate", lambda c: not c.shared_expert_gate,
                "but granitemoeshared adds its shared MLP ungated"),
        Refusal("norm_topk_prob", shared.renormalised, "but granitemoeshared renormalises the top-k gate values"),
        Refusal("head_dim", lambda c: c.head_dim * c.num_attention_heads == c.hidden_size,
                "but granitemoeshared's head size is hidden_size / num_attention_heads"),
    ),
    switch_loss=True,
)  # fmt: skip
