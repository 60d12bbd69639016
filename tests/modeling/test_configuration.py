"""MoEConfig validation (every bad value raises a ValueError naming its field) and serialisation round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hf_moe.modeling.configuration import MoEConfig
from hf_moe.presets import PRESETS

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


# ------------------------------------------------------------------------------- types, finiteness, assignment
# (overrides, the field the error must name): every one was accepted before the types were really checked
WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"num_hidden_layers": True}, "num_hidden_layers"),  # a bool is not an int
    ({"norm_topk_prob": "no"}, "norm_topk_prob"),
    ({"moe_layer_freq": 1.5}, "moe_layer_freq"),
    ({"use_cache": "yes"}, "use_cache"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"capacity_factor": "1.0"}, "capacity_factor"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"upcycled_from": "x"}, "upcycled_from"),
    ({"rope_parameters": "default"}, "rope_parameters"),
    ({"hidden_act": None}, "hidden_act"),
    ({"qk_norm": 1}, "qk_norm"),
    ({"routed_scaling_factor": True}, "routed_scaling_factor"),
    ({"num_experts": 2.0}, "n_routed_experts"),  # through attribute_map
]


@pytest.mark.parametrize(("overrides", "field"), WRONG_TYPES, ids=[f"{f}:{o}" for o, f in WRONG_TYPES])
def test_wrong_types_are_refused_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(TypeError, match=rf"MoEConfig\.{field}=.* is invalid: expected ") as error:
        MoEConfig(**overrides)
    assert isinstance(error.value, ValueError)  # ConfigFieldTypeError is both: `except ValueError` catches it


NAN, INF = float("nan"), float("inf")
OUT_OF_RANGE: list[tuple[dict[str, Any], str]] = [
    ({"routed_scaling_factor": NAN}, "routed_scaling_factor"),
    ({"routed_scaling_factor": INF}, "routed_scaling_factor"),
    ({"rms_norm_eps": NAN}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rope_theta": 0.0}, "rope_parameters"),
    ({"rope_theta": -10000.0}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": NAN}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters"),  # transformers' check
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"attention_dropout": NAN}, "attention_dropout"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"pad_token_id": 32000}, "pad_token_id"),
    ({"initializer_range": -0.02}, "initializer_range"),
    ({"initializer_range": INF}, "initializer_range"),
    ({"router_bias_update_rate": NAN}, "router_bias_update_rate"),
    ({"router_jitter_noise": 1.0}, "router_jitter_noise"),
    ({"router_logit_noise": INF}, "router_logit_noise"),
    ({"capacity_factor": NAN}, "capacity_factor"),
    ({"capacity_factor": INF}, "capacity_factor"),
    ({"aux_loss_alpha": INF}, "aux_loss_alpha"),
    ({"seq_aux_loss_alpha": NAN}, "seq_aux_loss_alpha"),
    ({"mtp_loss_weight": NAN}, "mtp_loss_weight"),
    ({**GQA, "clip_qkv": NAN}, "clip_qkv"),
    ({"kv_lora_rank": -1, **GQA}, "kv_lora_rank"),  # refused for any attention type
]


@pytest.mark.parametrize(("overrides", "field"), OUT_OF_RANGE, ids=[f"{f}:{o}" for o, f in OUT_OF_RANGE])
def test_non_finite_and_out_of_range_values_are_refused(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.* is invalid: "):
        MoEConfig(**overrides)


def test_bos_eos_outside_the_vocabulary_are_only_type_checked() -> None:
    """As in transformers (a warning): generation ids only, and a preset shrunk to a small vocab keeps its eos."""
    config = MoEConfig.from_preset("qwen3-moe-30b-a3b", num_hidden_layers=2, hidden_size=64, vocab_size=1000)
    assert config.eos_token_id >= config.vocab_size
    with pytest.raises(TypeError, match=r"MoEConfig\.eos_token_id="):
        MoEConfig(eos_token_id=[1, "2"])


def test_ints_are_accepted_for_floats() -> None:
    config = MoEConfig(rms_norm_eps=1, routed_scaling_factor=2, capacity_factor=1, attention_dropout=0)
    assert config.routed_scaling_factor == 2 and config.capacity_factor == 1


@pytest.mark.parametrize(("field", "value"), [
    ("num_hidden_layers", True), ("rms_norm_eps", -1.0), ("routed_scaling_factor", NAN), ("norm_topk_prob", "no"),
    ("num_experts", 2.5), ("capacity_factor", 0.0), ("pad_token_id", -1), ("attention_dropout", 2.0),
])
def test_assignment_is_checked(field: str, value: Any) -> None:
    config = MoEConfig()
    name = MoEConfig.attribute_map.get(field, field)
    before = getattr(config, name)
    with pytest.raises(ValueError, match=rf"MoEConfig\.{name}="):
        setattr(config, field, value)
    assert getattr(config, name) == before  # refused values are not stored


def test_rules_between_fields_run_when_a_model_is_built() -> None:
    """Per-field checks run on assignment; the rules between fields when the model is built (and on save)."""
    from hf_moe import MoEForCausalLM
    from tests.conftest import tiny_config

    config = tiny_config()
    config.num_experts_per_tok = 9  # valid alone, more than n_routed_experts=8
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts_per_tok=9 .*n_routed_experts=8"):
        MoEForCausalLM(config)
    config.rope_parameters["rope_theta"] = -1.0  # changed in place: only the full check can see it
    config.num_experts_per_tok = 2
    with pytest.raises(ValueError, match=r"MoEConfig\.rope_parameters="):
        config.validate_moe()


def test_every_field_has_a_rule() -> None:
    """A new field cannot escape validation: each MoEConfig field has an entry (None = any value of its type)."""
    from hf_moe.modeling.configuration import FIELD_RULES

    own = set(MoEConfig.__dict__["__annotations__"])
    assert set(FIELD_RULES) == own


def test_errors_pickle() -> None:
    import pickle

    from hf_moe.modeling.configuration import ConfigFieldTypeError

    with pytest.raises(ConfigFieldTypeError) as error:
        MoEConfig(num_hidden_layers=True)
    again = pickle.loads(pickle.dumps(error.value))
    assert str(again) == str(error.value) and again.field == "num_hidden_layers"


@pytest.mark.parametrize(("change", "field"), [
    ({"num_hidden_layers": True}, "num_hidden_layers"), ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"), ({"hidden_size": "32"}, "hidden_size"),
    ({"routed_scaling_factor": NAN}, "routed_scaling_factor"),  # a bare NaN in the JSON
])
def test_config_json_edited_by_hand_names_the_file(change: dict[str, Any], field: str, tmp_path: Path) -> None:
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import tiny_config

    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    for load in (MoEConfig.from_pretrained, AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"^{path}: MoEConfig\.{field}="):
            load(tmp_path)


def test_save_refuses_an_invalid_config_with_our_error(tmp_path: Path) -> None:
    """transformers' `validate()` on save would raise StrictDataclassClassValidationError (not a ValueError)."""
    config = MoEConfig(n_routed_experts=8, num_experts_per_tok=2)
    config.num_experts_per_tok = 50  # valid alone
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts_per_tok=50"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_unknown_dtype_name_is_named(tmp_path: Path) -> None:
    import json

    with pytest.raises(ValueError, match=r"MoEConfig\.dtype='float33' is invalid"):
        MoEConfig(dtype="float33")
    assert MoEConfig(dtype="bfloat16").dtype is not None
    MoEConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dtype": "bfloat17"}))
    with pytest.raises(ValueError, match=rf"^{path}: MoEConfig\.dtype='bfloat17'"):
        MoEConfig.from_pretrained(tmp_path)
