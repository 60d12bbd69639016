"""Mixtral: GQA with an optional sliding window on every layer, softmax router over all experts, top-k
renormalised (softmax, top-k, renormalise == softmax of the top-k logits), every layer MoE. The released
checkpoints name the experts `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), intermediate_size=hf.intermediate_size, moe_intermediate_size=hf.intermediate_size,
        first_k_dense_replace=0, moe_layer_freq=1, norm_topk_prob=True, sliding_window=hf.sliding_window,
        router_jitter_noise=hf.router_jitter_noise or 0.0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_config(cfg), intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_routed_experts,
        sliding_window=cfg.sliding_window, router_jitter_noise=cfg.router_jitter_noise,
    )  # fmt: skip


FAMILY = MoEFamily(
    model_type="mixtral",
    layer=shared.DENSE_DECODER_LAYER + shared.routed_experts("block_sparse_moe.", "w1", "w3", "w2"),
    to_moe=_to_moe,
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SHARED_EXPERTS, *shared.EVERY_LAYER_MOE,
        Refusal("norm_topk_prob", shared.renormalised, "but mixtral renormalises the top-k gate values"),
        Refusal("attention_bias", lambda c: not c.attention_bias, "but mixtral has no attention biases"),
        Refusal("attention_out_bias", lambda c: not c.attention_out_bias, "but mixtral has no attention biases"),
    ),
    switch_loss=True,
)  # fmt: skip
