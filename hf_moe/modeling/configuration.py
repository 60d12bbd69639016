"""MoEConfig: one configuration for the DeepSeek-style Mixture-of-Experts family.

Field names follow transformers' DeepseekV3Config where one exists, so a DeepSeek config maps 1:1; new knobs
get plain names. Every field is validated in `validate_moe`, and every error names the field, the value
and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ATTENTION_TYPES = ("mla", "gqa")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
QK_NORM_TYPES = ("head", "full")


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
        kv_lora_rank (`int`): MLA latent width (what the cache stores, with the rope key).
        qk_rope_head_dim / qk_nope_head_dim / v_head_dim (`int`): MLA per-head dims (decoupled RoPE).
        rope_interleave (`bool`): MLA rotary dims stored as interleaved pairs (DeepSeek's checkpoints).
        num_key_value_heads (`int | None`): GQA key/value heads (None = num_attention_heads).
        head_dim (`int | None`): GQA head size (None = hidden_size // num_attention_heads). For MLA it is
            derived and equals `qk_rope_head_dim` (the rotary width, what transformers' RoPE code reads).
        attention_bias (`bool`): bias on the q/k/v projections (MLA: on q_a_proj and kv_a_proj_with_mqa).
        attention_out_bias (`bool`): bias on o_proj.
        qk_norm (`str | None`): GQA query/key RMSNorm: "head" (per head, Qwen3) or "full" (over the whole
            projection, OLMoE); None for no norm.
        clip_qkv (`float | None`): clamp q/k/v to [-clip_qkv, clip_qkv] (OLMoE).
        sliding_window (`int | None`): GQA sliding-window size (Mixtral); None for full attention.
        rope_parameters (`dict`): transformers' RoPE parameters (rope_theta, rope_type, yarn factor/mscale...).
        attention_dropout (`float`).

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

    Training objectives:
        aux_loss_alpha (`float`): Switch / expert-level balance loss coefficient (alpha * N * sum f_i P_i).
        device_aux_loss_alpha (`float`), aux_loss_num_devices (`int`): device-level balance loss over
            `aux_loss_num_devices` equal groups of experts.
        seq_aux_loss_alpha (`float`): sequence-wise balance loss (DeepSeek-V3 eqs. 17-20).
        router_z_loss_coef (`float`): router z-loss (ST-MoE).
        num_nextn_predict_layers (`int`): multi-token prediction depth D (0 = none).
        mtp_loss_weight (`float`): lambda of the MTP loss (lambda / D * sum_k CE_k).
        output_router_logits (`bool`): return router logits in the output.

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
    kv_lora_rank: int = 256
    qk_rope_head_dim: int = 32
    qk_nope_head_dim: int = 64
    v_head_dim: int = 64
    rope_interleave: bool = True
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: str | None = None
    clip_qkv: float | None = None
    sliding_window: int | None = None
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
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
    routed_scaling_factor: float | int = 1.0
    router_bias_update_rate: float | int = 1e-3
    router_bias_update_zero_mean: bool = False
    router_jitter_noise: float | int = 0.0
    router_logit_noise: float | int = 0.0
    capacity_factor: float | int | None = None
    # training objectives
    aux_loss_alpha: float | int = 0.0
    device_aux_loss_alpha: float | int = 0.0
    aux_loss_num_devices: int = 1
    seq_aux_loss_alpha: float | int = 0.0
    router_z_loss_coef: float | int = 0.0
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float | int = 0.1
    output_router_logits: bool = False
    # provenance
    upcycled_from: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
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
        super().__post_init__(**kwargs)
        self.validate_moe()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: nope + rope for MLA, head_dim for GQA."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        """Total width of the shared-expert FFN (0 when there is none)."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.n_shared_experts * self.moe_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has an MoE block (else a dense FFN)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx - self.first_k_dense_replace) % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # -------------------------------------------------------------------------------------- validation
    def validate_moe(self) -> None:
        """Check every knob once; raise a ValueError naming the field, the value and what is allowed."""

        def fail(field: str, allowed: str) -> None:
            raise ValueError(f"MoEConfig.{field}={getattr(self, field)!r} is invalid: {allowed}.")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "num_key_value_heads"):
            if getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            fail("hidden_act", f"allowed values are transformers' activations {sorted(ACT2FN)}")
        if self.attention_type not in ATTENTION_TYPES:
            fail("attention_type", f"allowed values are {ATTENTION_TYPES}")
        if self.attention_type == "mla":
            for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    fail(name, "MLA dims must be positive integers")
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", "must be even (rotary dims come in pairs)")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                fail("q_lora_rank", "must be a positive integer or None (no query compression)")
            if self.qk_norm is not None or self.clip_qkv is not None or self.sliding_window is not None:
                field = "qk_norm" if self.qk_norm is not None else (
                    "clip_qkv" if self.clip_qkv is not None else "sliding_window")
                fail(field, "only supported with attention_type='gqa'")
        else:
            if self.head_dim is None or self.head_dim <= 0 or self.head_dim % 2:
                fail("head_dim", "must be a positive even integer")
            if self.num_attention_heads % self.num_key_value_heads:
                fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
            if self.qk_norm is not None and self.qk_norm not in QK_NORM_TYPES:
                fail("qk_norm", f"allowed values are None or {QK_NORM_TYPES}")
            if self.clip_qkv is not None and self.clip_qkv <= 0:
                fail("clip_qkv", "must be positive or None")
            if self.sliding_window is not None and self.sliding_window <= 0:
                fail("sliding_window", "must be positive or None")
        if self.n_routed_experts < 0:
            fail("n_routed_experts", "must be >= 0 (0 gives a dense model)")
        if self.n_routed_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail("num_experts_per_tok", f"must be between 1 and n_routed_experts={self.n_routed_experts}")
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "must be a positive integer")
        if self.n_shared_experts < 0:
            fail("n_shared_experts", "must be >= 0")
        if self.shared_expert_intermediate_size is not None and self.shared_expert_intermediate_size < 0:
            fail("shared_expert_intermediate_size", "must be >= 0 or None")
        if self.shared_expert_gate and self.shared_intermediate_size == 0:
            fail("shared_expert_gate", "needs shared experts (n_shared_experts > 0)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be between 0 and num_hidden_layers={self.num_hidden_layers}")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", "must be >= 1")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"allowed values are {SCORING_FUNCS}")
        if self.topk_before_softmax and self.scoring_func != "softmax":
            fail("topk_before_softmax", "needs scoring_func='softmax'")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"allowed values are {TOPK_METHODS}")
        if self.n_group < 1:
            fail("n_group", "must be >= 1")
        if self.n_routed_experts > 0 and self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            fail("topk_group", f"must be between 1 and n_group={self.n_group}")
        if self.n_group > 1 and self.n_routed_experts > 0:
            if self.topk_method == "greedy":
                fail("topk_method", "'greedy' ignores groups; use 'group_limited_greedy' or 'noaux_tc' with n_group > 1")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                fail("n_group", "noaux_tc scores groups by their top-2 experts, so groups need >= 2 experts")
            if self.n_routed_experts > 0 and self.topk_group * per_group < self.num_experts_per_tok:
                fail("topk_group", f"{self.topk_group} groups of {per_group} experts cannot hold "
                                   f"num_experts_per_tok={self.num_experts_per_tok} choices")
        for name in ("routed_scaling_factor",):
            if getattr(self, name) <= 0:
                fail(name, "must be positive")
        for name in ("router_bias_update_rate", "router_jitter_noise", "router_logit_noise", "aux_loss_alpha",
                     "device_aux_loss_alpha", "seq_aux_loss_alpha", "router_z_loss_coef", "mtp_loss_weight",
                     "attention_dropout"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", "must be positive, or None for dropless routing")
        if self.aux_loss_num_devices < 1 or (
            self.n_routed_experts > 0 and self.n_routed_experts % self.aux_loss_num_devices
        ):
            fail("aux_loss_num_devices", f"must be >= 1 and divide n_routed_experts={self.n_routed_experts}")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")

    # --------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MoEConfig:
        """A configuration of a published system (see `hf_moe.modeling.presets.PRESETS`), with overrides."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"Unknown preset name={name!r}; allowed values are {sorted(PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"MoEConfig.from_preset({name!r}) got unknown fields {unknown}; see MoEConfig's docstring.")
        fields = copy.deepcopy(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)


__all__ = ["MoEConfig"]
