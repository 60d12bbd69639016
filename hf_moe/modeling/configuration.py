"""MoEConfig: one configuration for the DeepSeek-style Mixture-of-Experts family.

Field names follow transformers' DeepseekV3Config where one exists, so a DeepSeek config maps 1:1; new knobs
get plain names.

Validation lives here, in one place, and every error names the field, the value and what is allowed:
- each field on its own (`check_field`: its annotated type, finiteness, its range) whenever it is set, at
  construction and on assignment (`config.rms_norm_eps = -1` raises, as transformers' own configs refuse a
  wrong type on assignment);
- the fields together (`validate_moe`: top-k <= experts, groups dividing experts, pad_token_id < vocab_size...)
  at construction, at `save_pretrained` and when a model is built from the config.
Errors are `ConfigFieldError` (a ValueError; `ConfigFieldTypeError` for a wrong type is also a TypeError); a
config.json with a bad value names the file too.

Field annotations stay strings (`from __future__ import annotations`), so huggingface_hub's `@strict` does not
type-check them itself (it would raise its own StrictDataclassFieldValidationError, neither a ValueError nor a
TypeError, before our range checks): `check_field` checks the same annotations, with bool refused where an int
is expected and an int accepted where a float is (PEP 484's numeric tower).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Callable
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .kernel_hooks import get_kernel

ATTENTION_TYPES = ("mla", "gqa")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc", "sparsemixer")
QK_NORM_TYPES = ("head", "full")
ROUTER_TYPES = ("learned", "hash", "expert_choice", "balanced_assignment")
BALANCE_LOSS_SCOPES = ("micro_batch", "global_batch")
GLU_TYPES = ("glu", "gpt_oss")
NORM_TYPES = ("rms_norm", "layer_norm")
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # transformers' spellings
SUBLAYER_NORMS = ("pre", "post")
CONFIG_NAME = "config.json"
#: MLA's per-head and latent widths when an MLA config leaves them None (DeepSeek-V2-Lite-like proportions).
MLA_DEFAULTS = {"kv_lora_rank": 256, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64}
#: Fields only MLA reads: None in every GQA config, so no tool mistakes a GQA model for an MLA one.
MLA_ONLY_FIELDS = ("q_lora_rank", *MLA_DEFAULTS)
#: Fields only GQA reads: None in every MLA config (refused there). `num_key_value_heads` and `head_dim` are set
#: for MLA too, derived (= num_attention_heads, = qk_rope_head_dim) as in DeepseekV3Config, because transformers'
#: RoPE, cache and generation code reads them for every model.
GQA_ONLY_FIELDS = ("qk_norm", "clip_qkv", "sliding_window")


# ------------------------------------------------------------------------------------------------- errors
class ConfigFieldError(ValueError):
    """A bad MoEConfig value: names the field, the value, what is allowed and (when read from one) the file."""

    def __init__(self, field: str, value: Any, allowed: str, source: str | None = None) -> None:
        self.field, self.value, self.allowed, self.source = field, value, allowed, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}MoEConfig.{field}={value!r} is invalid: {allowed}.")

    def __reduce__(self) -> tuple:
        return type(self), (self.field, self.value, self.allowed, self.source)

    def located(self, source: str) -> ConfigFieldError:
        """The same error, naming the file the value came from (kept when it names one already)."""
        return self if self.source else type(self)(self.field, self.value, self.allowed, source)


class ConfigFieldTypeError(ConfigFieldError, TypeError):
    """A MoEConfig value of the wrong type (both a ValueError and a TypeError)."""


# -------------------------------------------------------------------------------------- per-field rules
Rule = tuple[Callable[[Any], bool], str]  # (test of a non-None value of the right type, what is allowed)


def _finite(test: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda value: math.isfinite(value) and test(value)


def _activation(value: str) -> bool:
    from transformers.activations import ACT2FN

    return value in ACT2FN


def _rope(value: dict) -> bool:
    """transformers validates the RoPE type and its keys (`validate_rope`); the numbers it leaves are ours."""
    positive = [value.get(key) for key in ("rope_theta", "factor") if value.get(key) is not None]
    partial = value.get("partial_rotary_factor")
    numbers = [*positive, *([] if partial is None else [partial])]
    if any(isinstance(n, bool) or not isinstance(n, (int, float)) for n in numbers):
        return False
    return all(math.isfinite(n) and n > 0 for n in positive) and (partial is None or 0 < partial <= 1)


_ANY: Rule | None = None  # any value of the annotated type
_POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
_AT_LEAST_1: Rule = (lambda v: v >= 1, "must be >= 1")
_FINITE_POSITIVE: Rule = (_finite(lambda v: v > 0), "must be a finite number > 0")
_FINITE_NON_NEGATIVE: Rule = (_finite(lambda v: v >= 0), "must be a finite number >= 0")
_PROBABILITY: Rule = (lambda v: 0 <= v < 1, "must be a probability in [0, 1)")  # NaN fails both comparisons
_TOKEN_ID: Rule = (lambda v: v >= 0, "must be None or a token id in [0, vocab_size)")


def _one_of(options: tuple) -> Rule:
    return (lambda v: v in options, f"allowed values are {options}")


#: Every field declared by MoEConfig -> its rule (checked with the field's type on every assignment).
#: Rules that need other fields (top-k <= experts, pad_token_id < vocab_size, ...) are in `validate_moe`.
FIELD_RULES: dict[str, Rule | None] = {
    # model shape
    "vocab_size": _POSITIVE, "hidden_size": _POSITIVE, "intermediate_size": _POSITIVE,
    "num_hidden_layers": _POSITIVE, "num_attention_heads": _POSITIVE, "max_position_embeddings": _POSITIVE,
    "hidden_act": (_activation, "allowed values are transformers' activations (transformers.activations.ACT2FN)"),
    "initializer_range": _FINITE_NON_NEGATIVE, "rms_norm_eps": _FINITE_POSITIVE, "use_cache": _ANY,
    # pad_token_id is the embedding's padding_idx (-1 would silently freeze the last row); bos/eos only steer
    # generation, and out of the vocabulary transformers warns (validate_token_ids) as Hub configs carry such
    # ids (and a preset shrunk to a small vocab_size keeps its eos): type-checked only
    "pad_token_id": _TOKEN_ID, "bos_token_id": _ANY, "eos_token_id": _ANY, "tie_word_embeddings": _ANY,
    # attention
    "attention_type": _one_of(ATTENTION_TYPES), "q_lora_rank": _POSITIVE, "kv_lora_rank": _POSITIVE,
    "qk_rope_head_dim": _POSITIVE, "qk_nope_head_dim": _POSITIVE, "v_head_dim": _POSITIVE, "rope_interleave": _ANY,
    "num_key_value_heads": _POSITIVE, "head_dim": _POSITIVE, "attention_bias": _ANY, "attention_out_bias": _ANY,
    "qk_norm": _one_of(QK_NORM_TYPES), "clip_qkv": _FINITE_POSITIVE, "sliding_window": _POSITIVE,
    "rope_parameters": (_rope, "rope_theta and factor must be finite numbers > 0, partial_rotary_factor in (0, 1]"),
    "attention_dropout": _PROBABILITY,
    # attention, per layer and its variants (glm4_moe, dots1, hunyuan, exaone_moe, granite... families)
    "layer_types": (lambda v: all(t in LAYER_TYPES for t in v), f"every entry must be one of {LAYER_TYPES}"),
    "attention_chunk_size": _POSITIVE,
    "nope_layers": (lambda v: all(i >= 0 for i in v) and len(set(v)) == len(v),
                    "must be distinct layer indices >= 0 (layers without RoPE)"),
    "qk_norm_after_rope": _ANY, "qk_norm_weight": _ANY, "qk_norm_skip_nope": _ANY, "latent_norm_eps": _FINITE_POSITIVE,
    "attention_temperature_scale": _FINITE_POSITIVE, "attention_temperature_floor": _POSITIVE,
    "attention_multiplier": _FINITE_POSITIVE, "embedding_multiplier": _FINITE_POSITIVE,
    "residual_multiplier": _FINITE_POSITIVE, "logits_scaling": _FINITE_POSITIVE,
    "sublayer_norm": _one_of(SUBLAYER_NORMS),
    # experts
    "n_routed_experts": _NON_NEGATIVE, "num_experts_per_tok": _AT_LEAST_1, "moe_intermediate_size": _POSITIVE,
    "n_shared_experts": _NON_NEGATIVE, "shared_expert_intermediate_size": _NON_NEGATIVE, "shared_expert_gate": _ANY,
    "first_k_dense_replace": _NON_NEGATIVE, "moe_layer_freq": _AT_LEAST_1,
    # router
    "scoring_func": _one_of(SCORING_FUNCS), "topk_before_softmax": _ANY, "topk_method": _one_of(TOPK_METHODS),
    "n_group": _AT_LEAST_1, "topk_group": _AT_LEAST_1, "norm_topk_prob": _ANY,
    "routed_scaling_factor": _FINITE_POSITIVE, "router_bias_update_rate": _FINITE_NON_NEGATIVE,
    "router_bias_update_zero_mean": _ANY, "router_jitter_noise": _PROBABILITY,
    "router_logit_noise": _FINITE_NON_NEGATIVE, "capacity_factor": _FINITE_POSITIVE,
    # FFN, router and norm variants (families beyond DeepSeek)
    "mlp_bias": _ANY, "expert_bias": _ANY, "router_bias": _ANY, "lm_head_bias": _ANY,
    "glu_type": _one_of(GLU_TYPES), "glu_limit": _FINITE_POSITIVE, "glu_alpha": _FINITE_POSITIVE,
    "norm_type": _one_of(NORM_TYPES), "norm_bias": _ANY, "norm_topk_p": _FINITE_POSITIVE,
    "norm_topk_min": _FINITE_POSITIVE, "gate_on_expert_input": _ANY, "sparsemixer_eps": _FINITE_NON_NEGATIVE,
    "last_k_dense_replace": _NON_NEGATIVE, "attention_sinks": _ANY, "moe_output_bias": _ANY,
    "moa_experts": _NON_NEGATIVE, "moa_top_k": _AT_LEAST_1,
    # training objectives
    "aux_loss_alpha": _FINITE_NON_NEGATIVE, "device_aux_loss_alpha": _FINITE_NON_NEGATIVE,
    "aux_loss_num_devices": _AT_LEAST_1, "seq_aux_loss_alpha": _FINITE_NON_NEGATIVE,
    "router_z_loss_coef": _FINITE_NON_NEGATIVE, "num_nextn_predict_layers": _NON_NEGATIVE,
    "mtp_loss_weight": _FINITE_NON_NEGATIVE, "output_router_logits": _ANY,
    # router types and balancing scope (issue 16)
    "router_type": _one_of(ROUTER_TYPES), "hash_seed": _NON_NEGATIVE,
    "expert_choice_capacity_factor": _FINITE_POSITIVE, "balance_loss_scope": _one_of(BALANCE_LOSS_SCOPES),
    "comm_balance_alpha": _FINITE_NON_NEGATIVE,
    # provenance
    "upcycled_from": _ANY,
}  # fmt: skip


def _matches(value: Any, hint: Any) -> bool:
    """isinstance for the annotations MoEConfig uses; bool is not an int, an int is a float (numeric tower)."""
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or typing.is_typeddict(hint):
        return isinstance(value, dict)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(arg) for arg in typing.get_args(hint)))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict or typing.is_typeddict(hint):
        return "dict"
    return {float: "number (int or float)"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_field(field: str, value: Any) -> None:
    """Raise ConfigFieldTypeError / ConfigFieldError unless `value` has the field's type and passes its rule."""
    hint = _field_types()[field]
    if not _matches(value, hint):
        allowed = f"expected {_type_name(hint)}, got {type(value).__name__}"
        if isinstance(value, bool) and "int" in allowed:
            allowed += " (a bool is not accepted as an int)"
        raise ConfigFieldTypeError(field, value, allowed)
    rule = FIELD_RULES[field]
    if rule is not None and value is not None and not rule[0](value):
        raise ConfigFieldError(field, value, rule[1])


