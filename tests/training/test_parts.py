"""One classification of a model's parameters into parts, shared by the recipes and the parameter counts."""

from __future__ import annotations

import torch

from hf_moe import MoEForCausalLM
from hf_moe.inspection import count_parameters
from hf_moe.training.parts import PARTS, parameter_parts
from hf_moe.training.recipes import apply_recipe
from tests.conftest import tiny_config


def tiny_model() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(tiny_config(num_nextn_predict_layers=1))


def test_parameters_are_classified_by_module() -> None:
    parts = parameter_parts(tiny_model())
    assert parts["model.layers.1.mlp.gate.weight"] == "router"
    assert parts["model.layers.1.mlp.experts.gate_up_proj"] == "routed_experts"
    assert parts["model.layers.1.mlp.shared_experts.up_proj.weight"] == "shared_experts"
    assert parts["model.layers.0.mlp.up_proj.weight"] == "dense_ffn"
    assert parts["model.layers.0.self_attn.kv_a_layernorm.weight"] == "norms"
    assert parts["model.embed_tokens.weight"] == "embeddings"
    assert parts["mtp.0.block.self_attn.o_proj.weight"] == "attention"
    assert parts["mtp.0.eh_proj.weight"] == "mtp"
    assert parts["lm_head.weight"] == "lm_head"
    assert set(parts.values()) <= set(PARTS)


def test_gated_shared_expert_and_qk_norms_have_their_parts() -> None:
    model = MoEForCausalLM(tiny_config(attention_type="gqa", num_key_value_heads=2, head_dim=8, q_lora_rank=None,
                                       qk_norm="head", shared_expert_gate=True))
    parts = parameter_parts(model)
    assert parts["model.layers.1.mlp.shared_expert_gate.weight"] == "shared_experts"
    assert parts["model.layers.1.self_attn.q_norm.weight"] == "norms"
    assert parts["model.layers.1.self_attn.q_proj.weight"] == "attention"


def test_counts_and_recipes_use_the_same_parts() -> None:
    """count_parameters' per-part totals are the sizes of the parts the recipes freeze (MTP reported apart)."""
    model = tiny_model()
    parts = parameter_parts(model)
    count = count_parameters(model)
    for part in PARTS:
        if part == "mtp":
            continue
        size = sum(p.numel() for name, p in model.named_parameters() if parts[name] == part and not name.startswith("mtp."))
        assert count.parts[part] == size, part
    assert count.parts["mtp"] == sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    report = apply_recipe(model, "full", verbose=False)
    for part, (_, total) in report.parts.items():
        assert total == sum(p.numel() for name, p in model.named_parameters() if parts[name] == part)


def test_a_model_loaded_as_remote_code_has_the_same_parts(tmp_path) -> None:
    """The copied modeling classes (transformers_modules.*) are classified like hf_moe's own."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from hf_moe.hub import export_remote_code

    model = tiny_model()
    export_remote_code(model, tmp_path / "remote")
    remote_class = get_class_from_dynamic_module("model.MoEForCausalLM", str(tmp_path / "remote"))
    remote = remote_class.from_pretrained(tmp_path / "remote")
    assert remote_class is not MoEForCausalLM and remote_class.__name__ == MoEForCausalLM.__name__
    assert parameter_parts(remote) == parameter_parts(model)


def test_layer_index_and_label_from_module_names() -> None:
    from hf_moe.training.parts import layer_index, layer_label

    assert layer_index("model.layers.3.mlp.experts") == 3
    assert layer_index("base_model.model.model.layers.12.mlp.gate.weight") == 12  # through a peft wrapper
    assert layer_index("mtp.0.block.mlp.experts") == -1 and layer_index("lm_head") == -1
    assert layer_index("model.layers.3") == 3 and layer_index("model.layers.30x.mlp") == -1
    assert layer_label("model.layers.3.mlp.gate") == "layer_3"
    assert layer_label("mtp.1.block.mlp.gate") == "mtp_1"
    assert layer_label("lm_head") == "lm_head"
