"""Pieces several family records are made of: key rows of transformers' standard modules, config fields and
refusals that a group of families spells alike (DeepSeek's MLA, the softmax GQA families, Qwen's layer
pattern, the dense decoders hf_moe upcycles). A piece used by one family stays in that family's file."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ...modeling.configuration import MoEConfig
from ..records import Refusal, refuse_import
from ..tables import Rule, same

# ---------------------------------------------------------------------------------------------- key rows
NORMS = same("", "input_layernorm.weight", "post_attention_layernorm.weight")
DENSE_MLP = same("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
MLA_ATTENTION = same(
    "self_attn.",
    "q_proj.weight", "q_a_proj.weight", "q_a_proj.bias", "q_a_layernorm.weight", "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias", "kv_a_layernorm.weight", "kv_b_proj.weight",
    "o_proj.weight", "o_proj.bias",
)  # fmt: skip
GQA_ATTENTION = same(
    "self_attn.",
    "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
    "o_proj.weight", "o_proj.bias", "q_norm.weight", "k_norm.weight",
)  # fmt: skip
#: a pre-norm decoder layer with GQA attention and a SwiGLU FFN, spelled as ours (Llama and its kin; the dense
#: layers of Mixtral, Qwen-MoE and OLMoE, whose MoE layers add routed experts)
DENSE_DECODER_LAYER = NORMS + GQA_ATTENTION + DENSE_MLP
#: the same with DeepSeek's MLA attention
MLA_DECODER_LAYER = NORMS + MLA_ATTENTION + DENSE_MLP
#: DeepSeek-V3's multi-token-prediction module k (also GLM-4.5's): ours `mtp.{k}.*`, theirs `model.layers.{N+k}.*`;
#: its decoder block takes the layer rows, and the shared head row is completed at bind time (it names the
#: embedding when the head is tied)
DEEPSEEK_MTP = same("", "enorm.weight", "hnorm.weight", "eh_proj.weight") + (
    Rule("norm.weight", ("shared_head.norm.weight",)),
    Rule("^model.embed_tokens.weight", ("^model.embed_tokens.weight", "embed_tokens.weight"), "duplicate"),
)
SHARED_EXPERTS = same("mlp.shared_experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def routed_experts(
    orig_prefix: str = "mlp.", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj", bias: bool = False
) -> tuple[Rule, ...]:
    """Router and routed-expert rows; `orig_prefix`/`gate`/`up`/`down` spell the original checkpoints.
    `bias`: the family has DeepSeek-V3's balancing bias; without it import makes a zero one and export
    refuses a non-zero one."""
    renamed = orig_prefix != "mlp."
    rows = [
        Rule("mlp.gate.weight", ("mlp.gate.weight",), layout="transformers" if renamed else None),
        Rule("mlp.experts.gate_up_proj", ("mlp.experts.gate_up_proj",), layout="transformers"),
        Rule("mlp.experts.down_proj", ("mlp.experts.down_proj",), layout="transformers"),
        Rule(
            "mlp.experts.gate_up_proj",
            (f"{orig_prefix}experts.{{expert}}.{gate}.weight", f"{orig_prefix}experts.{{expert}}.{up}.weight"),
            "stack_cat",
            layout="original",
        ),
        Rule("mlp.experts.down_proj", (f"{orig_prefix}experts.{{expert}}.{down}.weight",), "stack", layout="original"),
    ]
    if renamed:
        rows.append(Rule("mlp.gate.weight", (f"{orig_prefix}gate.weight",), layout="original"))
    bias_key = "mlp.gate.e_score_correction_bias"
    if bias:
        rows.append(Rule(bias_key, (bias_key,)))
    elif not renamed:
        rows.append(Rule(bias_key, ("mlp.gate.weight",), "zeros"))
    else:
        rows.append(Rule(bias_key, ("mlp.gate.weight",), "zeros", layout="transformers"))
        rows.append(Rule(bias_key, (f"{orig_prefix}gate.weight",), "zeros", layout="original"))
    return tuple(rows)


# ------------------------------------------------------------------------------------ refusals (export)
def attention(kind: str) -> Refusal:
    return Refusal("attention_type", lambda c: c.attention_type == kind, f"but {{family}} uses {kind}")


MIXTURE = Refusal("n_routed_experts", lambda c: c.n_routed_experts > 0, "but {family} is a mixture of experts")
SOFTMAX_FIRST = Refusal("topk_before_softmax", lambda c: not c.topk_before_softmax,
                        "but {family}'s router takes softmax over all experts first")  # fmt: skip
NO_SHARED_EXPERTS = Refusal("shared_intermediate_size", lambda c: c.shared_intermediate_size == 0,
                            "but {family} has no shared experts")  # fmt: skip
NO_CLIP_QKV = Refusal("clip_qkv", lambda c: c.clip_qkv is None, "but {family} does not clip q/k/v")
NO_SLIDING_WINDOW = Refusal("sliding_window", lambda c: c.sliding_window is None,
                            "but {family} has no sliding window on every layer")  # fmt: skip
EVERY_LAYER_MOE = (
    Refusal("first_k_dense_replace", lambda c: c.first_k_dense_replace == 0, "but every {family} layer is MoE"),
    Refusal("moe_layer_freq", lambda c: c.moe_layer_freq == 1, "but every {family} layer is MoE"),
)
ONE_ATTENTION_BIAS = Refusal("attention_out_bias", lambda c: c.attention_out_bias == c.attention_bias,
                             "but {family} has one attention_bias flag for q/k/v and o_proj")  # fmt: skip


def qk_norm(kind: str | None) -> Refusal:
    return Refusal("qk_norm", lambda c: c.qk_norm == kind, f"but {{family}} has qk_norm {kind!r}")


#: the softmax routers of Mixtral, Qwen and OLMoE: no groups, no scaling (top-k before softmax is the same
#: function as renormalised softmax, so it is allowed)
SOFTMAX_ROUTER = (
    attention("gqa"), MIXTURE,
    Refusal("scoring_func", lambda c: c.scoring_func == "softmax", "but {family}'s router uses softmax"),
    Refusal("n_group", lambda c: c.n_group == 1, "but {family} has no group-limited routing"),
    Refusal("routed_scaling_factor", lambda c: c.routed_scaling_factor == 1, "but {family} does not scale gate values"),
)  # fmt: skip

#: the epsilon transformers' MLA classes (DeepSeek-V2/V3, GLM-4.7-Flash) give the q_a/kv_a norms: their RMSNorm's
#: default, whatever rms_norm_eps is
MLA_LATENT_EPS = 1e-6
LATENT_EPS = Refusal("latent_norm_eps", lambda c: (c.latent_norm_eps or c.rms_norm_eps) == MLA_LATENT_EPS,
                     f"but {{family}}'s q_a/kv_a norms use eps={MLA_LATENT_EPS}")
#: DeepSeek-V2/V3: MLA, n_shared_experts experts of moe_intermediate_size, every layer after the dense ones MoE
DEEPSEEK = (
    attention("mla"), MIXTURE, SOFTMAX_FIRST, LATENT_EPS,
    Refusal("attention_out_bias", lambda c: c.attention_out_bias == c.attention_bias,
            "but {family} has one attention_bias flag for q_a/kv_a and o_proj"),
    Refusal("moe_layer_freq", lambda c: c.moe_layer_freq == 1,
            "but {family} makes every layer after the dense ones MoE"),
    Refusal("shared_expert_gate", lambda c: not c.shared_expert_gate, "but {family} has no shared-expert gate"),
    Refusal("shared_expert_intermediate_size",
            lambda c: c.shared_intermediate_size > 0 and c.shared_intermediate_size % c.moe_intermediate_size == 0,
            "but {family}'s shared experts are n_shared_experts > 0 experts of moe_intermediate_size"),
)  # fmt: skip

# ----------------------------------------------------------------------------------- DeepSeek config
DEEPSEEK_IMPORT = (
    Refusal("n_shared_experts", lambda hf: hf.n_shared_experts != 0,
            "transformers builds zero-width shared experts for it, which hf_moe does not store"),
)  # fmt: skip


def mla_fields(hf: PreTrainedConfig, rope_interleave: bool) -> dict[str, Any]:
    """MoEConfig fields of a DeepSeek-V2/V3 config: MLA attention, experts, balance losses."""
    return dict(
        attention_type="mla", q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_rope_head_dim=hf.qk_rope_head_dim, qk_nope_head_dim=hf.qk_nope_head_dim, v_head_dim=hf.v_head_dim,
        rope_interleave=rope_interleave, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
        intermediate_size=hf.intermediate_size, n_routed_experts=hf.n_routed_experts,
        num_experts_per_tok=hf.num_experts_per_tok, moe_intermediate_size=hf.moe_intermediate_size,
        n_shared_experts=hf.n_shared_experts, first_k_dense_replace=hf.first_k_dense_replace or 0,
        moe_layer_freq=1, routed_scaling_factor=hf.routed_scaling_factor, **_deepseek_losses(hf),
        latent_norm_eps=None if hf.rms_norm_eps == MLA_LATENT_EPS else MLA_LATENT_EPS,
    )  # fmt: skip


def _deepseek_losses(hf: PreTrainedConfig) -> dict[str, float]:
    """DeepSeek's released config.json files carry `aux_loss_alpha` and `seq_aux` (its remote code's balance
    loss: sequence-wise when seq_aux); transformers' config classes keep them as extra attributes."""
    alpha = getattr(hf, "aux_loss_alpha", None)
    if not alpha:
        return {}
    return {"seq_aux_loss_alpha": alpha} if getattr(hf, "seq_aux", False) else {"aux_loss_alpha": alpha}


