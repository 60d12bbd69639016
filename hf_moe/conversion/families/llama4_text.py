"""Llama 4 text models (`llama4_text`: the language model of Llama-4 Scout and Maverick): GQA with RoPE on
interleaved (complex) pairs (`rope_pairs` rows), a router whose top-k logits pass through a sigmoid and scale the
expert's INPUT (`gate_on_expert_input`), one shared expert of the routed experts' width, MoE on `moe_layers`
(`interleave_moe_layer_step`; dense layers of `intermediate_size_mlp`). transformers stores the experts
transposed, `gate_up_proj (E, H, 2I)` (gate columns first) and `down_proj (E, I, H)` (rows `transpose`); the
Hub checkpoints hold the same keys (one layout).

Its attention converts as it is: NoPE layers (`no_rope_layers` 0s: `nope_layers`), chunked attention layers
(`layer_types` "chunked_attention", `attention_chunk_size`), the weightless per-head q/k L2 norm after RoPE on the
rotating layers only (`use_qk_norm`: `qk_norm="head"`, `qk_norm_weight=False`, `qk_norm_after_rope`,
`qk_norm_skip_nope`) and the attention temperature tuning of the NoPE layers (`attn_temperature_tuning`,
`attn_scale`, `floor_scale`: `attention_temperature_scale`, `attention_temperature_floor`). Sliding-window
layers, which transformers' Llama 4 has no mask for, are refused."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import MoEFamily, Refusal, refuse_import
from ..tables import Rule, same
from . import _shared as shared

_ROPE = tuple(Rule(f"self_attn.{p}.{n}", (f"self_attn.{p}.{n}",), "rope_pairs")
              for p in ("q_proj", "k_proj") for n in ("weight", "bias"))  # fmt: skip
_LAYER = (
    shared.NORMS + _ROPE + same("self_attn.", "v_proj.weight", "v_proj.bias", "o_proj.weight", "o_proj.bias")
    + tuple(Rule(f"mlp.{n}.weight", (f"feed_forward.{n}.weight",)) for n in ("gate_proj", "up_proj", "down_proj"))
    + tuple(Rule(f"mlp.shared_experts.{n}.weight", (f"feed_forward.shared_expert.{n}.weight",))
            for n in ("gate_proj", "up_proj", "down_proj"))
    + (Rule("mlp.gate.weight", ("feed_forward.router.weight",)),
       Rule("mlp.gate.e_score_correction_bias", ("feed_forward.router.weight",), "zeros"),
       Rule("mlp.experts.gate_up_proj", ("feed_forward.experts.gate_up_proj",), "transpose"),
       Rule("mlp.experts.down_proj", ("feed_forward.experts.down_proj",), "transpose"))
)  # fmt: skip


def _moe_pattern(hf: PreTrainedConfig) -> dict[str, int]:
    n, moe = hf.num_hidden_layers, sorted(set(hf.moe_layers))
    if not moe:
        return dict(first_k_dense_replace=n, moe_layer_freq=1)
    freq = moe[1] - moe[0] if len(moe) > 1 else 1
    if moe != list(range(moe[0], moe[-1] + 1, freq)):
        raise refuse_import(hf, "moe_layers", "hf_moe places MoE layers as first_k_dense_replace + j * moe_layer_freq "
                                              "(before last_k_dense_replace) and cannot express this set")  # fmt: skip
    return dict(first_k_dense_replace=moe[0], moe_layer_freq=freq, last_k_dense_replace=n - 1 - moe[-1])


def _attention_fields(hf: PreTrainedConfig) -> dict[str, Any]:
    """NoPE layers, per-layer types, the q/k norm and the temperature tuning as MoEConfig fields."""
    n = hf.num_hidden_layers
    qk_norm = dict(qk_norm="head", qk_norm_weight=False, qk_norm_after_rope=True, qk_norm_skip_nope=True)
    return dict(
        nope_layers=[i for i, rope in enumerate(hf.no_rope_layers[:n]) if not rope] or None,
        layer_types=list(hf.layer_types[:n]), attention_chunk_size=hf.attention_chunk_size,
        **(qk_norm if hf.use_qk_norm else {}),
        attention_temperature_scale=float(hf.attn_scale) if hf.attn_temperature_tuning else None,
        attention_temperature_floor=int(hf.floor_scale),
    )  # fmt: skip


def _nope_interval(n: int, nope: set[int]) -> int | None:
    """The `no_rope_layer_interval` p whose rule (layer i NoPE iff (i + 1) % p == 0) gives these NoPE layers."""
    return next((p for p in range(1, n + 1) if nope == {i for i in range(n) if (i + 1) % p == 0}), None)


def _attention_config(cfg: MoEConfig) -> dict[str, Any]:
    """The inverse of `_attention_fields` (`no_rope_layer_interval` too where its rule gives the NoPE layers)."""
    n, nope = cfg.num_hidden_layers, set(cfg.nope_layers or ())
    scale, interval = cfg.attention_temperature_scale, _nope_interval(n, nope)
    return dict(
        {} if interval is None else {"no_rope_layer_interval": interval},
        no_rope_layers=[0 if i in nope else 1 for i in range(n)], layer_types=[cfg.layer_type(i) for i in range(n)],
        attention_chunk_size=cfg.attention_chunk_size, use_qk_norm=cfg.qk_norm is not None,
        attn_temperature_tuning=scale is not None, attn_scale=0.1 if scale is None else scale,
        floor_scale=cfg.attention_temperature_floor,
    )  # fmt: skip


def _llama4_qk_norm(c: MoEConfig) -> bool:
    """None, or Llama 4's: weightless, per head, after RoPE, on the rotating layers only."""
    return c.qk_norm is None or (c.qk_norm == "head" and not c.qk_norm_weight and c.qk_norm_after_rope
                                 and (c.qk_norm_skip_nope or not c.nope_layers))  # fmt: skip


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), **_attention_fields(hf), **_moe_pattern(hf), intermediate_size=hf.intermediate_size_mlp,
        moe_intermediate_size=hf.intermediate_size, n_shared_experts=1, scoring_func="sigmoid", norm_topk_prob=False,
        gate_on_expert_input=True, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
        router_jitter_noise=hf.router_jitter_noise or 0.0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_config(cfg), head_dim=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size,
        intermediate_size_mlp=cfg.intermediate_size, num_local_experts=cfg.n_routed_experts,
        moe_layers=cfg.moe_layer_indices, interleave_moe_layer_step=cfg.moe_layer_freq, **_attention_config(cfg),
        attention_bias=cfg.attention_bias,
        router_jitter_noise=cfg.router_jitter_noise,
    )  # fmt: skip


