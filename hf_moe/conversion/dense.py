"""Dense source families for upcycling: what their configs mean in MoEConfig terms and which keys they hold.

Supported: Llama, Mistral, Qwen2, Qwen3 -- pre-norm decoders with SwiGLU FFNs and RoPE GQA attention that
our GQA path reproduces exactly (same parameter names as ours). Anything our attention cannot express
(MLP biases, partial rotary, per-layer sliding windows, ...) is refused with the field that causes it.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
)  # fmt: skip


def _refuse(cfg: PreTrainedConfig, field: str, why: str) -> ValueError:
    return ValueError(
        f"Cannot upcycle {cfg.model_type}: config {field}={getattr(cfg, field, None)!r} {why}."
    )


def _sliding_window(cfg: PreTrainedConfig) -> int | None:
    """The window when every layer uses it, None when none does; refuse a mix (Qwen's max_window_layers)."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if window is None:
        return None
    if layer_types is None:  # Mistral: the window applies to every layer
        return window
    kinds = set(layer_types[: cfg.num_hidden_layers])
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    raise _refuse(
        cfg, "layer_types",
        "mixes sliding and full attention (use_sliding_window with max_window_layers): hf_moe's sliding_window "
        "applies to every layer",
    )  # fmt: skip


def moe_fields_from_dense(cfg: PreTrainedConfig) -> dict[str, Any]:
    """MoEConfig fields (model shape and attention) of a dense transformers config; raises ValueError naming
    the field for what our GQA attention or SwiGLU FFN cannot express."""
    family = cfg.model_type
    if family not in DENSE_FAMILIES:
        raise ValueError(
            f"Cannot upcycle model_type={family!r}: supported dense families are {DENSE_FAMILIES} (whose attention "
            "hf_moe's GQA path reproduces exactly). For MoE checkpoints use hf_moe.convert."
        )
    if getattr(cfg, "mlp_bias", False):
        raise _refuse(cfg, "mlp_bias", "is not supported: hf_moe FFNs and experts have no biases")
    rope = copy.deepcopy(dict(cfg.rope_parameters or {}))
    if float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise _refuse(cfg, "partial_rotary_factor", "is not supported: hf_moe rotates the whole head")
    fields = {name: getattr(cfg, name) for name in _COMMON}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if family == "qwen2":  # q/k/v always carry a bias, o_proj never
        bias, out_bias = True, False
    else:  # Llama, Qwen3: one flag for q/k/v/o; Mistral: none
        bias = out_bias = bool(getattr(cfg, "attention_bias", False))
    fields.update(
        attention_type="gqa", head_dim=head_dim, attention_bias=bias, attention_out_bias=out_bias,
        qk_norm="head" if family == "qwen3" else None, sliding_window=_sliding_window(cfg), rope_parameters=rope,
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
    )  # fmt: skip
    if getattr(cfg, "dtype", None) is not None:
        fields["dtype"] = cfg.dtype
    return fields


def dense_layer_shapes(fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys (relative to `model.layers.{i}.`) and shapes of one dense decoder layer of these MoEConfig fields."""
    hidden, inter, head = fields["hidden_size"], fields["intermediate_size"], fields["head_dim"]
    q, kv = fields["num_attention_heads"] * head, fields["num_key_value_heads"] * head
    shapes = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }  # fmt: skip
    if fields["attention_bias"]:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if fields["attention_out_bias"]:
        shapes["self_attn.o_proj.bias"] = (hidden,)
    if fields["qk_norm"] == "head":
        shapes.update({"self_attn.q_norm.weight": (head,), "self_attn.k_norm.weight": (head,)})
    return shapes


def dense_global_shapes(fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes outside the decoder layers (no lm_head when the embeddings are tied)."""
    shapes = {"model.embed_tokens.weight": (fields["vocab_size"], fields["hidden_size"]),
              "model.norm.weight": (fields["hidden_size"],)}  # fmt: skip
    if not fields["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (fields["vocab_size"], fields["hidden_size"])
    return shapes


__all__ = ["DENSE_FAMILIES", "dense_global_shapes", "dense_layer_shapes", "moe_fields_from_dense"]
