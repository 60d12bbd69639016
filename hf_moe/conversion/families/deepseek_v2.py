"""DeepSeek-V2: MLA, a softmax router (greedy or group-limited by each group's max score), shared experts.

Mapped as transformers' modeling code computes it (the oracle), not by field names: its DeepseekV2 router
never renormalises the top-k weights (the config's norm_topk_prob is unused), and it rotates (x0, x1),
(x2, x3)... pairs as complex numbers (interleaved RoPE)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _shared as shared

logger = logging.getLogger(__name__)
_METHODS = ("greedy", "group_limited_greedy")  # what transformers' DeepseekV2 router implements


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    if hf.norm_topk_prob:
        logger.warning(
            "deepseek_v2 config norm_topk_prob=True is ignored by transformers' DeepseekV2 router (it never "
            "renormalises the top-k weights); hf_moe follows transformers and uses norm_topk_prob=False."
        )
    grouped = hf.topk_method == "group_limited_greedy"
    return dict(
        shared.mla_fields(hf, rope_interleave=True), scoring_func="softmax", topk_method=hf.topk_method,
        n_group=(hf.n_group or 1) if grouped else 1, topk_group=(hf.topk_group or 1) if grouped else 1,
        norm_topk_prob=False, router_bias_update_rate=0.0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(shared.mla_config(cfg), topk_method="greedy" if cfg.n_group == 1 else "group_limited_greedy",
                norm_topk_prob=False)  # fmt: skip


FAMILY = MoEFamily(
    model_type="deepseek_v2",
    knobs=frozenset({"latent_norm_eps"}),
    layer=shared.MLA_DECODER_LAYER + shared.routed_experts() + shared.SHARED_EXPERTS,
    to_moe=_to_moe,
    import_refusals=shared.DEEPSEEK_IMPORT + (
        Refusal("mlp_bias", lambda hf: not getattr(hf, "mlp_bias", False), "hf_moe FFNs have no biases"),
        Refusal("topk_method", lambda hf: hf.topk_method in _METHODS, f"allowed values are {_METHODS}"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.DEEPSEEK + (
        Refusal("scoring_func", lambda c: c.scoring_func == "softmax", "but deepseek_v2's router uses softmax"),
        Refusal("topk_method", lambda c: c.topk_method == "group_limited_greedy" or c.n_group == 1,
                "but deepseek_v2 scores groups by their max score ('group_limited_greedy')"),
        Refusal("norm_topk_prob", lambda c: not c.norm_topk_prob,
                "but transformers' deepseek_v2 never renormalises gate values"),
        Refusal("rope_interleave", lambda c: c.rope_interleave, "but deepseek_v2 rotates interleaved pairs"),
    ),
)  # fmt: skip