def _is(field: str, ok: Any, why: str) -> Refusal:
    test = ok if callable(ok) else (lambda c: getattr(c, field) == ok)
    return Refusal(field, test, f"but llama4_text {why}")


_NO_SLIDING = "transformers' Llama 4 has full and chunked attention layers only"
FAMILY = MoEFamily(
    model_type="llama4_text",
    layer=_LAYER,
    knobs=frozenset({"layer_types", "attention_chunk_size", "nope_layers", "qk_norm_after_rope", "qk_norm_weight",
                     "qk_norm_skip_nope", "attention_temperature_scale"}),
    to_moe=_to_moe,
    import_refusals=(
        Refusal("layer_types", lambda hf: "sliding_attention" not in hf.layer_types[: hf.num_hidden_layers],
                f"it has sliding-window layers; {_NO_SLIDING}"),
    ),
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), shared.MIXTURE, shared.ONE_ATTENTION_BIAS,
        Refusal("qk_norm", _llama4_qk_norm, "but llama4_text's q/k norm is None or weightless, per head, after RoPE "
                                            "and on the rotating layers only (qk_norm_skip_nope)"),
        shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
        _is("scoring_func", "sigmoid", "scores the chosen logits with a sigmoid"),
        _is("topk_method", "greedy", "takes a plain top-k"), _is("n_group", 1, "has no groups"),
        _is("norm_topk_prob", False, "does not renormalise the gates"),
        _is("routed_scaling_factor", 1.0, "does not scale gate values"),
        _is("gate_on_expert_input", True, "scales the expert input by the gate"),
        _is("shared_expert_gate", False, "has no shared-expert gate"),
        _is("shared_intermediate_size", lambda c: c.shared_intermediate_size == c.moe_intermediate_size,
            "has one shared expert as wide as a routed one"),
    ),
    variants=frozenset({"gate_on_expert_input", "last_k_dense_replace"}),
    switch_loss=True,
)  # fmt: skip
