"""JetMoE (jetmoe/jetmoe-8b): a mixture of attention heads (`moa_experts`: each token's top-k attention experts
own its query and output projections, keys and values shared through one fused `kv_proj`, rows `kv_k`/`kv_v`;
the mixed output has a bias) and an MoE FFN whose mixed output has a bias (`moe_output_bias`), both routed by
softmax over the top-k logits with the same E and K, every layer MoE, no shared experts. The experts are stored
as ours, `input_linear (E, 2I, H)` (gate rows first) and `output_linear (E, H, I)`; the released checkpoints hold
the same keys (one layout). The decoder norms use eps 1e-6 whatever `rms_norm_eps` says (which the final norm
uses), so only rms_norm_eps = 1e-6 converts. Its Switch-style `aux_loss_coef` maps to `aux_loss_alpha` as the
other families' `router_aux_loss_coef` (the MoA router's balance loss is not kept)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal, alpha_to_switch_coef
from ..tables import Rule
from . import _shared as shared

_EPS = 1e-6  # JetMoeRMSNorm's default, which its decoder norms use
_MOA = "self_attention.experts."
_LAYER = shared.NORMS + (
    Rule("self_attn.router.weight", (f"{_MOA}router.layer.weight",)),
    Rule("self_attn.q_proj", (f"{_MOA}input_linear.weight",)),
    Rule("self_attn.o_proj", (f"{_MOA}output_linear.weight",)),
    Rule("self_attn.o_bias", (f"{_MOA}bias",)),
    Rule("self_attn.k_proj.weight", ("self_attention.kv_proj.weight",), "kv_k"),
    Rule("self_attn.v_proj.weight", ("self_attention.kv_proj.weight",), "kv_v"),
    Rule("mlp.gate.weight", ("mlp.router.layer.weight",)),
    Rule("mlp.gate.e_score_correction_bias", ("mlp.router.layer.weight",), "zeros"),
    Rule("mlp.experts.gate_up_proj", ("mlp.input_linear.weight",)),
    Rule("mlp.experts.down_proj", ("mlp.output_linear.weight",)),
    Rule("mlp.bias", ("mlp.bias",)),
)


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    k, layers = hf.num_experts_per_tok, hf.num_hidden_layers
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=hf.kv_channels,
        moa_experts=hf.num_local_experts, moa_top_k=k, attention_out_bias=True, hidden_act=hf.activation_function,
        intermediate_size=hf.intermediate_size, moe_intermediate_size=hf.intermediate_size,
        n_routed_experts=hf.num_local_experts, num_experts_per_tok=k, n_shared_experts=0, first_k_dense_replace=0,
        moe_layer_freq=1, scoring_func="softmax", topk_method="greedy", topk_before_softmax=True, norm_topk_prob=True,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, moe_output_bias=True, router_bias_update_rate=0.0,
        aux_loss_alpha=hf.aux_loss_coef * k / max(1, layers),  # records.switch_coef_to_alpha
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        num_key_value_heads=cfg.num_key_value_heads, kv_channels=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size,
        activation_function=cfg.hidden_act, num_local_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, aux_loss_coef=alpha_to_switch_coef(cfg.aux_loss_alpha, cfg),
    )  # fmt: skip


def _is(field: str, ok: Any, why: str) -> Refusal:
    test = ok if callable(ok) else (lambda c: getattr(c, field) == ok)
    return Refusal(field, test, f"but jetmoe {why}")


FAMILY = MoEFamily(
    model_type="jetmoe",
    layer=_LAYER,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("rms_norm_eps", lambda hf: hf.rms_norm_eps == _EPS,
                f"JetMoE's decoder norms use eps {_EPS} whatever rms_norm_eps says, hf_moe one eps for every norm"),
    ),
    from_moe=_from_moe,
    export_refusals=shared.SOFTMAX_ROUTER + (
        shared.NO_SHARED_EXPERTS, *shared.EVERY_LAYER_MOE,
        Refusal("norm_topk_prob", shared.renormalised, "but jetmoe softmaxes the top-k logits"),
        _is("moa_experts", lambda c: c.moa_experts == c.n_routed_experts,
            "has a mixture of attention heads with as many experts as its FFN (moa_experts = n_routed_experts)"),
        _is("moa_top_k", lambda c: c.moa_top_k == c.num_experts_per_tok, "routes attention and FFN with the same K"),
        _is("attention_out_bias", True, "'s mixed attention output has a bias"),
        _is("attention_bias", False, "has no q/k/v biases"),
        _is("moe_output_bias", True, "'s mixed FFN output has a bias"),
        _is("rms_norm_eps", _EPS, f"'s decoder norms use eps {_EPS}"),
    ),
    variants=frozenset({"moe_output_bias", "moa_experts"}),
)  # fmt: skip