def mla_config(cfg: MoEConfig) -> dict[str, Any]:
    """DeepSeek-V2/V3 config fields of an MoEConfig (MLA attention and experts)."""
    return dict(
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
        num_key_value_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        n_routed_experts=cfg.n_routed_experts, moe_intermediate_size=cfg.moe_intermediate_size,
        n_shared_experts=cfg.shared_intermediate_size // cfg.moe_intermediate_size,
        first_k_dense_replace=cfg.first_k_dense_replace, routed_scaling_factor=cfg.routed_scaling_factor,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
    )  # fmt: skip


# -------------------------------------------------------------------------- softmax GQA families' config
def gqa_fields(hf: PreTrainedConfig) -> dict[str, Any]:
    """MoEConfig fields of a Mixtral/Qwen/OLMoE config: GQA attention and a softmax router that trains with a
    Switch-style balance loss (`MoEFamily.switch_loss`), not the bias."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, head_dim=head_dim,
        n_routed_experts=hf.num_experts if hasattr(hf, "num_experts") else hf.num_local_experts,
        num_experts_per_tok=hf.num_experts_per_tok, scoring_func="softmax", topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=0,
        router_bias_update_rate=0.0, aux_loss_alpha=getattr(hf, "router_aux_loss_coef", 0.0),
    )  # fmt: skip


def gqa_config(cfg: MoEConfig) -> dict[str, Any]:
    """Mixtral/Qwen/OLMoE config fields of an MoEConfig (GQA attention, top-k; head_dim when not the default)."""
    fields: dict[str, Any] = dict(num_key_value_heads=cfg.num_key_value_heads,
                                  num_experts_per_tok=cfg.num_experts_per_tok)  # fmt: skip
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.head_dim
    return fields


def renormalised(cfg: MoEConfig) -> bool:
    """Whether the top-k gate values sum to one: renormalised, or top-k taken before the softmax (the same function
    of the logits)."""
    return cfg.norm_topk_prob or cfg.topk_before_softmax


def qwen_layer_pattern(hf: PreTrainedConfig) -> dict[str, int]:
    """Qwen's `decoder_sparse_step` / `mlp_only_layers` as first_k_dense_replace / moe_layer_freq."""
    n = hf.num_hidden_layers
    mlp_only = set(hf.mlp_only_layers or [])
    step = hf.decoder_sparse_step
    moe = [i for i in range(n) if i not in mlp_only and hf.num_experts > 0 and (i + 1) % step == 0]
    if not moe:
        return dict(first_k_dense_replace=n, moe_layer_freq=1)
    first = moe[0]
    freq = moe[1] - moe[0] if len(moe) > 1 else max(1, n - first)
    if moe != list(range(first, n, freq)):
        raise refuse_import(
            hf, "mlp_only_layers",
            f"with decoder_sparse_step={step} it gives MoE layers {moe}; hf_moe places MoE layers as "
            "first_k_dense_replace + j * moe_layer_freq and cannot express this set",
        )  # fmt: skip
    return dict(first_k_dense_replace=first, moe_layer_freq=freq)


