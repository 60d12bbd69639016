"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): GQA with q/k/v biases, a softmax router, MoE layers placed by
`decoder_sparse_step` / `mlp_only_layers`, and one shared expert scaled by a sigmoid gate
(`shared_expert_gate`), stored as `mlp.shared_expert.*` next to `mlp.shared_expert_gate.weight`."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from ..tables import Rule, same
from . import _shared as shared

_SHARED_EXPERT = tuple(
    Rule(f"mlp.shared_experts.{n}", (f"mlp.shared_expert.{n}",))
    for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
) + same("mlp.", "shared_expert_gate.weight")


def _window_on_some_layers(hf: PreTrainedConfig) -> bool:
    layer_types = getattr(hf, "layer_types", None) or []
    return bool(getattr(hf, "use_sliding_window", False)) and "sliding_attention" in layer_types


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), **shared.qwen_layer_pattern(hf), intermediate_size=hf.intermediate_size,
        moe_intermediate_size=hf.moe_intermediate_size, attention_bias=hf.qkv_bias, attention_out_bias=False,
        n_shared_experts=1, shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
        shared_expert_gate=True, norm_topk_prob=hf.norm_topk_prob,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_config(cfg), **shared.qwen_layer_config(cfg), qkv_bias=cfg.attention_bias,
        shared_expert_intermediate_size=cfg.shared_intermediate_size,
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="qwen2_moe",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts() + _SHARED_EXPERT,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("use_sliding_window", lambda hf: not _window_on_some_layers(hf),
                "it applies the window to some layers only (see layer_types), hf_moe's sliding_window applies to "
                "every layer"),
        Refusal("shared_expert_intermediate_size", lambda hf: hf.shared_expert_intermediate_size > 0,
                "it must be positive: hf_moe does not store the zero-width shared expert transformers would build"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
        Refusal("shared_expert_gate", lambda c: c.shared_expert_gate and c.shared_intermediate_size > 0,
                "but qwen2_moe always has one shared expert scaled by a sigmoid gate"),
        Refusal("attention_out_bias", lambda c: not c.attention_out_bias, "but qwen2_moe's o_proj has no bias"),
    ),
    switch_loss=True,
)  # fmt: skip
