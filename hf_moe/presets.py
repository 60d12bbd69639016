"""Published MoE systems as `MoEConfig` field dicts (plain data; `MoEConfig.from_preset(name, **overrides)`).

Each entry reproduces the hyper-parameters of the model's Hugging Face `config.json` (named in its comment),
translated to MoEConfig's field names. Balance-loss coefficients come from the same config or, where the config
does not carry them, from the model's paper (named in the comment). Models trained with auxiliary losses keep
`router_bias_update_rate=0.0` (no auxiliary-loss-free bias updates); only DeepSeek-V3 and GLM-4.5 use them.
"""

from __future__ import annotations

from typing import Any

from .modeling.kernel_hooks import register_kernel


def _yarn(factor: float, original: int, mscale: float, theta: float = 10000.0) -> dict[str, Any]:
    """DeepSeek's YaRN `rope_scaling` (beta_fast 32, beta_slow 1) in transformers' rope_parameters form."""
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # deepseek-ai/deepseek-moe-16b-base config.json (DeepSeekMoE, arXiv 2401.06066): MHA, 2 shared + 64 routed
    # experts of 1408, top-6 softmax without renormalisation, first layer dense; aux_loss_alpha 0.001.
    "deepseek-moe-16b": {
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "tie_word_embeddings": False,
        "attention_type": "gqa",
        "num_key_value_heads": 16,
        "head_dim": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.001,
    },
    # deepseek-ai/DeepSeek-V2-Lite config.json: MLA without query compression (q_lora_rank null), 2 shared +
    # 64 routed experts, top-6 greedy, YaRN x40 from 4k (mscale 0.707); aux_loss_alpha 0.001.
    "deepseek-v2-lite": {
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "tie_word_embeddings": False,
        "attention_type": "mla",
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "rope_parameters": _yarn(40.0, 4096, 0.707),
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.001,
    },
    # deepseek-ai/DeepSeek-V2 config.json: MLA (q_lora_rank 1536), 2 shared + 160 routed experts of 1536, top-6
    # device-limited routing (8 groups, 3 kept, group_limited_greedy), routed_scaling_factor 16. Balance losses
    # from the DeepSeek-V2 paper (arXiv 2405.04434 §4.1): expert-level 0.003, device-level 0.05 over 8 devices.
    "deepseek-v2": {
        "vocab_size": 102400,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "tie_word_embeddings": False,
        "attention_type": "mla",
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "rope_parameters": _yarn(40.0, 4096, 0.707),
        "n_routed_experts": 160,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1536,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "scoring_func": "softmax",
        "topk_method": "group_limited_greedy",
        "n_group": 8,
        "topk_group": 3,
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.003,
        "device_aux_loss_alpha": 0.05,
        "aux_loss_num_devices": 8,
    },
    # deepseek-ai/DeepSeek-V3 config.json (arXiv 2412.19437): MLA, 1 shared + 256 routed experts of 2048, top-8
    # sigmoid with aux-loss-free bias (gamma 1e-3), node-limited noaux_tc (8 groups, 4 kept), scaling 2.5,
    # first 3 layers dense, YaRN x40 (mscale 1.0), one MTP module (lambda 0.3), sequence-wise loss 1e-4.
    "deepseek-v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "attention_type": "mla",
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "rope_interleave": True,
        "rope_parameters": _yarn(40.0, 4096, 1.0),
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "router_bias_update_rate": 1e-3,
        "seq_aux_loss_alpha": 1e-4,
        "num_nextn_predict_layers": 1,
        "mtp_loss_weight": 0.3,
    },
    # mistralai/Mixtral-8x7B-v0.1 config.json (arXiv 2401.04088): GQA 32/8, 8 experts of 14336, top-2 with
    # softmax over the chosen logits, no shared experts, rope_theta 1e6; router_aux_loss_coef 0.02 (config.json).
    "mixtral-8x7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_type": "gqa",
        "num_key_value_heads": 8,
        "head_dim": 128,
        "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 14336,
        "n_shared_experts": 0,
        "first_k_dense_replace": 0,
        "scoring_func": "softmax",
        "topk_before_softmax": True,
        "topk_method": "greedy",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.02,
    },
    # Qwen/Qwen1.5-MoE-A2.7B config.json (Qwen2-MoE architecture): MHA with q/k/v bias, 60 routed experts of
    # 1408, top-4 softmax without renormalisation, one gated shared FFN of 5632 (= 4 fine-grained experts),
    # rope_theta 1e6; router_aux_loss_coef 0.001.
    "qwen1.5-moe-a2.7b": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "tie_word_embeddings": False,
        "attention_type": "gqa",
        "num_key_value_heads": 16,
        "head_dim": 128,
        "attention_bias": True,
        "attention_out_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "n_routed_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "n_shared_experts": 4,
        "shared_expert_intermediate_size": 5632,
        "shared_expert_gate": True,
        "first_k_dense_replace": 0,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.001,
    },
    # Qwen/Qwen3-30B-A3B config.json: GQA 32/4 with head_dim 128 and per-head q/k RMSNorm, 128 experts of 768,
    # top-8 renormalised, no shared experts, rope_theta 1e6; router_aux_loss_coef 0.001.
    "qwen3-moe-30b-a3b": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": False,
        "attention_type": "gqa",
        "num_key_value_heads": 4,
        "head_dim": 128,
        "attention_bias": False,
        "qk_norm": "head",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "n_routed_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "n_shared_experts": 0,
        "first_k_dense_replace": 0,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.001,
    },
    # allenai/OLMoE-1B-7B-0924 config.json (arXiv 2409.02060): MHA with q/k RMSNorm over the whole projection,
    # 64 experts of 1024, top-8 softmax without renormalisation; router_aux_loss_coef 0.01, z-loss 0.001 (paper).
    "olmoe-1b-7b": {
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": None,
        "eos_token_id": 50279,
        "tie_word_embeddings": False,
        "attention_type": "gqa",
        "num_key_value_heads": 16,
        "head_dim": 128,
        "qk_norm": "full",
        "clip_qkv": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "n_routed_experts": 64,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 1024,
        "n_shared_experts": 0,
        "first_k_dense_replace": 0,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.01,
        "router_z_loss_coef": 0.001,
    },
}