@functools.cache
def _field_types() -> dict[str, Any]:
    """MoEConfig's own field annotations, evaluated (they are strings in this module)."""
    return inspect.get_annotations(MoEConfig, eval_str=True)


@strict
class MoEConfig(PreTrainedConfig):
    r"""Configuration of an hf_moe model (`model_type="hf_moe"`).

    Model shape:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings: as in Llama.
        intermediate_size (`int`): width of the dense FFN used by dense layers (`first_k_dense_replace`,
            `moe_layer_freq`).
        hidden_act (`str`): activation of every SwiGLU-style FFN (dense, shared, routed).
        rms_norm_eps (`float`), initializer_range (`float`), tie_word_embeddings (`bool`).

    Attention:
        attention_type (`str`): "mla" (multi-head latent attention, DeepSeek-V2/V3) or "gqa" (grouped-query
            attention; MHA when `num_key_value_heads == num_attention_heads`).
        q_lora_rank (`int | None`): MLA query compression rank; None projects queries directly.
        kv_lora_rank (`int | None`): MLA latent width (what the cache stores, with the rope key).
        qk_rope_head_dim / qk_nope_head_dim / v_head_dim (`int | None`): MLA per-head dims (decoupled RoPE).
            These four are MLA-only (`MLA_ONLY_FIELDS`): under attention_type="gqa" they are stored as None
            whatever was passed; under "mla" a None takes `MLA_DEFAULTS` (256, 32, 64, 64).
        rope_interleave (`bool`): MLA rotary dims stored as interleaved pairs (DeepSeek's checkpoints).
        num_key_value_heads (`int | None`): GQA key/value heads (None = num_attention_heads).
        head_dim (`int | None`): GQA head size (None = hidden_size // num_attention_heads). For MLA it is
            derived and equals `qk_rope_head_dim` (the rotary width, what transformers' RoPE code reads).
        attention_bias (`bool`): bias on the q/k/v projections (MLA: on q_a_proj and kv_a_proj_with_mqa).
        attention_out_bias (`bool`): bias on o_proj.
        qk_norm, clip_qkv, sliding_window are GQA-only (`GQA_ONLY_FIELDS`): an MLA config refuses a value.
        qk_norm (`str | None`): GQA query/key RMSNorm: "head" (per head, Qwen3) or "full" (over the whole
            projection, OLMoE); None for no norm.
        clip_qkv (`float | None`): clamp q/k/v to [-clip_qkv, clip_qkv] (OLMoE).
        sliding_window (`int | None`): GQA sliding-window size (Mixtral): of every layer, or of the
            "sliding_attention" layers of `layer_types`; None for full attention.
        rope_parameters (`dict`): transformers' RoPE parameters (rope_theta, rope_type, yarn factor/mscale...).
        attention_dropout (`float`).

    Attention per layer and its variants:
        layer_types (`list[str] | None`): per decoder layer "full_attention", "sliding_attention" (a window of
            `sliding_window`) or "chunked_attention" (blocks of `attention_chunk_size`, Llama 4), transformers'
            spellings; None = every layer sliding when `sliding_window` is set, else full. GQA only.
        attention_chunk_size (`int | None`): chunk size of "chunked_attention" layers.
        nope_layers (`list[int] | None`): indices of layers without rotary embeddings (NoPE; Llama 4, SmolLM3,
            EXAONE-MoE's full-attention layers); None = every layer rotates. GQA only.
        qk_norm_after_rope (`bool`): apply the q/k norm after RoPE (Hunyuan-MoE) rather than before (Qwen3).
        qk_norm_weight (`bool`): the q/k norm has a learned weight; False = weightless RMS (L2) norm (Llama 4).
        qk_norm_skip_nope (`bool`): the q/k norm runs only on the layers that rotate; `nope_layers` have none
            (Llama 4). Needs qk_norm.
        attention_temperature_scale (`float | None`): attention temperature tuning on the NoPE layers (Llama 4,
            after Nakanishi 2025, arXiv 2501.19399): their queries are multiplied by
            1 + scale * ln(1 + floor((t + 1) / attention_temperature_floor)), t the token's index in the sequence
            (cached tokens plus its offset; left padding counts, as in transformers' Llama 4). None = off. GQA only.
        attention_temperature_floor (`int`): the token span of one step of that temperature (Llama 4: 8192).
        latent_norm_eps (`float | None`): epsilon of MLA's q_a/kv_a RMSNorms; None = rms_norm_eps
            (transformers' DeepSeek-V2/V3 and GLM-4.7-Flash classes use 1e-6 whatever rms_norm_eps is).
        attention_multiplier (`float | None`): softmax scale of q.k (muP, Granite); None = qk_head_dim^-0.5
            (with YaRN's mscale for MLA).
        embedding_multiplier (`float`): token embeddings are multiplied by it (muP, Granite).
        residual_multiplier (`float`): attention and FFN outputs are multiplied by it before the residual
            add (muP, Granite).
        logits_scaling (`float`): logits are divided by it (muP, Granite).
        sublayer_norm (`str`): where each decoder layer's RMSNorms sit: "pre" (on the attention and FFN inputs,
            Llama) or "post" (on their outputs, before the residual add: OLMo 2, FlexOlmo).

    Experts:
        n_routed_experts (`int`): routed experts per MoE layer (N).
        num_experts_per_tok (`int`): experts chosen per token (K).
        moe_intermediate_size (`int`): width of one routed expert.
        n_shared_experts (`int`): shared experts (always active); 0 for none.
        shared_expert_intermediate_size (`int | None`): total width of the shared FFN
            (None = n_shared_experts * moe_intermediate_size).
        shared_expert_gate (`bool`): scale the shared output by sigmoid(x w) as Qwen2-MoE does.
        first_k_dense_replace (`int`): the first k layers use a dense FFN.
        moe_layer_freq (`int`): after those, every `moe_layer_freq`-th layer is MoE (1 = all).

    Router:
        scoring_func (`str`): "softmax" (DeepSeek-V1/V2, Qwen, Mixtral, OLMoE) or "sigmoid" (DeepSeek-V3).
        topk_before_softmax (`bool`): softmax over the top-k logits only (Mixtral form; needs softmax).
        topk_method (`str`): "greedy" (plain top-k), "group_limited_greedy" (group score = max score in the
            group, DeepSeek-V2) or "noaux_tc" (group score = sum of the group's top-2 biased scores, V3).
        n_group / topk_group (`int`): experts are split into n_group groups; tokens choose among the
            experts of their topk_group best groups (node-limited routing). 1/1 disables.
        norm_topk_prob (`bool`): renormalise the chosen gate values to sum to 1.
        routed_scaling_factor (`float`): multiply the gate values (DeepSeek-V3: 2.5).
        router_bias_update_rate (`float`): gamma of auxiliary-loss-free balancing; the fp32 buffer
            `e_score_correction_bias` moves by +-gamma per optimizer step (0 disables).
        router_bias_update_zero_mean (`bool`): subtract the mean of each bias update (torchtitan variant).
        router_jitter_noise (`float`): multiply router inputs by U(1-eps, 1+eps) in training (Switch).
        router_logit_noise (`float`): std of Gaussian noise added to router logits in training (noisy top-k).
        capacity_factor (`float | None`): GShard/Switch capacity; tokens beyond
            ceil(capacity_factor * tokens * K / N) per expert are dropped. None = dropless.

    FFN, router and norm variants (families beyond DeepSeek; defaults are DeepSeek's):
        mlp_bias (`bool`): biases on the dense FFN and shared-expert projections (Ernie 4.5).
        expert_bias (`bool`): biases on the routed experts, `gate_up_proj_bias (N, 2I)` and
            `down_proj_bias (N, H)` (gpt-oss).
        router_bias (`bool`): a learned bias added to the router logits before anything else (gpt-oss); not the
            balancing bias `e_score_correction_bias`, which only steers the choice.
        lm_head_bias (`bool`): bias on the output head (Ernie 4.5 with use_bias, Phi-3.5-MoE).
        glu_type (`str`): the gated unit of every FFN: "glu" is act(gate) * up with `hidden_act` (SwiGLU with
            silu, GeGLU with gelu); "gpt_oss" is gate * sigmoid(glu_alpha * gate) * (up + 1) on clamped inputs.
        glu_limit (`float | None`): clamp gate to (-inf, limit] and up to [-limit, limit] before the unit
            (clamped SwiGLU; gpt-oss's swiglu_limit, needed by "gpt_oss"); None does not clamp.
        glu_alpha (`float`): the sigmoid slope of "gpt_oss" (1.702).
        norm_type (`str`): every decoder norm and the final norm: "rms_norm" or "layer_norm" (Phi-3.5-MoE, DBRX).
        norm_bias (`bool`): the LayerNorms have a bias (Phi-3.5-MoE) or not (DBRX); "layer_norm" only.
        norm_topk_p (`float`): renormalise the chosen gate values by their p-norm (DBRX's
            moe_normalize_expert_weights); 1 is their sum.
        norm_topk_min (`float`): the renormalisation denominator is at least this (Ernie's moe_norm_min).
        gate_on_expert_input (`bool`): the gate value scales the expert's input, FFN(g x), not its output
            (Llama 4).
        sparsemixer_eps (`float`): with topk_method="sparsemixer" (Phi-3.5-MoE, Liu et al. 2024: top-2, sampled
            in training with its Heun-method gradient), an expert is a candidate for the k-th choice when
            (max - s) / max(|s|, max) <= 2 eps among the remaining logits.
        last_k_dense_replace (`int`): the last k layers use a dense FFN too (Ernie's moe_layer_end_index).
        attention_sinks (`bool`): GQA heads have a learned sink logit `self_attn.sinks` (heads,) that joins each
            softmax and is dropped after it (gpt-oss); runs eager unless the attention implementation takes sinks.
        moe_output_bias (`bool`): one bias `mlp.bias` (H,) added to the routed experts' mixed output (JetMoE).
        moa_experts (`int`): mixture of attention heads (JetMoE): GQA whose query and output projections are
            `moa_experts` routed experts, `moa_top_k` per token (num_attention_heads = moa_top_k *
            num_key_value_heads; `attention_out_bias` is the bias of the mixed output); 0 = plain attention.
        moa_top_k (`int`): attention experts per token.

    Training objectives:
        aux_loss_alpha (`float`): Switch / expert-level balance loss coefficient (alpha * N * sum f_i P_i).
        device_aux_loss_alpha (`float`), aux_loss_num_devices (`int`): device-level balance loss over
            `aux_loss_num_devices` equal groups of experts.
        seq_aux_loss_alpha (`float`): sequence-wise balance loss (DeepSeek-V3 eqs. 17-20).
        router_z_loss_coef (`float`): router z-loss (ST-MoE).
        num_nextn_predict_layers (`int`): multi-token prediction depth D (0 = none).
        mtp_loss_weight (`float`): lambda of the MTP loss (lambda / D * sum_k CE_k).
        output_router_logits (`bool`): return router logits in the output.

    Router types and balancing scope:
        router_type (`str`): "learned" (the router above), "hash" (Roller et al. 2021: a fixed balanced
            token id -> K experts table, the buffer `hash_table` saved in the checkpoint; gates are the learned
            scores of the hashed experts, so K = 1 with `norm_topk_prob` is their unweighted hash layer),
            "expert_choice" (Zhou et al. 2022: each expert takes its top-C tokens of the batch; NOT causal, it
            sees future tokens, so generation refuses it) or "balanced_assignment" (BASE layers, Lewis et al.
            2021: balanced top-1 assignment in training, greedy top-1 at inference).
        hash_seed (`int`): seed of the hash table of a new model (a loaded model keeps its saved table).
        expert_choice_capacity_factor (`float`): expert choice's c: each expert takes C = ceil(c * T / N)
            of the T tokens of the batch (c = K gives K experts per token on average).
        balance_loss_scope (`str`): "micro_batch" (f_i of every balance loss counted over this forward's
            tokens) or "global_batch" (Qiu et al. 2025: f_i summed over data-parallel ranks, one all_reduce
            for all layers per forward, and over the micro-batches of the optimizer step so far; P_i stays
            local and carries the gradient). The sequence-wise loss stays per sequence.
        comm_balance_alpha (`float`): DeepSeek-V2 communication balance loss (eqs. 29-31) over the
            `n_group` device groups with device-limited routing to `topk_group` devices.

    Provenance:
        upcycled_from (`dict | None`): how a dense checkpoint became this model (base model, strategy, experts,
            granularity, router init, measured function preservation), written by `hf_moe.upcycle`; None otherwise.
    """

    model_type = "hf_moe"
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    attribute_map = {
        "num_local_experts": "n_routed_experts",
        "num_experts": "n_routed_experts",
        "num_mtp_layers": "num_nextn_predict_layers",
    }

    # model shape
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    # attention
    attention_type: str = "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None  # MLA: MLA_DEFAULTS when None; GQA: always None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: str | None = None
    clip_qkv: float | None = None
    sliding_window: int | None = None
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    # attention, per layer and its variants
    layer_types: list[str] | None = None
    attention_chunk_size: int | None = None
    nope_layers: list[int] | None = None
    qk_norm_after_rope: bool = False
    qk_norm_weight: bool = True
    qk_norm_skip_nope: bool = False
    attention_temperature_scale: float | None = None
    attention_temperature_floor: int = 8192
    latent_norm_eps: float | None = None
    attention_multiplier: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    sublayer_norm: str = "pre"
    # experts
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 352
    n_shared_experts: int = 2
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    # router
    scoring_func: str = "sigmoid"
    topk_before_softmax: bool = False
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_bias_update_rate: float = 1e-3
    router_bias_update_zero_mean: bool = False
    router_jitter_noise: float = 0.0
    router_logit_noise: float = 0.0
    capacity_factor: float | None = None
    # FFN, router and norm variants
    mlp_bias: bool = False
    expert_bias: bool = False
    router_bias: bool = False
    lm_head_bias: bool = False
    glu_type: str = "glu"
    glu_limit: float | None = None
    glu_alpha: float = 1.702
    norm_type: str = "rms_norm"
    norm_bias: bool = True
    norm_topk_p: float = 1.0
    norm_topk_min: float = 1e-20
    gate_on_expert_input: bool = False
    sparsemixer_eps: float = 0.01
    last_k_dense_replace: int = 0
    attention_sinks: bool = False
    moe_output_bias: bool = False
    moa_experts: int = 0
    moa_top_k: int = 2
    # training objectives
    aux_loss_alpha: float = 0.0
    device_aux_loss_alpha: float = 0.0
    aux_loss_num_devices: int = 1
    seq_aux_loss_alpha: float = 0.0
    router_z_loss_coef: float = 0.0
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.1
    output_router_logits: bool = False
    # router types and balancing scope (issue 16)
    router_type: str = "learned"
    hash_seed: int = 0
    expert_choice_capacity_factor: float = 2.0
    balance_loss_scope: str = "micro_batch"
    comm_balance_alpha: float = 0.0
    # provenance
    upcycled_from: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.attention_type == "mla":
            for field, default in MLA_DEFAULTS.items():
                if getattr(self, field) is None:
                    setattr(self, field, default)
        elif self.attention_type == "gqa":  # MLA-only fields mean nothing here: None, whatever was passed
            for field in MLA_ONLY_FIELDS:
                setattr(self, field, None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_type == "mla":
            # transformers' RoPE helpers read `head_dim` as the rotary width
            self.head_dim = self.qk_rope_head_dim
            self.num_key_value_heads = self.num_attention_heads
        elif self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        dtype = self.dtype if self.dtype is not None else kwargs.get("torch_dtype")
        if isinstance(dtype, str) and dtype != "auto" and not _is_torch_dtype_name(dtype):
            raise ConfigFieldError("dtype", dtype, "must be None or a torch dtype name such as 'float32' or 'bfloat16'")
        super().__post_init__(**kwargs)
        self.validate_moe()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: nope + rope for MLA, head_dim for GQA."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    def layer_type(self, layer_idx: int) -> str:
        """The attention type of decoder layer `layer_idx` (`layer_types`; MTP blocks past the last layer: full
        attention, or sliding when every layer slides)."""
        if self.layer_types is not None and layer_idx < len(self.layer_types):
            return self.layer_types[layer_idx]
        if self.layer_types is None and self.sliding_window is not None:
            return "sliding_attention"
        return "full_attention"

    def uses_rope(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` rotates its queries and keys (not one of `nope_layers`)."""
        return not self.nope_layers or layer_idx not in self.nope_layers

    @property
    def rotary_dim(self) -> int:
        """Rotated width of each query/key head: `qk_rope_head_dim` for MLA; for GQA the first
        int(head_dim * rope_parameters["partial_rotary_factor"]) dims (GPT-NeoX / GLM partial rotary; the rest
        of the head carries no position)."""
        if self.attention_type == "mla":
            return self.qk_rope_head_dim
        factor = (self.rope_parameters or {}).get("partial_rotary_factor") or 1.0
        return int(self.head_dim * factor)

    @property
    def shared_intermediate_size(self) -> int:
        """Total width of the shared-expert FFN (0 when there is none)."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def router_aux_loss_coef(self) -> float:
        """1.0, always (not a field, never saved). TRL's trainers read it as the model's coefficient of `aux_loss`;
        under TRL an hf_moe model's `aux_loss` is its MTP + balance terms, already weighted by `mtp_loss_weight`,
        `aux_loss_alpha`, `seq_aux_loss_alpha`, `device_aux_loss_alpha` and `router_z_loss_coef` (`fused_head.py`)."""
        return 1.0

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, value: Any) -> None:
        if value != 1.0:
            raise ConfigFieldError(
                "router_aux_loss_coef", value,
                "must be 1.0 (leave TRL's router_aux_loss_coef unset): hf_moe weights its own loss terms; set "
                "mtp_loss_weight, aux_loss_alpha, seq_aux_loss_alpha, device_aux_loss_alpha or router_z_loss_coef "
                "instead (0 turns a term off)")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has an MoE block (else a dense FFN)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx - self.first_k_dense_replace) % self.moe_layer_freq == 0
            and layer_idx < self.num_hidden_layers - self.last_k_dense_replace
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # -------------------------------------------------------------------------------------- validation
    def __setattr__(self, name: str, value: Any) -> None:
        """Every MoEConfig field is checked on its own whenever it is set (construction and assignment)."""
        field = type(self).attribute_map.get(name, name)
        if field in FIELD_RULES:
            check_field(field, value)
        super().__setattr__(name, value)

    def validate_moe(self) -> None:
        """Check every field, then the rules between fields; raise a ConfigFieldError (a ValueError) naming the
        field, the value and what is allowed. Runs at construction, `save_pretrained` (through `validate()`) and
        when a model is built; call it after changing several fields at once."""

        def fail(field: str, allowed: str) -> None:
            raise ConfigFieldError(field, getattr(self, field), allowed)

        for field in FIELD_RULES:  # again: values may have been changed in place (e.g. rope_parameters' dict)
            check_field(field, getattr(self, field))
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            fail("pad_token_id", f"must be None or a token id in [0, vocab_size={self.vocab_size})")
        if self.attention_type == "mla":
            for field in MLA_DEFAULTS:
                if getattr(self, field) is None:
                    fail(field, "must be a positive integer with attention_type='mla'")
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", "must be even (rotary dims come in pairs)")
            if self.qk_norm is not None or self.clip_qkv is not None or self.sliding_window is not None:
                field = "qk_norm" if self.qk_norm is not None else (
                    "clip_qkv" if self.clip_qkv is not None else "sliding_window")
                fail(field, "only supported with attention_type='gqa'")
            for field in ("layer_types", "nope_layers", "attention_chunk_size"):  # GQA only
                if getattr(self, field) is not None:
                    fail(field, "only supported with attention_type='gqa'")
            if (self.rope_parameters or {}).get("partial_rotary_factor", 1.0) != 1.0:
                fail("rope_parameters", "partial_rotary_factor must be 1 with attention_type='mla' (its rotary "
                                        "width is qk_rope_head_dim)")
        else:
            for field in MLA_ONLY_FIELDS:
                if getattr(self, field) is not None:
                    fail(field, "only used with attention_type='mla'; must be None with attention_type='gqa'")
            if self.head_dim is None or self.head_dim % 2:
                fail("head_dim", "must be a positive even integer")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                fail("rope_parameters", f"partial_rotary_factor must give an even rotary width >= 2 of "
                                        f"head_dim={self.head_dim} (got {self.rotary_dim})")
            if self.num_attention_heads % self.num_key_value_heads:
                fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                fail("layer_types", f"must list one type per layer (num_hidden_layers={self.num_hidden_layers}), "
                                    f"got {len(self.layer_types)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                fail("layer_types", "has 'sliding_attention' layers, which need sliding_window")
            if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
                fail("layer_types", "has 'chunked_attention' layers, which need attention_chunk_size")
        if self.attention_type != "mla" and self.latent_norm_eps is not None:
            fail("latent_norm_eps", "only supported with attention_type='mla' (its q_a/kv_a norms)")
        if self.qk_norm is None and (self.qk_norm_after_rope or not self.qk_norm_weight or self.qk_norm_skip_nope):
            variant = next(f for f, on in (("qk_norm_after_rope", self.qk_norm_after_rope),
                                           ("qk_norm_weight", not self.qk_norm_weight), ("qk_norm_skip_nope", True)) if on)
            fail(variant, "is a q/k norm variant: needs qk_norm")
        if self.attention_type == "mla" and self.attention_temperature_scale is not None:
            fail("attention_temperature_scale", "only supported with attention_type='gqa' (it scales NoPE layers' queries)")
        if self.nope_layers and max(self.nope_layers) >= self.num_hidden_layers:
            fail("nope_layers", f"must be layer indices below num_hidden_layers={self.num_hidden_layers}")
        if self.n_routed_experts > 0 and self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"must be between 1 and n_routed_experts={self.n_routed_experts}")
        if self.shared_expert_gate and self.shared_intermediate_size == 0:
            fail("shared_expert_gate", "needs shared experts (n_shared_experts > 0)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be between 0 and num_hidden_layers={self.num_hidden_layers}")
        if self.topk_before_softmax and self.scoring_func != "softmax":
            fail("topk_before_softmax", "needs scoring_func='softmax'")
        if self.n_routed_experts > 0 and self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be between 1 and n_group={self.n_group}")
        if self.n_group > 1 and self.n_routed_experts > 0:
            if self.topk_method == "greedy":
                fail("topk_method", "'greedy' ignores groups; use 'group_limited_greedy' or 'noaux_tc' with n_group > 1")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                fail("n_group", "noaux_tc scores groups by their top-2 experts, so groups need >= 2 experts")
            if self.topk_group * per_group < self.num_experts_per_tok:
                fail("topk_group", f"{self.topk_group} groups of {per_group} experts cannot hold "
                                   f"num_experts_per_tok={self.num_experts_per_tok} choices")
        self._validate_variants(fail)
        if self.n_routed_experts > 0 and self.n_routed_experts % self.aux_loss_num_devices:
            fail("aux_loss_num_devices", f"must be >= 1 and divide n_routed_experts={self.n_routed_experts}")
        self._validate_router_type()
        try:  # transformers' own RoPE checks (type, keys, factors), named like ours
            self.validate_rope()
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigFieldError("rope_parameters", self.rope_parameters, str(error).rstrip(".")) from None

    def _validate_router_type(self) -> None:
        """The rules between the router type / balancing-scope fields and the others (issue 16)."""

        def fail(field: str, allowed: str) -> None:
            raise ConfigFieldError(field, getattr(self, field), allowed)

        if self.comm_balance_alpha and self.n_group < 2:
            fail("comm_balance_alpha", "needs experts grouped by device (n_group >= 2 devices, topk_group = M)")
        if self.topk_method == "sparsemixer" and self.router_bias_update_rate:
            fail("router_bias_update_rate", "must be 0 with topk_method='sparsemixer' (SparseMixer chooses without "
                                            "the balancing bias, which would move without steering anything)")
        if self.router_type == "learned":
            return
        if self.topk_method == "sparsemixer":
            fail("topk_method", f"'sparsemixer' is a learned router's choice; router_type={self.router_type!r} "
                                "chooses its own way (use topk_method='greedy')")
        if self.n_group > 1:
            fail("router_type", f"{self.router_type!r} routing has no group-limited (device-limited) variant; "
                                "use router_type='learned' with n_group > 1")
        if self.capacity_factor is not None:
            fail("router_type", f"{self.router_type!r} routing does not combine with capacity_factor")
        if self.router_type in ("hash", "balanced_assignment") and self.num_nextn_predict_layers:
            fail("router_type", f"{self.router_type!r} routing is not supported in MTP blocks "
                                "(num_nextn_predict_layers must be 0)")
        if self.router_type == "balanced_assignment":
            if self.num_experts_per_tok != 1:
                fail("num_experts_per_tok", "balanced_assignment (BASE layers) routes each token to 1 expert")
            if self.scoring_func != "sigmoid" or self.norm_topk_prob:
                fail("router_type", "balanced_assignment gates with sigmoid(h w_e) (Lewis et al. eq. 2): it needs "
                                    "scoring_func='sigmoid' and norm_topk_prob=False")
        if self.router_type == "expert_choice":
            for field in ("router_bias", "router_jitter_noise", "router_logit_noise"):
                if getattr(self, field):
                    fail(field, "is not supported with router_type='expert_choice' (its scores are the plain "
                                "token-expert affinities)")
            for loss in ("aux_loss_alpha", "device_aux_loss_alpha", "seq_aux_loss_alpha"):
                if getattr(self, loss):
                    fail(loss, "must be 0 with router_type='expert_choice' (balanced by construction: every "
                               "expert takes C tokens)")

    def _validate_variants(self, fail: Callable[[str, str], None]) -> None:
        """The FFN, router and norm variants together with the rest."""
        if self.attention_sinks and self.attention_type != "gqa":
            fail("attention_sinks", "only supported with attention_type='gqa'")
        if self.moa_experts:
            if self.attention_type != "gqa" or self.attention_sinks or self.qk_norm or self.clip_qkv or self.sliding_window:
                fail("moa_experts", "mixture of attention heads is plain GQA (attention_type='gqa', no sinks, q/k norm, "
                                    "clipping or window)")
            moa_unsupported = {
                "attention_bias": self.attention_bias, "attention_multiplier": self.attention_multiplier is not None,
                "nope_layers": bool(self.nope_layers), "layer_types": self.layer_types is not None,
                "attention_temperature_scale": bool(self.attention_temperature_scale),
                "rope_parameters": self.rotary_dim != self.head_dim,
            }  # fmt: skip
            for field, used in moa_unsupported.items():
                if used:
                    fail(field, "is not supported with moa_experts (JetMoE's mixture of attention heads has unbiased "
                                "projections, 1/sqrt(d) scaling and full RoPE on every layer)")
            if self.moa_top_k > self.moa_experts:
                fail("moa_top_k", f"must be between 1 and moa_experts={self.moa_experts}")
            if self.num_attention_heads != self.moa_top_k * self.num_key_value_heads:
                fail("num_attention_heads", f"must be moa_top_k * num_key_value_heads = "
                                            f"{self.moa_top_k * self.num_key_value_heads} with moa_experts")
        if self.glu_type == "gpt_oss" and self.glu_limit is None:
            fail("glu_limit", "glu_type='gpt_oss' clamps its inputs: set glu_limit (gpt-oss: 7.0)")
        if self.first_k_dense_replace + self.last_k_dense_replace > self.num_hidden_layers:
            fail("last_k_dense_replace", f"first_k_dense_replace + last_k_dense_replace must be at most "
                                         f"num_hidden_layers={self.num_hidden_layers}")
        if self.topk_method == "sparsemixer":
            if self.num_experts_per_tok != 2 or self.scoring_func != "softmax" or self.n_group > 1:
                field = "num_experts_per_tok" if self.num_experts_per_tok != 2 else (
                    "scoring_func" if self.scoring_func != "softmax" else "n_group")
                fail(field, "topk_method='sparsemixer' chooses 2 experts by masked softmaxes (num_experts_per_tok=2, "
                            "scoring_func='softmax', n_group=1)")
            if self.topk_before_softmax or self.norm_topk_prob:
                fail("topk_before_softmax" if self.topk_before_softmax else "norm_topk_prob",
                     "topk_method='sparsemixer' makes its own gate values (set False)")

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedConfig.save_pretrained`, refusing an invalid config with our ConfigFieldError (transformers'
        `validate()` would wrap it in a StrictDataclassClassValidationError, not a ValueError)."""
        self.validate_moe()
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> MoEConfig:
        """`PreTrainedConfig.from_dict`; an invalid value read through `AutoConfig` also names the file."""
        try:
            return super().from_dict(config_dict, **kwargs)
        except ConfigFieldError as error:
            if not kwargs.get("name_or_path"):
                raise
            raise error.located(_config_file(kwargs["name_or_path"])).with_traceback(error.__traceback__) from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> MoEConfig:
        """`PreTrainedConfig.from_pretrained`; an invalid value in config.json names the file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except ConfigFieldError as error:
            source = _config_file(pretrained_model_name_or_path, kwargs.get("subfolder"))
            raise error.located(source).with_traceback(error.__traceback__) from None

    # --------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MoEConfig:
        """A configuration of a published system (`hf_moe.presets.PRESETS`, registered by `import hf_moe` as the
        "presets" hook), with overrides. Where the model runs as remote code without hf_moe there are no presets."""
        presets = get_kernel("presets")
        if presets is None:
            raise ImportError("MoEConfig.from_preset needs the hf_moe package (`pip install hf-moe`, then "
                              "`import hf_moe`): the presets do not travel with the remote code.")
        PRESETS = presets()
        if name not in PRESETS:
            raise ValueError(f"Unknown preset name={name!r}; allowed values are {sorted(PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"MoEConfig.from_preset({name!r}) got unknown fields {unknown}; see MoEConfig's docstring.")
        fields = copy.deepcopy(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)


def _is_torch_dtype_name(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def _config_file(name_or_path: str | os.PathLike, subfolder: str | None = None) -> str:
    """The config.json a folder, a Hub repo id or a file path stands for (for error messages)."""
    path = os.path.join(str(name_or_path), subfolder or "")
    return path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)


__all__ = ["GQA_ONLY_FIELDS", "MLA_DEFAULTS", "MLA_ONLY_FIELDS", "ConfigFieldError", "ConfigFieldTypeError", "MoEConfig",
           "check_field"]
