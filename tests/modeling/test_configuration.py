"""MoEConfig validation (every bad value raises a ValueError naming its field) and serialisation round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hf_moe.modeling.configuration import MoEConfig
from hf_moe.modeling.presets import PRESETS

GQA = {"attention_type": "gqa", "num_attention_heads": 16, "num_key_value_heads": 4}

# (overrides of the default config, the field the error must name)
INVALID: list[tuple[dict[str, Any], str]] = [
    # routing
    ({"n_routed_experts": 8, "num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"n_routed_experts": 64, "n_group": 3, "topk_method": "group_limited_greedy"}, "n_group"),
    ({"n_group": 4, "topk_group": 5}, "topk_group"),
    ({"topk_group": 0}, "topk_group"),
    ({"n_group": 0}, "n_group"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "topk"}, "topk_method"),
    ({"n_group": 4, "topk_group": 2, "topk_method": "greedy"}, "topk_method"),
    ({"n_routed_experts": 8, "n_group": 8, "topk_group": 2, "num_experts_per_tok": 2}, "n_group"),
    ({"n_group": 8, "topk_group": 1, "num_experts_per_tok": 9}, "topk_group"),
    ({"scoring_func": "sigmoid", "topk_before_softmax": True}, "topk_before_softmax"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"router_bias_update_rate": -1e-3}, "router_bias_update_rate"),
    ({"router_jitter_noise": -0.1}, "router_jitter_noise"),
    ({"router_logit_noise": -0.1}, "router_logit_noise"),
    # non-positive sizes
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": 0, **GQA}, "hidden_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"intermediate_size": -5}, "intermediate_size"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"n_routed_experts": -1}, "n_routed_experts"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    # MLA dims
    ({"qk_rope_head_dim": 33}, "qk_rope_head_dim"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"qk_nope_head_dim": 0}, "qk_nope_head_dim"),
    ({"v_head_dim": 0}, "v_head_dim"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"qk_norm": "head"}, "qk_norm"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"clip_qkv": 8.0}, "clip_qkv"),
    # GQA
    ({"attention_type": "gqa", "num_attention_heads": 16, "num_key_value_heads": 5}, "num_key_value_heads"),
    ({"attention_type": "gqa", "num_key_value_heads": 0}, "num_key_value_heads"),
    ({**GQA, "head_dim": 63}, "head_dim"),
    ({"attention_type": "gqa", "hidden_size": 96, "num_attention_heads": 32}, "head_dim"),  # derived 3: odd
    ({**GQA, "qk_norm": "layer"}, "qk_norm"),
    ({**GQA, "clip_qkv": 0.0}, "clip_qkv"),
    ({**GQA, "sliding_window": 0}, "sliding_window"),
    # layers, kinds, objectives
    ({"num_hidden_layers": 4, "first_k_dense_replace": 5}, "first_k_dense_replace"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"moe_layer_freq": 0}, "moe_layer_freq"),
    ({"attention_type": "mha"}, "attention_type"),
    ({"hidden_act": "swishy"}, "hidden_act"),
    ({"n_shared_experts": 0, "shared_expert_gate": True}, "shared_expert_gate"),
    ({"aux_loss_alpha": -0.01}, "aux_loss_alpha"),
    ({"device_aux_loss_alpha": -0.01}, "device_aux_loss_alpha"),
    ({"seq_aux_loss_alpha": -1e-4}, "seq_aux_loss_alpha"),
    ({"router_z_loss_coef": -1e-3}, "router_z_loss_coef"),
    ({"aux_loss_num_devices": 3}, "aux_loss_num_devices"),
    ({"aux_loss_num_devices": 0}, "aux_loss_num_devices"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"mtp_loss_weight": -0.1}, "mtp_loss_weight"),
    ({"attention_dropout": -0.1}, "attention_dropout"),
]


@pytest.mark.parametrize(("overrides", "field"), INVALID, ids=[f"{f}:{o}" for o, f in INVALID])
def test_invalid_config_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**overrides)


def test_defaults_and_derived_values() -> None:
    config = MoEConfig()
    assert config.model_type == "hf_moe"
    assert config.head_dim == config.qk_rope_head_dim  # MLA: the rotary width
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim
    assert config.shared_intermediate_size == config.n_shared_experts * config.moe_intermediate_size
    assert config.moe_layer_indices == list(range(config.first_k_dense_replace, config.num_hidden_layers))
    assert config.num_experts == config.num_local_experts == config.n_routed_experts  # attribute_map

    gqa = MoEConfig(attention_type="gqa", hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    assert gqa.head_dim == 64 and gqa.qk_head_dim == 64

    every_other = MoEConfig(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert every_other.moe_layer_indices == [1, 3, 5]
    assert MoEConfig(n_routed_experts=0).moe_layer_indices == []


def _round_trip(config: MoEConfig, tmp_path: Path) -> MoEConfig:
    config.save_pretrained(tmp_path)
    return MoEConfig.from_pretrained(tmp_path)


def test_save_load_round_trip_default(tmp_path: Path) -> None:
    config = MoEConfig()
    loaded = _round_trip(config, tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_save_load_round_trip_presets(name: str, tmp_path: Path) -> None:
    config = MoEConfig.from_preset(name)
    loaded = _round_trip(config, tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.rope_parameters == config.rope_parameters


def test_save_load_round_trip_non_default_fields(tmp_path: Path) -> None:
    config = MoEConfig(
        attention_type="gqa", hidden_size=256, num_attention_heads=8, num_key_value_heads=2, qk_norm="full",
        clip_qkv=8.0, sliding_window=64, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", scoring_func="softmax", n_shared_experts=1,
        shared_expert_intermediate_size=96, shared_expert_gate=True, capacity_factor=1.25, aux_loss_alpha=0.01,
        aux_loss_num_devices=4, device_aux_loss_alpha=0.05, router_z_loss_coef=1e-3, num_nextn_predict_layers=2,
        mtp_loss_weight=0.3, moe_layer_freq=2, tie_word_embeddings=True,
    )
    loaded = _round_trip(config, tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.shared_intermediate_size == 96 and loaded.moe_layer_indices == config.moe_layer_indices


def test_from_dict_rejects_invalid_values() -> None:
    fields = MoEConfig().to_dict()
    fields["num_experts_per_tok"] = fields["n_routed_experts"] + 1
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts_per_tok="):
        MoEConfig.from_dict(fields)
