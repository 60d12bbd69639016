"""gpt-oss (gpt-oss-20b, gpt-oss-120b): GQA with q/k/v/o biases and a learned attention sink per head
(`attention_sinks`), a router with a bias on its logits whose top-k logits are softmaxed (`router_bias`,
`topk_before_softmax`), experts with biases and gpt-oss's clamped unit gate * sigmoid(1.702 gate) * (up + 1)
(`glu_type="gpt_oss"`, `glu_limit` = swiglu_limit), every layer MoE. transformers stores the experts transposed,
`gate_up_proj (E, H, 2I)` with gate and up columns interleaved, `down_proj (E, I, H)`: rows `interleave_t`,
`interleave` and `transpose` re-lay them as ours. One layout: the released checkpoints hold MXFP4 blocks
(dequantize them first, e.g. by loading with transformers and saving in bf16).

Its alternating sliding/full layers convert as they are: `layer_types` per layer, `sliding_window` the window of
the sliding ones (kept when no layer slides, so the config round-trips)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import Rule, same
from . import _attention as attn
from . import _shared as shared

_LAYER = shared.NORMS + shared.GQA_ATTENTION[:8] + same("self_attn.", "sinks") + (
    Rule("mlp.gate.weight", ("mlp.router.weight",)),
    Rule("mlp.gate.bias", ("mlp.router.bias",)),
    Rule("mlp.gate.e_score_correction_bias", ("mlp.router.weight",), "zeros"),
    Rule("mlp.experts.gate_up_proj", ("mlp.experts.gate_up_proj",), "interleave_t"),
    Rule("mlp.experts.gate_up_proj_bias", ("mlp.experts.gate_up_proj_bias",), "interleave"),
    Rule("mlp.experts.down_proj", ("mlp.experts.down_proj",), "transpose"),
    Rule("mlp.experts.down_proj_bias", ("mlp.experts.down_proj_bias",)),
)  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), intermediate_size=hf.intermediate_size, moe_intermediate_size=hf.intermediate_size,
        first_k_dense_replace=0, moe_layer_freq=1, topk_before_softmax=True, norm_topk_prob=True,
        attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias, attention_sinks=True,
        **attn.layer_types_fields(hf), router_bias=True, expert_bias=True,
        glu_type="gpt_oss", glu_limit=float(hf.swiglu_limit), glu_alpha=float(hf.swiglu_alpha),
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    types = attn.layer_types_config(cfg)
    fields = dict(
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size,
        num_local_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        attention_bias=cfg.attention_bias, swiglu_limit=cfg.glu_limit, swiglu_alpha=cfg.glu_alpha,
        layer_types=types["layer_types"],
    )  # fmt: skip
    if cfg.sliding_window is not None:  # else GptOssConfig's default (no layer slides)
        fields["sliding_window"] = cfg.sliding_window
    return fields


def _is(field: str, value: object, why: str) -> Refusal:
    return Refusal(field, lambda c: getattr(c, field) == value, f"but gpt_oss {why}")


FAMILY = MoEFamily(
    model_type="gpt_oss",
    layer=_LAYER,
    to_moe=_to_moe,
    knobs=frozenset({"layer_types"}),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SHARED_EXPERTS, *shared.EVERY_LAYER_MOE,
        shared.ONE_ATTENTION_BIAS,
        _is("topk_before_softmax", True, "softmaxes the top-k router logits"),
        _is("router_bias", True, "has a router bias"), _is("expert_bias", True, "has expert biases"),
        _is("glu_type", "gpt_oss", "uses its own gated unit (glu_type='gpt_oss')"),
        _is("attention_sinks", True, "has attention sinks"), attn.NO_CHUNKS,
    ),
    variants=frozenset({"router_bias", "expert_bias", "glu_type", "glu_limit", "attention_sinks"}),
    switch_loss=True,
)  # fmt: skip