def qwen_layer_config(cfg: MoEConfig) -> dict[str, Any]:
    """Qwen2-MoE/Qwen3-MoE config fields of an MoEConfig: experts, and its MoE layers as decoder_sparse_step
    plus mlp_only_layers."""
    freq, first = cfg.moe_layer_freq, cfg.first_k_dense_replace
    step = freq if (first + 1) % freq == 0 else 1
    mlp_only = [i for i in range(cfg.num_hidden_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i)]
    return dict(
        intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.n_routed_experts, decoder_sparse_step=step, mlp_only_layers=mlp_only,
        norm_topk_prob=renormalised(cfg),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- dense decoders
def _window_kind(hf: PreTrainedConfig) -> str:
    """"none", "all" (the window applies to every layer) or "mixed" (Qwen's max_window_layers)."""
    if getattr(hf, "sliding_window", None) is None:
        return "none"
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:  # Mistral: the window applies to every layer
        return "all"
    kinds = set(layer_types[: hf.num_hidden_layers])
    if kinds == {"full_attention"}:
        return "none"
    return "all" if kinds == {"sliding_attention"} else "mixed"


def _rotary_factor(hf: PreTrainedConfig) -> float:
    rope = dict(hf.rope_parameters or {})
    return float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0)


#: what hf_moe's GQA attention and bias-free SwiGLU FFN cannot express, refused for every dense decoder
DENSE_IMPORT = (
    Refusal("mlp_bias", lambda hf: not getattr(hf, "mlp_bias", False), "hf_moe FFNs and experts have no biases"),
    Refusal("partial_rotary_factor", lambda hf: _rotary_factor(hf) == 1.0,
            "the family's rotation (Llama's) rotates the whole head"),
    Refusal("layer_types", lambda hf: _window_kind(hf) != "mixed",
            "it mixes sliding and full attention (use_sliding_window with max_window_layers): hf_moe's "
            "sliding_window applies to every layer"),
)  # fmt: skip


def dense_fields(hf: PreTrainedConfig, attention_bias: bool, attention_out_bias: bool,
                 qk_norm: str | None = None) -> dict[str, Any]:  # fmt: skip
    """MoEConfig fields (model shape and GQA attention) of a dense decoder config; `attention_bias` for q/k/v,
    `attention_out_bias` for o_proj, `qk_norm` as in MoEConfig."""
    return dict(
        attention_type="gqa", num_key_value_heads=hf.num_key_value_heads, intermediate_size=hf.intermediate_size,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        attention_bias=attention_bias, attention_out_bias=attention_out_bias, qk_norm=qk_norm,
        sliding_window=hf.sliding_window if _window_kind(hf) == "all" else None,
    )  # fmt: skip


def one_attention_bias(hf: PreTrainedConfig) -> bool:
    """Llama's and Qwen3's single `attention_bias` flag for q/k/v and o_proj (absent: no biases)."""
    return bool(getattr(hf, "attention_bias", False))