# ------------------------------------------------------------------ systems of the attention-side families
# (GQA with partial rotary / q/k norms under DeepSeek-V3-style sigmoid routers; see conversion/families)


def _glm45(**fields: Any) -> dict[str, Any]:
    """GLM-4.5's shared architecture (zai-org config.json): GQA 8 KV heads of 128 with q/k/v biases, partial rotary
    0.5 (rope_theta 1e6), sigmoid router with the balancing bias, one shared expert, one MTP layer. The GLM-4.5
    report (arXiv 2508.06471) trains with loss-free balance routing (bias update rate 0.001) plus a sequence-wise
    balance loss of weight 0.0001."""
    return {
        "vocab_size": 151552, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": None,
        "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "tie_word_embeddings": False,
        "attention_type": "gqa", "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "attention_bias": True, "attention_out_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
        "n_shared_experts": 1, "num_experts_per_tok": 8, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "router_bias_update_rate": 0.001,
        "seq_aux_loss_alpha": 0.0001, "num_nextn_predict_layers": 1, **fields,
    }  # fmt: skip


ATTENTION_FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # zai-org/GLM-4.5 config.json: 92 layers (3 dense), 160 routed experts of 1536, per-head q/k norm, scale 2.5
    "glm-4.5": _glm45(hidden_size=5120, intermediate_size=12288, num_hidden_layers=92, moe_intermediate_size=1536,
                      n_routed_experts=160, first_k_dense_replace=3, routed_scaling_factor=2.5, qk_norm="head"),
    # zai-org/GLM-4.5-Air config.json: 46 layers (1 dense), 128 routed experts of 1408, no q/k norm
    "glm-4.5-air": _glm45(hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, moe_intermediate_size=1408,
                          n_routed_experts=128, first_k_dense_replace=1, routed_scaling_factor=1.0),
    # MiniMaxAI/MiniMax-M2 config.json: 62 MoE layers, GQA 48/8 heads of 128 without biases, q/k RMSNorm over the
    # whole projection, rotary_dim 64 (partial 0.5, rope_theta 5e6), 256 experts of 1536 top-8, sigmoid router
    # with the balancing bias, no shared experts (its MTP modules are not in transformers' class). Its bias
    # schedule is not published: the config's router_aux_loss_coef 0.001 is kept, bias updates off.
    "minimax-m2": {
        "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62,
        "num_attention_heads": 48, "max_position_embeddings": 196608, "rms_norm_eps": 1e-6, "bos_token_id": 200034,
        "eos_token_id": 200020, "tie_word_embeddings": False, "attention_type": "gqa", "num_key_value_heads": 8,
        "head_dim": 128, "qk_norm": "full",
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
        "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 1536, "n_shared_experts": 0,
        "first_k_dense_replace": 0, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1,
        "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0, "router_bias_update_rate": 0.0,
        "aux_loss_alpha": 0.001,
    },
}  # fmt: skip
PRESETS.update(ATTENTION_FAMILY_PRESETS)

__all__ = ["ATTENTION_FAMILY_PRESETS", "PRESETS"]


def _presets() -> dict[str, dict[str, Any]]:
    """The table, for `MoEConfig.from_preset` through the model's seam (modeling/ never imports hf_moe)."""
    return PRESETS


register_kernel("presets", _presets)
