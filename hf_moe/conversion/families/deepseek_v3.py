"""DeepSeek-V3 (and Kimi-K2, same architecture): MLA, a sigmoid router with the balancing bias and
group-limited top-k ("noaux_tc"), shared experts, and multi-token-prediction modules stored as
`model.layers.{N+k}.*` (README_WEIGHTS of DeepSeek-V3; transformers drops them at load, hf_moe keeps them as
`mtp.{k}.*`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal
from . import _shared as shared


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.mla_fields(hf, rope_interleave=bool(hf.rope_interleave)), scoring_func="sigmoid", topk_method="noaux_tc",
        n_group=hf.n_group or 1, topk_group=hf.topk_group or 1, norm_topk_prob=bool(hf.norm_topk_prob),
        num_nextn_predict_layers=getattr(hf, "num_mtp_layers", 0) or 0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(shared.mla_config(cfg), norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
                num_mtp_layers=cfg.num_nextn_predict_layers)  # fmt: skip


FAMILY = MoEFamily(
    model_type="deepseek_v3",
    knobs=frozenset({"latent_norm_eps"}),
    layer=shared.MLA_DECODER_LAYER + shared.routed_experts(bias=True) + shared.SHARED_EXPERTS,
    mtp=shared.DEEPSEEK_MTP,
    to_moe=_to_moe,
    import_refusals=shared.DEEPSEEK_IMPORT,
    from_moe=_from_moe,
    export_refusals=shared.DEEPSEEK + (
        Refusal("scoring_func", lambda c: c.scoring_func == "sigmoid", "but deepseek_v3's router uses sigmoid"),
        Refusal("topk_method", lambda c: c.topk_method == "noaux_tc" or c.n_group == 1,
                "but deepseek_v3 scores groups by the sum of their top-2 biased scores ('noaux_tc')"),
    ),
)  # fmt: skip
