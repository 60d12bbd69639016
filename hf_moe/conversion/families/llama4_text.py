"""Llama 4 text models (`llama4_text`: the language model of Llama-4 Scout and Maverick): GQA with RoPE on
interleaved (complex) pairs (`rope_pairs` rows), a router whose top-k logits pass through a sigmoid and scale the
expert's INPUT (`gate_on_expert_input`), one shared expert of the routed experts' width, MoE on `moe_layers`
(`interleave_moe_layer_step`; dense layers of `intermediate_size_mlp`). transformers stores the experts
transposed, `gate_up_proj (E, H, 2I)` (gate columns first) and `down_proj (E, I, H)` (rows `transpose`); the
Hub checkpoints hold the same keys (one layout).

Refused until hf_moe has the attention fields for them: NoPE layers (`no_rope_layers` with a 0), chunked
attention layers (`attention_chunk_size` set: `layer_types` "chunked_attention"), the weightless q/k L2 norm after
RoPE (`use_qk_norm`); attention temperature tuning acts on NoPE layers only, so it converts without them."""

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


def _to_moe(hf: PreTrainedConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_fields(hf), **_moe_pattern(hf), intermediate_size=hf.intermediate_size_mlp,
        moe_intermediate_size=hf.intermediate_size, n_shared_experts=1, scoring_func="sigmoid", norm_topk_prob=False,
        gate_on_expert_input=True, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
        router_jitter_noise=hf.router_jitter_noise or 0.0,
    )  # fmt: skip


def _from_moe(cfg: MoEConfig) -> dict[str, Any]:
    return dict(
        shared.gqa_config(cfg), head_dim=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size,
        intermediate_size_mlp=cfg.intermediate_size, num_local_experts=cfg.n_routed_experts,
        moe_layers=cfg.moe_layer_indices, interleave_moe_layer_step=cfg.moe_layer_freq, use_qk_norm=False,
        no_rope_layers=[1] * cfg.num_hidden_layers, attention_chunk_size=None, attention_bias=cfg.attention_bias,
        router_jitter_noise=cfg.router_jitter_noise,
    )  # fmt: skip


def _is(field: str, ok: Any, why: str) -> Refusal:
    test = ok if callable(ok) else (lambda c: getattr(c, field) == ok)
    return Refusal(field, test, f"but llama4_text {why}")


_PENDING = "hf_moe does not express it yet (the attention fields for it are to come)"
FAMILY = MoEFamily(
    model_type="llama4_text",
    layer=_LAYER,
    to_moe=_to_moe,
    import_refusals=(
        Refusal("no_rope_layers", lambda hf: all(hf.no_rope_layers), f"it has NoPE layers; {_PENDING}"),
        Refusal("layer_types", lambda hf: "chunked_attention" not in (hf.layer_types or []),
                f"it has chunked attention layers (attention_chunk_size set); {_PENDING}"),
        Refusal("use_qk_norm", lambda hf: not hf.use_qk_norm, f"its q/k L2 norm after RoPE is weightless; {_PENDING}"),
    ),
    from_moe=_from_moe,
    export_refusals=(
        shared.attention("gqa"), shared.MIXTURE, shared.ONE_ATTENTION_BIAS,
        shared.qk_norm(None), shared.NO_CLIP_QKV, shared.NO_SLIDING_WINDOW,
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
